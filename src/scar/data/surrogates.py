"""Surrogate (out-of-distribution) image sources for distillation-based unlearning.

Every source returns a :class:`TensorImages`; :func:`load_surrogate` then resizes it to the
dataset's channels x size x size with :func:`resize_images`, so the model normalises surrogate
images exactly like its own data. Labels are the source's labels when it has any, else -1; methods
must not use them as targets of the model's classes.

Sources are registered in :data:`SURROGATES` with the signature
``source(arg?, *, channels, size, n, seed, data_dir) -> TensorImages`` (``n`` None = the source's
default count; ``arg`` only for parametrised names such as ``imagefolder:PATH``).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scar.data.base import TensorImages, resize_images
from scar.data.datasets import (
    decode_image,
    decode_images_skipping,
    list_class_dirs,
    list_image_files,
    load_dataset,
)
from scar.errors import ConfigError, MissingDataError, check_choice, check_range, optional_import
from scar.registry import Registry

log = logging.getLogger(__name__)

#: name → source(arg?, *, channels, size, n, seed, data_dir) -> TensorImages.
SURROGATES: Registry[Callable[..., TensorImages]] = Registry("surrogate source")

#: Default image count of the generated sources (gaussian-noise, natural-patches).
DEFAULT_GENERATED = 5000

#: Real photographs bundled with scikit-image (no download needed). Synthetic drawings
#: (colorwheel, checkerboard, logo, binary horse) are left out: they are not natural images.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page",
    "retina", "rocket", "text",
)  # fmt: skip


#: At most this many surrogate images per request (the paper uses a few thousand; SCAR's
#: default is 5000). A larger --surrogate-n is a typo, not a plan.
MAX_SURROGATE_IMAGES = 1_000_000


def check_fits_in_memory(nbytes: int, what: str, share: float = 0.5) -> None:
    """ConfigError when ``nbytes`` exceed ``share`` of the memory this machine has available
    (Linux; elsewhere nothing is checked), instead of being killed by the OOM killer later."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return
    if nbytes > share * avail:
        raise ConfigError(
            f"{what} need {nbytes / 2**30:.1f} GiB, more than {share:.0%} of the "
            f"{avail / 2**30:.1f} GiB of memory available; ask for fewer."
        )


def load_surrogate(
    name: str,
    *,
    channels: int,
    size: int,
    n: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    exclude_dataset: str | None = None,
) -> TensorImages:
    """Load surrogate images from source ``name``, resized to ``channels`` x ``size`` x ``size``.

    ``exclude_dataset`` names the dataset being unlearned: ``dataset:<that name>`` is refused,
    because its own train images are not out-of-distribution.
    """
    check_choice("surrogate channels", channels, (1, 3))
    check_range("surrogate size", size, 1)
    if n is not None:
        check_range("surrogate n", n, 1, MAX_SURROGATE_IMAGES)
        check_fits_in_memory(n * channels * size * size, f"{n} surrogate images of "
                             f"{channels}x{size}x{size}")
    source, arg = SURROGATES.resolve(name)
    if exclude_dataset is not None and name == f"dataset:{exclude_dataset}":
        raise ConfigError(
            f"Surrogate source {name!r} is the dataset being unlearned; surrogate images must be "
            f"out-of-distribution: use another source (e.g. natural-patches, or dataset:<other>)."
        )
    args = (arg,) if arg is not None else ()
    root = Path(data_dir).expanduser() if data_dir is not None else None
    raw = source(*args, channels=channels, size=size, n=n, seed=seed, data_dir=root)
    out = TensorImages(resize_images(raw.images, channels, size), raw.labels)
    log.info("Surrogate %s: %d images of %dx%dx%d", name, len(out), channels, size, size)
    return out


def subsample(total: int, n: int | None, seed: int, what: str) -> torch.Tensor:
    """Seeded sorted sample of ``n`` positions out of ``total`` (all of them when n is None)."""
    if n is None:
        return torch.arange(total)
    if n > total:
        raise ConfigError(f"Surrogate source {what} holds {total} images; cannot take n={n}.")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:n].sort().values


def folder_label(rel: Path, label_of: dict[str, int]) -> int:
    """Label of a file from its top-level folder (-1 for a file directly in the root)."""
    return label_of.get(rel.parts[0], -1) if len(rel.parts) > 1 else -1


def unlabelled(images: torch.Tensor) -> TensorImages:
    return TensorImages(images, torch.full((images.shape[0],), -1, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@SURROGATES.register("imagefolder:", help="All images under PATH (recursively), decoded with PIL")
def imagefolder_source(
    path: str, *, channels: int, size: int, n: int | None, seed: int, data_dir: Path | None
) -> TensorImages:
    """Labels are the index of the top-level sub-folder (sorted), -1 for files directly in PATH."""
    root = Path(path).expanduser()
    if not root.is_absolute() and data_dir is not None and not root.exists():
        root = data_dir / root
    if not root.is_dir():
        raise MissingDataError(f"Surrogate image folder {root} does not exist.")
    files = list_image_files(root)
    if not files:
        raise ConfigError(f"Surrogate image folder {root} holds no image files.")
    chosen = [files[i] for i in subsample(len(files), n, seed, f"imagefolder:{path}").tolist()]
    top = {d.name: i for i, d in enumerate(list_class_dirs(root))}
    images, kept = decode_images_skipping(chosen, channels, size, f"Surrogate folder {root}")
    labels = [folder_label(chosen[i].relative_to(root), top) for i in kept]
    return TensorImages(images, torch.tensor(labels))


@SURROGATES.register("gaussian-noise", help="i.i.d. Gaussian pixels (mean 127.5, std 64)")
def gaussian_noise_source(
    *, channels: int, size: int, n: int | None, seed: int, data_dir: Path | None
) -> TensorImages:
    """Per-pixel noise clipped to [0, 255]; the paper reports it does not work as a surrogate."""
    n = DEFAULT_GENERATED if n is None else n
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, 1024):
        k = min(1024, n - start)
        x = torch.randn((k, channels, size, size), generator=g).mul_(64.0).add_(127.5)
        chunks.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return unlabelled(torch.cat(chunks))


@functools.lru_cache(maxsize=1)
def skimage_photos() -> tuple[torch.Tensor, ...]:
    """The bundled scikit-image photographs as uint8 [C, H, W] tensors (C = 1 or 3)."""
    data = optional_import("skimage.data", "images")
    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception as exc:  # a photo missing from this scikit-image version: skip it
            log.warning("scikit-image photo %r unavailable (%s); skipping it", name, exc)
            continue
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            continue
        t = torch.from_numpy(img.copy())
        photos.append(t[None] if t.dim() == 2 else t[..., :3].permute(2, 0, 1).contiguous())
    if not photos:
        raise MissingDataError("No scikit-image sample photographs could be loaded.")
    return tuple(photos)


def random_boxes(
    heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Square boxes (x1, y1, x2, y2): side 10-80 % of the shorter image side, random position."""
    short = torch.minimum(heights, widths).double()
    side = short * (0.1 + 0.7 * torch.rand(len(short), generator=generator, dtype=torch.float64))
    x1 = torch.rand(len(short), generator=generator, dtype=torch.float64) * (widths - side)
    y1 = torch.rand(len(short), generator=generator, dtype=torch.float64) * (heights - side)
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1).float()


def pyramid(image: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """float [1, C, H, W] versions of uint8 [C, H, W] at scales 1, 1/2, 1/4, … (2x2 averages)."""
    out = [image.float()[None]]
    for _ in range(levels - 1):
        if min(out[-1].shape[2:]) < 2:
            break
        out.append(torch.nn.functional.avg_pool2d(out[-1], 2))
    return out


def crop_and_resize(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of uint8 [C, H, W] at ``boxes`` (x1, y1, x2, y2), resized to size x size, as uint8.

    Each crop is taken from the pyramid level where it is 1-2x the output size, and roi_align's
    adaptive grid then averages the (at most 2x2) source pixels under each output pixel: the
    result is anti-aliased and costs the same for large and small crops.
    """
    from torchvision.ops import roi_align

    side = (boxes[:, 2] - boxes[:, 0]).clamp_min(1.0)
    level = torch.log2(side / size).floor().clamp_min(0).long()
    levels = pyramid(image, int(level.max()) + 1)
    level = level.clamp_max(len(levels) - 1)
    out = torch.empty((len(boxes), image.shape[0], size, size), dtype=torch.uint8)
    for lv in level.unique().tolist():
        pos = torch.nonzero(level == lv).flatten()
        crops = roi_align(
            levels[lv],
            [boxes[pos]],
            output_size=size,
            spatial_scale=0.5**lv,
            sampling_ratio=-1,
            aligned=True,
        )
        out[pos] = crops.round().clamp(0, 255).to(torch.uint8)
    return out


@SURROGATES.register("natural-patches", help="Random crops of scikit-image's bundled photographs")
def natural_patches_source(
    *, channels: int, size: int, n: int | None, seed: int, data_dir: Path | None
) -> TensorImages:
    """Random-position, random-scale square crops with random horizontal / vertical flips."""
    n = DEFAULT_GENERATED if n is None else n
    photos = skimage_photos()
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(photos), (n,), generator=g)
    heights = torch.tensor([p.shape[1] for p in photos])[which]
    widths = torch.tensor([p.shape[2] for p in photos])[which]
    boxes = random_boxes(heights, widths, g)
    hflip = torch.rand(n, generator=g) < 0.5
    vflip = torch.rand(n, generator=g) < 0.5
    out = torch.empty((n, channels, size, size), dtype=torch.uint8)
    for i, photo in enumerate(photos):
        pos = torch.nonzero(which == i).flatten()
        if pos.numel():
            out[pos] = resize_images(crop_and_resize(photo, boxes[pos], size), channels, size)
    out = torch.where(hflip[:, None, None, None], out.flip(3), out)
    out = torch.where(vflip[:, None, None, None], out.flip(2), out)
    return unlabelled(out.contiguous())


def ellipse_masks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """[n, 1, size, size] random axis-aligned ellipses (semi-axes 40–100% of the half-size,
    centre jittered by up to 15%)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    a = 0.4 + 0.6 * torch.rand(n, 1, 1, generator=g)
    b = 0.4 + 0.6 * torch.rand(n, 1, 1, generator=g)
    cx = 0.3 * (torch.rand(n, 1, 1, generator=g) - 0.5)
    cy = 0.3 * (torch.rand(n, 1, 1, generator=g) - 0.5)
    return ((((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2) <= 1)[:, None]


@SURROGATES.register(
    "natural-objects",
    help="natural-patches cut out by a random ellipse on black (object-on-dark look, FMNIST/MNIST)",
)
def natural_objects_source(
    *, channels: int, size: int, n: int | None, seed: int, data_dir: Path | None
) -> TensorImages:
    """Natural-photo patches inside a random ellipse on a black background.

    Why: datasets of centred objects on a dark background (Fashion-MNIST, MNIST) see plain photo
    crops as one class — measured with the default Fashion-MNIST model, 96% of 5000 plain patches
    were predicted "bag" — so distilling on them protects almost no decision boundary. The same
    patches cut out on black were spread over 8 of the 10 classes.
    """
    patches = natural_patches_source(channels=channels, size=size, n=n, seed=seed,
                                     data_dir=data_dir).images
    g = torch.Generator().manual_seed(seed + 7919)
    mask = ellipse_masks(len(patches), size, g)
    return unlabelled(torch.where(mask, patches, torch.zeros_like(patches)).contiguous())


@SURROGATES.register("digits", help="scikit-learn's 1797 8x8 handwritten digits, upscaled")
def digits_source(
    *, channels: int, size: int, n: int | None, seed: int, data_dir: Path | None
) -> TensorImages:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    idx = subsample(len(images), n, seed, "digits")
    return TensorImages(images[idx].contiguous(), torch.as_tensor(digits.target)[idx])


@SURROGATES.register("dataset:", help="Train images of another registered dataset")
def dataset_source(
    name: str, *, channels: int, size: int, n: int | None, seed: int, data_dir: Path | None
) -> TensorImages:
    """E.g. ``dataset:mnist`` for Fashion-MNIST, ``dataset:cifar100`` for CIFAR-10 (no download)."""
    train = load_dataset(name, data_dir=data_dir).train
    idx = subsample(len(train), n, seed, f"dataset:{name}")
    return train.subset(idx).materialize()


# --------------------------------------------------------------------------------------------
# Building a surrogate subset (backs `scar surrogate build`)
# --------------------------------------------------------------------------------------------


def build_surrogate_subset(src: str | Path, out: str | Path, per_class: int, seed: int) -> dict:
    """Copy ``per_class`` randomly chosen images of every ``src/<class>/`` into ``out/<class>/``.

    Images are found recursively inside each class folder (so ImageNet's ``<wnid>/*.JPEG`` and
    TinyImageNet's ``<wnid>/images/*.JPEG`` both work) and copied, not linked, under a name made of
    their path inside the class folder. A class with fewer images than ``per_class`` contributes all
    it has and is reported (warning and ``short_classes`` in the summary) rather than failing the
    whole build. ``out`` must not already hold files, so that the subset is exactly what was asked.
    Files that cannot be decoded are not copied (warning; ``skipped_undecodable`` lists them).
    Returns ``{"classes", "images", "per_class", "seed", "source", "out", "short_classes",
    "skipped_undecodable"}``.
    """
    check_range("per_class", per_class, 1)
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise MissingDataError(f"Surrogate source tree {src} does not exist.")
    classes = list_class_dirs(src)
    if not classes:
        raise ConfigError(f"No class folders in {src}; expected {src}/<class>/<image files>.")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"Output folder {out} is not empty; choose a new or empty folder.")
    plan = {
        d.name: choose_files(list_image_files(d), per_class, seed, i) for i, d in enumerate(classes)
    }
    if not any(plan.values()):
        raise ConfigError(f"The class folders under {src} hold no image files.")
    short = {c: len(files) for c, files in plan.items() if len(files) < per_class}
    if short:
        log.warning(
            "%d class(es) have fewer than %d images; all of their images were taken: %s",
            len(short),
            per_class,
            dict(list(short.items())[:10]),
        )
    total, skipped = 0, []
    for class_dir in classes:
        for path in plan[class_dir.name]:
            try:  # copy only what the loader will be able to read
                decode_image(path, 3)
            except ConfigError:
                skipped.append(str(path.relative_to(src)))
                continue
            rel = path.relative_to(class_dir)
            dest = out / class_dir.name / "_".join(rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            total += 1
    if skipped:
        log.warning("skipped %d image files that cannot be decoded: %s%s", len(skipped),
                    ", ".join(skipped[:3]), " …" if len(skipped) > 3 else "")
    log.info("Copied %d images of %d classes from %s to %s", total, len(classes), src, out)
    return {
        "classes": len(classes),
        "images": total,
        "per_class": per_class,
        "seed": seed,
        "source": str(src),
        "out": str(out),
        "short_classes": short,
        "skipped_undecodable": skipped,
    }


def choose_files(files: list[Path], k: int, seed: int, stream: int) -> list[Path]:
    """Seeded choice of ``k`` files (all when fewer); ``stream`` decorrelates the classes."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stream)
    idx = torch.randperm(len(files), generator=g)[:k].sort().values
    return [files[i] for i in idx.tolist()]
