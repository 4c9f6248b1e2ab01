"""Datasets: a registry of loaders that return a train/test :class:`DatasetBundle`.

Everything a loader needs to know about a well-known dataset (title, classes, normalisation
constants, where its files may sit, how to get it) is data in :data:`KNOWN_DATASETS`; the loaders
themselves are generic.

Where the files are looked for, in order: the explicit ``data_dir``, the ``SCAR_DATA_DIR``
environment variable, the well-known system locations in :data:`SYSTEM_LOCATIONS` (e.g. where the
Debian package ``dataset-fashion-mnist`` installs Fashion-MNIST), and finally a download (only when
``download=True``) into ``data_dir``, else ``SCAR_DATA_DIR``, else ``~/.cache/scar/data``.

All images are decoded once into memory as uint8 ``[N, C, H, W]`` tensors: even TinyImageNet
(110k images of 3x64x64, about 1.35 GB) fits, and in-memory batches are far faster than decoding
files during every epoch.
"""

from __future__ import annotations

import gzip
import inspect
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scar.data.base import ImageSet, InputSpec, TensorImages, resize_images
from scar.errors import ConfigError, MissingDataError, check_choice, check_range
from scar.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_DATASET = "fashion-mnist"
DATA_DIR_ENV = "SCAR_DATA_DIR"

#: Extensions (lower case) recognised as image files in folder datasets and surrogate trees.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: its classes and the input spec models trained on it should use.

    ``recipe`` names the family of default training hyper-parameters ("fashion-mnist", "cifar10",
    "imagefolder", "synthetic", …) that the training module picks for this dataset.
    """

    name: str
    num_classes: int
    input_spec: InputSpec
    class_names: tuple[str, ...]
    recipe: str


@dataclass
class DatasetBundle:
    info: DatasetInfo
    train: ImageSet
    test: ImageSet
    #: The loader options it was loaded with, defaults filled in (set by :func:`load_dataset`;
    #: empty for a hand-made bundle). Checkpoints record them, so a reload gets the same data.
    options: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The table of well-known datasets
# --------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class KnownDataset:
    """Static facts about a well-known dataset."""

    title: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None  # None: read from the dataset's own metadata
    torchvision_class: str | None  # torchvision.datasets class used to read / download it
    idx_files: bool  # stored as the original idx(.gz) files (MNIST family)
    subdirs: tuple[str, ...]  # where under a data root the files may sit ("" = the root itself)
    how_to_get: str


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "fashion-mnist": KnownDataset(
        "Fashion-MNIST", 10, 1, 28, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES,
        "FashionMNIST", True, ("", "FashionMNIST/raw", "fashion-mnist"),
        "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass "
        "--download (download=True) to fetch it with torchvision, or pass --data-dir DIR / set "
        f"{DATA_DIR_ENV} to a folder holding train-images-idx3-ubyte.gz and the other idx files",
    ),
    "mnist": KnownDataset(
        "MNIST", 10, 1, 28, (0.1307,), (0.3081,), MNIST_CLASSES,
        "MNIST", True, ("", "MNIST/raw", "mnist"),
        "pass --download (download=True) to fetch it with torchvision, or pass --data-dir DIR / "
        f"set {DATA_DIR_ENV} to a folder holding train-images-idx3-ubyte(.gz) and the other idx "
        "files",
    ),
    "cifar10": KnownDataset(
        "CIFAR-10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        CIFAR10_CLASSES, "CIFAR10", False, ("", "cifar10"),
        "pass --download (download=True) to fetch it with torchvision, or pass --data-dir DIR / "
        f"set {DATA_DIR_ENV} to the folder that contains cifar-10-batches-py/",
    ),
    "cifar100": KnownDataset(
        "CIFAR-100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        None, "CIFAR100", False, ("", "cifar100"),
        "pass --download (download=True) to fetch it with torchvision, or pass --data-dir DIR / "
        f"set {DATA_DIR_ENV} to the folder that contains cifar-100-python/",
    ),
    "tinyimagenet": KnownDataset(
        "TinyImageNet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
        None, None, False, ("tiny-imagenet-200", ""),
        "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into DIR, then "
        f"pass --data-dir DIR or set {DATA_DIR_ENV}=DIR (or pass --download)",
    ),
}  # fmt: skip

#: Well-known system locations per dataset, searched after data_dir and $SCAR_DATA_DIR.
SYSTEM_LOCATIONS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
    "cifar10": (),
    "cifar100": (),
    "tinyimagenet": (),
}

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

#: name → loader(arg?, *, data_dir, download, **options) -> DatasetBundle.
DATASETS: Registry[Callable[..., DatasetBundle]] = Registry("dataset")
#: Keywords every loader takes that are not dataset options (where the files are, not what).
RESERVED_KEYWORDS = ("data_dir", "download")


def load_dataset(
    name: str = DEFAULT_DATASET,
    data_dir: str | Path | None = None,
    download: bool = False,
    **options,
) -> DatasetBundle:
    """Load a registered dataset by name (``"fashion-mnist"``, ``"imagefolder:/path"``, …).

    ``options`` are the loader's keyword options (``channels=3`` for the grey datasets, the
    synthetic set's ``num_classes``, …); the bundle keeps them, defaults filled in, as
    :attr:`DatasetBundle.options`.
    """
    loader, arg = DATASETS.resolve(name)
    options = full_options(name, options)
    args = (arg,) if arg is not None else ()
    root = Path(data_dir).expanduser() if data_dir is not None else None
    bundle = loader(*args, data_dir=root, download=download, **options)
    bundle.options = options
    log.info(
        "Loaded %s: %d train / %d test images, %d classes, %dx%dx%d",
        bundle.info.name,
        len(bundle.train),
        len(bundle.test),
        bundle.info.num_classes,
        bundle.info.input_spec.channels,
        bundle.info.input_spec.size,
        bundle.info.input_spec.size,
    )
    return bundle


def check_options(what: str, fn: Callable, options: dict, reserved: Sequence[str] = ()) -> None:
    """Raise ConfigError if ``options`` holds keywords that ``fn`` does not accept."""
    params = inspect.signature(fn).parameters
    allowed = sorted(
        p.name for p in params.values() if p.kind is p.KEYWORD_ONLY and p.name not in reserved
    )
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{what} does not take option(s) {unknown}; allowed options: {allowed or '(none)'}."
        )


def option_defaults(name: str) -> dict[str, Any]:
    """The keyword options of dataset ``name``'s loader and their defaults."""
    loader, _ = DATASETS.resolve(name)
    params = inspect.signature(loader).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in RESERVED_KEYWORDS
            and p.default is not p.empty}


def check_option_types(name: str, options: Mapping[str, Any], where: str) -> None:
    """Typed option values (from a grid file) must have the type of the loader's default:
    ConfigError naming the option, the expected type and the value otherwise."""
    defaults = option_defaults(name)
    for key, value in options.items():
        like = defaults.get(key)
        if like is None or value is None:
            continue
        if isinstance(like, bool):
            ok = isinstance(value, bool)
        elif isinstance(like, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(like, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(like))
        if not ok:
            raise ConfigError(f"{where}: option {key!r} must be a {type(like).__name__} (default "
                              f"{like!r}); got {value!r} ({type(value).__name__}).")


def full_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``options`` of dataset ``name`` checked against its loader (unknown keys → ConfigError)
    and completed with the loader's defaults: what a checkpoint records, so that reloading its
    data never depends on a default that may change."""
    loader, _ = DATASETS.resolve(name)
    options = dict(options or {})
    check_options(f"dataset {name!r}", loader, options, reserved=RESERVED_KEYWORDS)
    return {**option_defaults(name), **options}


# --------------------------------------------------------------------------------------------
# Finding data roots
# --------------------------------------------------------------------------------------------


def candidate_roots(name: str, data_dir: Path | None) -> list[tuple[str, Path | None]]:
    """Where to look for ``name``, in order, as (origin label, root or None when unset)."""
    env = os.environ.get(DATA_DIR_ENV)
    roots: list[tuple[str, Path | None]] = [
        ("data_dir", data_dir),
        (f"${DATA_DIR_ENV}", Path(env).expanduser() if env else None),
    ]
    roots += [("system location", Path(p)) for p in SYSTEM_LOCATIONS.get(name, ())]
    return roots


def default_download_dir(data_dir: Path | None) -> Path:
    """Where downloads go: data_dir, else $SCAR_DATA_DIR, else ~/.cache/scar/data."""
    if data_dir is not None:
        return data_dir
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "scar" / "data"


def search_dirs(root: Path, subdirs: Sequence[str]) -> list[Path]:
    return [root / s if s else root for s in subdirs]


def missing_data_error(name: str, looked: list[str]) -> MissingDataError:
    known = KNOWN_DATASETS[name]
    places = "\n".join(f"  - {p}" for p in looked)
    return MissingDataError(
        f"{known.title} ({name!r}) was not found. Looked in:\n{places}\n"
        f"To get it: {known.how_to_get}."
    )


def find_dataset_dir(
    name: str, data_dir: Path | None, is_present: Callable[[Path], bool]
) -> tuple[Path | None, list[str]]:
    """First directory (over candidate roots x known subdirs) where ``is_present`` holds.

    Returns it (or None) and a human-readable list of every place looked at.
    """
    looked: list[str] = []
    for origin, root in candidate_roots(name, data_dir):
        if root is None:
            looked.append(f"{origin}: (not set)")
            continue
        for d in search_dirs(root, KNOWN_DATASETS[name].subdirs):
            if d.is_dir() and is_present(d):
                log.info("Found %s in %s (%s)", name, d, origin)
                return d, looked
            looked.append(f"{origin}: {d}")
    return None, looked


# --------------------------------------------------------------------------------------------
# idx files (MNIST family)
# --------------------------------------------------------------------------------------------

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the idx format: 2 zero bytes, a dtype code, ndim, big-endian uint32 dims, data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ConfigError(
            f"{source} is not an idx file: the header must be 0x00 0x00 <dtype code in "
            f"{sorted(hex(k) for k in _IDX_DTYPES)}> <ndim>; got {raw[:4].hex(' ') or 'no bytes'}."
        )
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ConfigError(f"{source}: idx header announces {ndim} dims but the file is truncated.")
    dims = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    if len(raw) - offset != count * dtype.itemsize:
        raise ConfigError(
            f"{source}: idx header announces shape {dims} ({count * dtype.itemsize} data bytes) "
            f"but the file holds {len(raw) - offset} data bytes."
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims).copy()


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file, gzip-compressed when its name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return parse_idx(f.read(), str(path))


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four idx files (plain or .gz) in ``directory``, or None unless all four are there."""
    found = {}
    for key, base in IDX_FILES.items():
        for candidate in (directory / base, directory / f"{base}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def load_idx_split(images_path: Path, labels_path: Path) -> TensorImages:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"{images_path} / {labels_path}: expected images [N, H, W] and labels [N]; got "
            f"{images.shape} and {labels.shape}."
        )
    return TensorImages(to_nchw(images), torch.from_numpy(labels.astype(np.int64)))


def to_nchw(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N, H, W] or [N, H, W, C] uint8 array → contiguous uint8 tensor [N, C, H, W]."""
    x = torch.as_tensor(np.asarray(array, dtype=np.uint8))
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous()


# --------------------------------------------------------------------------------------------
# torchvision datasets: fashion-mnist, mnist, cifar10, cifar100
# --------------------------------------------------------------------------------------------


def known_info(name: str, class_names: Sequence[str] | None = None) -> DatasetInfo:
    k = KNOWN_DATASETS[name]
    names = tuple(class_names or k.class_names or (f"class_{i}" for i in range(k.num_classes)))
    spec = InputSpec(k.channels, k.size, k.mean, k.std)
    return DatasetInfo(name, k.num_classes, spec, names, recipe=name)


def torchvision_present(name: str, directory: Path) -> bool:
    """True when the files torchvision's reader for ``name`` needs are in ``directory``."""
    if KNOWN_DATASETS[name].idx_files:
        return find_idx_files(directory) is not None
    return (directory / _torchvision_class(name).base_folder).is_dir()


def _torchvision_class(name: str):
    from torchvision import datasets as tvd

    return getattr(tvd, KNOWN_DATASETS[name].torchvision_class)


def _torchvision_split(name: str, root: Path, *, train: bool, download: bool):
    try:
        return _torchvision_class(name)(str(root), train=train, download=download)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise MissingDataError(
            f"{KNOWN_DATASETS[name].title} in {root} could not be read by torchvision ({exc}). "
            f"To get it: {KNOWN_DATASETS[name].how_to_get}."
        ) from exc


def load_torchvision_dataset(
    name: str, data_dir: Path | None, download: bool, channels: int | None = None,
    train_subset: int = 0,
) -> DatasetBundle:
    """A well-known dataset from its original files (or torchvision); ``channels=3`` repeats the
    grey channel of MNIST-style datasets (for models that take RGB input only);
    ``train_subset=n`` keeps n training images (:func:`train_subset_indices`; 0 = all)."""
    if channels is not None:
        check_channels(name, channels)
    check_train_subset(name, train_subset)
    bundle = _read_torchvision_dataset(name, data_dir, download)
    if train_subset:
        if train_subset >= len(bundle.train):
            raise ConfigError(
                f"{name} option train_subset must be smaller than the training set "
                f"({len(bundle.train)} images; 0 = all of them); got {train_subset}."
            )
        idx = train_subset_indices(len(bundle.train), train_subset)
        bundle = DatasetBundle(bundle.info, bundle.train.subset(idx), bundle.test,
                               dict(bundle.options))
    return bundle if channels is None else with_channels(bundle, channels)


#: Seed of the ``train_subset`` option's permutation. Fixed, so that a subset of n images is the
#: first n of one permutation and every larger subset starts with it, in the same order: the
#: membership audit trains its reference models on halves of the subset twice as large
#: (:mod:`scar.experiments.references`) and finds a model's training images at the same positions.
TRAIN_SUBSET_SEED = 0


def train_subset_indices(num_train: int, n: int) -> torch.Tensor:
    """The training positions option ``train_subset=n`` keeps: the first n of a seeded random
    permutation of ``num_train`` (in permutation order)."""
    g = torch.Generator().manual_seed(TRAIN_SUBSET_SEED)
    return torch.randperm(num_train, generator=g)[:n]


def check_train_subset(name: str, train_subset: Any) -> None:
    if type(train_subset) is not int or train_subset < 0:  # not True, not 5000.0
        raise ConfigError(f"{name} option train_subset must be an integer >= 0 (0 = the whole "
                          f"training set); got {train_subset!r}.")


def check_channels(name: str, channels: Any) -> None:
    """``channels`` must be the dataset's own count or, for a grey dataset, 3 (grey → RGB)."""
    own = KNOWN_DATASETS[name].channels
    allowed = sorted({own, 3}) if own == 1 else [own]
    if type(channels) is not int or channels not in allowed:  # not True, not 3.0
        raise ConfigError(f"{name} option channels must be one of {allowed}; got {channels!r}.")


def with_channels(bundle: DatasetBundle, channels: int) -> DatasetBundle:
    """``bundle`` with grey images repeated to ``channels`` (see :func:`resize_images`) and the
    normalisation constants repeated per channel (exact: every channel holds the grey image)."""
    spec = bundle.info.input_spec
    if channels == spec.channels:
        return bundle
    if spec.channels != 1:
        raise ConfigError(
            f"{bundle.info.name}: only grey images can be given {channels} channels; these have "
            f"{spec.channels}."
        )
    train, test = (
        TensorImages(resize_images(s.materialize().images, channels, spec.size), s.labels)
        for s in (bundle.train, bundle.test)
    )
    rgb = InputSpec(channels, spec.size, spec.mean * channels, spec.std * channels)
    return DatasetBundle(replace(bundle.info, input_spec=rgb), train, test, dict(bundle.options))


def _read_torchvision_dataset(name: str, data_dir: Path | None, download: bool) -> DatasetBundle:
    k = KNOWN_DATASETS[name]
    found, looked = find_dataset_dir(name, data_dir, lambda d: torchvision_present(name, d))
    if found is not None and k.idx_files:
        files = find_idx_files(found)
        assert files is not None
        train = load_idx_split(files["train_images"], files["train_labels"])
        test = load_idx_split(files["test_images"], files["test_labels"])
        return DatasetBundle(known_info(name), train, test)
    if found is None and not download:
        raise missing_data_error(name, looked)
    root = found if found is not None else default_download_dir(data_dir)
    if found is None:
        log.info("Downloading %s with torchvision into %s", k.title, root)
    tv_train = _torchvision_split(name, root, train=True, download=download)
    tv_test = _torchvision_split(name, root, train=False, download=download)
    train = TensorImages(to_nchw(tv_train.data), torch.as_tensor(tv_train.targets))
    test = TensorImages(to_nchw(tv_test.data), torch.as_tensor(tv_test.targets))
    classes = getattr(tv_train, "classes", None)
    classes = classes if classes and len(classes) == k.num_classes else None
    return DatasetBundle(known_info(name, classes), train, test)


def _register_torchvision(name: str) -> None:
    k = KNOWN_DATASETS[name]
    if k.channels == 1:
        # Grey datasets take ``channels`` (1, or 3 for RGB-only models such as tv:<name>).
        def loader(
            *, data_dir: Path | None = None, download: bool = False, channels: int = k.channels,
            train_subset: int = 0,
        ) -> DatasetBundle:
            return load_torchvision_dataset(name, data_dir, download, channels, train_subset)

        help_text = (f"{k.title} (torchvision / original files; option channels=3 for RGB, "
                     "train_subset=N for a seeded subset)")
    else:

        def loader(*, data_dir: Path | None = None, download: bool = False,
                   train_subset: int = 0) -> DatasetBundle:
            return load_torchvision_dataset(name, data_dir, download,
                                            train_subset=train_subset)

        help_text = f"{k.title} (torchvision / original files; train_subset=N for a subset)"
    loader.__name__ = f"load_{name.replace('-', '_')}"
    DATASETS.register(name, help=help_text)(loader)


for _name, _known in KNOWN_DATASETS.items():
    if _known.torchvision_class is not None:
        _register_torchvision(_name)


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def list_image_files(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursively), sorted for determinism."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def list_class_dirs(folder: Path) -> list[Path]:
    """Sub-directories of ``folder`` (hidden ones skipped), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def decode_image(path: Path, channels: int) -> torch.Tensor:
    """Decode one image file with PIL into uint8 [C, H, W] (grey for 1 channel, else RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ConfigError(f"Refusing image file {path}: {exc} (an image this large is a "
                          "decompression bomb or not a dataset image).") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ConfigError(f"Cannot decode image file {path}: {exc}") from exc
    t = torch.from_numpy(arr.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _decode_resized(path: Path, channels: int, size: int) -> torch.Tensor:
    """One image file as uint8 [channels, size, size]."""
    return resize_images(decode_image(path, channels)[None], channels, size)[0]


def decode_images(paths: Sequence[Path], channels: int, size: int) -> torch.Tensor:
    """Decode and resize image files into one uint8 [N, channels, size, size] tensor."""
    out = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)
    step = max(10_000, len(paths) // 10)
    for i, path in enumerate(paths):
        out[i] = _decode_resized(path, channels, size)
        if (i + 1) % step == 0:
            log.info("Decoded %d / %d images", i + 1, len(paths))
    return out


def decode_images_skipping(paths: Sequence[Path], channels: int, size: int, what: str
                           ) -> tuple[torch.Tensor, list[int]]:
    """:func:`decode_images`, skipping files that cannot be decoded (a warning counts them and
    names a few); returns (images, positions in ``paths`` that were kept). ConfigError when
    none can be decoded."""
    kept, bad = [], []
    out = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            out[len(kept)] = _decode_resized(path, channels, size)
        except ConfigError as exc:
            bad.append(f"{path.name} ({str(exc).split(': ', 1)[-1][:80]})")
            continue
        kept.append(i)
    if bad:
        log.warning("%s: skipped %d of %d image files that cannot be decoded: %s%s", what,
                    len(bad), len(paths), "; ".join(bad[:3]), " …" if len(bad) > 3 else "")
    if not kept:
        raise ConfigError(f"{what}: none of its {len(paths)} image files can be decoded "
                          f"({'; '.join(bad[:3])}).")
    return out[:len(kept)].clone(), kept


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 [N, C, H, W] images."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = max(1, images.shape[0] * images.shape[2] * images.shape[3])
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant images: avoid 0-division
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


# --------------------------------------------------------------------------------------------
# TinyImageNet
# --------------------------------------------------------------------------------------------


def tinyimagenet_present(directory: Path) -> bool:
    return (directory / "wnids.txt").is_file() and (directory / "train").is_dir()


def read_tinyimagenet_files(root: Path) -> tuple[list[str], dict[str, str], list, list]:
    """(sorted wnids, wnid → words, train (path, label) list, val (path, label) list)."""
    wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().splitlines() if w.strip())
    if not wnids:
        raise ConfigError(f"{root / 'wnids.txt'} lists no class ids.")
    label_of = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    words_file = root / "words.txt"
    if words_file.is_file():
        for line in words_file.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in label_of:
                words[wnid] = text.split(",")[0].strip()
    train = []
    for wnid in wnids:
        class_dir = root / "train" / wnid
        files = list_image_files(class_dir) if class_dir.is_dir() else []
        if not files:
            raise ConfigError(f"TinyImageNet class {wnid} has no training images in {class_dir}.")
        train += [(p, label_of[wnid]) for p in files]
    val = read_val_annotations(root / "val", label_of)
    return wnids, words, train, val


def read_val_annotations(val_dir: Path, label_of: dict[str, int]) -> list[tuple[Path, int]]:
    """Label the flat ``val/images`` folder from ``val/val_annotations.txt`` (file\\twnid\\t…)."""
    ann = val_dir / "val_annotations.txt"
    if not ann.is_file():
        raise MissingDataError(f"TinyImageNet validation labels not found: {ann} is missing.")
    out = []
    for n, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label_of:
            raise ConfigError(
                f"{ann}, line {n}: expected '<file>\\t<wnid>\\t…' with a wnid from wnids.txt; "
                f"got {line!r}."
            )
        path = val_dir / "images" / parts[0]
        if not path.is_file():
            raise MissingDataError(f"{ann}, line {n} names {path}, which does not exist.")
        out.append((path, label_of[parts[1]]))
    if not out:
        raise ConfigError(f"{ann} lists no validation images.")
    return out


def download_tinyimagenet(root: Path) -> Path:  # pragma: no cover - needs the internet
    from torchvision.datasets.utils import download_and_extract_archive

    log.info("Downloading TinyImageNet from %s into %s", TINYIMAGENET_URL, root)
    download_and_extract_archive(TINYIMAGENET_URL, str(root))
    return root / "tiny-imagenet-200"


@DATASETS.register("tinyimagenet", help="TinyImageNet-200 (64x64, val split used as test)")
def load_tinyimagenet(*, data_dir: Path | None = None, download: bool = False) -> DatasetBundle:
    """TinyImageNet: classes in sorted-wnid order; the labelled val split serves as test set."""
    k = KNOWN_DATASETS["tinyimagenet"]
    found, looked = find_dataset_dir("tinyimagenet", data_dir, tinyimagenet_present)
    if found is None:
        if not download:
            raise missing_data_error("tinyimagenet", looked)
        found = download_tinyimagenet(default_download_dir(data_dir))
    wnids, words, train_files, val_files = read_tinyimagenet_files(found)
    log.info(
        "Decoding TinyImageNet from %s (%d + %d images)", found, len(train_files), len(val_files)
    )
    train = TensorImages(
        decode_images([p for p, _ in train_files], k.channels, k.size),
        torch.tensor([y for _, y in train_files]),
    )
    test = TensorImages(
        decode_images([p for p, _ in val_files], k.channels, k.size),
        torch.tensor([y for _, y in val_files]),
    )
    if len(wnids) != k.num_classes:
        log.warning(
            "TinyImageNet at %s has %d classes (expected %d)", found, len(wnids), k.num_classes
        )
    names = tuple(words.get(w, w) for w in wnids)
    spec = InputSpec(k.channels, k.size, k.mean, k.std)
    return DatasetBundle(
        DatasetInfo("tinyimagenet", len(wnids), spec, names, "tinyimagenet"), train, test
    )


# --------------------------------------------------------------------------------------------
# imagefolder:<path>
# --------------------------------------------------------------------------------------------


def scan_class_tree(folder: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list]:
    """Class names and (path, label) pairs of a ``folder/<class>/…`` tree.

    With ``classes`` given (the train classes), labels follow that list and an unknown class
    folder is an error; otherwise the classes are the sorted sub-folder names.
    """
    dirs = list_class_dirs(folder)
    if not dirs:
        raise ConfigError(
            f"No class folders in {folder}; expected {folder}/<class name>/<image files>."
        )
    names = list(classes) if classes is not None else [d.name for d in dirs]
    label_of = {c: i for i, c in enumerate(names)}
    items = []
    for d in dirs:
        if d.name not in label_of:
            raise ConfigError(
                f"Class folder {d} does not exist in the training set; training classes: "
                f"{names[:10]}{' …' if len(names) > 10 else ''}."
            )
        files = list_image_files(d)
        if not files:
            raise ConfigError(
                f"Class folder {d} holds no images (recognised extensions: "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))})."
            )
        items += [(p, label_of[d.name]) for p in files]
    return names, items


def stratified_split(
    labels: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split: round(n * test_fraction) of each class (at least 1 when the class
    has 2 or more images, never all of it) goes to the test side. Returns sorted index tensors."""
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1) if len(idx) > 1 else 0
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values


def split_layout_dirs(root: Path) -> tuple[Path, Path] | None:
    """(train, test) folders of a pre-split image folder, or None for a single class tree."""
    train = root / "train"
    tests = [root / n for n in ("test", "val") if (root / n).is_dir()]
    if not train.is_dir():
        return None
    if not tests:
        raise ConfigError(
            f"{root} has a train/ folder but neither test/ nor val/; provide one, or use a single "
            f"{root}/<class>/<images> tree (split automatically)."
        )
    return train, tests[0]


@DATASETS.register("imagefolder:", help="Image tree: PATH/{train,test}/<class>/* or PATH/<class>/*")
def load_imagefolder(
    path: str,
    *,
    data_dir: Path | None = None,
    download: bool = False,
    size: int = 32,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetBundle:
    """Images from class folders, decoded with PIL and resized to ``size`` (default 32, squashing
    non-square images). Uses ``train/`` + ``test/`` (or ``val/``) when present, else splits one
    ``<class>/`` tree with a seeded stratified split. Normalisation constants come from the train
    images. ``data_dir`` resolves a relative path; ``download`` does not apply."""
    check_range("imagefolder option size", size, 1)
    check_choice("imagefolder option channels", channels, (1, 3))
    check_range(
        "imagefolder option test_fraction",
        test_fraction,
        0,
        1,
        low_inclusive=False,
        high_inclusive=False,
    )
    root = Path(path).expanduser()
    if not root.is_absolute() and data_dir is not None and not root.exists():
        root = data_dir / root
    if not root.is_dir():
        raise MissingDataError(f"Image folder {root} does not exist (from 'imagefolder:{path}').")
    dirs = split_layout_dirs(root)
    if dirs is not None:
        classes, train_items = scan_class_tree(dirs[0])
        _, test_items = scan_class_tree(dirs[1], classes)
        paths = [p for p, _ in train_items] + [p for p, _ in test_items]
        labels = torch.tensor([y for _, y in train_items] + [y for _, y in test_items])
        train_idx = torch.arange(len(train_items))
        test_idx = torch.arange(len(train_items), len(paths))
    else:
        classes, items = scan_class_tree(root)
        paths = [p for p, _ in items]
        labels = torch.tensor([y for _, y in items])
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    log.info("Decoding %d images of %d classes from %s", len(paths), len(classes), root)
    images = decode_images(paths, channels, size)
    train = TensorImages(images[train_idx], labels[train_idx])
    test = TensorImages(images[test_idx], labels[test_idx])
    mean, std = channel_stats(train.images)
    info = DatasetInfo(
        f"imagefolder:{path}",
        len(classes),
        InputSpec(channels, size, mean, std),
        tuple(classes),
        "imagefolder",
    )
    return DatasetBundle(info, train, test)


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


def synthetic_images(
    patterns: torch.Tensor, n: int, generator: torch.Generator, noise: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy copies of the class patterns (float [K, C, S, S] in [0, 1]), classes balanced."""
    k = patterns.shape[0]
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=generator)]
    x = patterns[labels] + noise * torch.randn((n, *patterns.shape[1:]), generator=generator)
    return x.mul(255).round().clamp(0, 255).to(torch.uint8), labels


@DATASETS.register("synthetic", help="Tiny deterministic class-pattern images for tests")
def load_synthetic(
    *,
    data_dir: Path | None = None,
    download: bool = False,
    num_classes: int = 10,
    n_train: int = 512,
    n_test: int = 128,
    size: int = 16,
    channels: int = 1,
    seed: int = 0,
) -> DatasetBundle:
    """Each class is a fixed smooth random pattern; images are that pattern plus pixel noise, so
    a small CNN learns it in a few epochs. Same options → identical tensors."""
    check_range("synthetic option num_classes", num_classes, 2)
    check_range("synthetic option n_train", n_train, num_classes)
    check_range("synthetic option n_test", n_test, 1)
    check_range("synthetic option size", size, 4)
    check_choice("synthetic option channels", channels, (1, 3))
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((num_classes, channels, max(2, size // 4), max(2, size // 4)), generator=g)
    # Smooth (low-resolution) patterns survive pooling layers, unlike per-pixel noise patterns.
    patterns = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bilinear", align_corners=False
    )
    train = TensorImages(*synthetic_images(patterns, n_train, g))
    test = TensorImages(*synthetic_images(patterns, n_test, g))
    mean, std = channel_stats(train.images)
    names = tuple(f"class_{i}" for i in range(num_classes))
    info = DatasetInfo(
        "synthetic", num_classes, InputSpec(channels, size, mean, std), names, "synthetic"
    )
    return DatasetBundle(info, train, test)
