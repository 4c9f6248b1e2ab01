"""Experiment grids: a YAML file → validated :class:`Grid` → one :class:`RunSpec` per run.

Format (every key but ``dataset``, ``scenario`` and the forget amount is optional)::

    name: fmnist-cr            # used for the default run folder runs/<name> (else the file stem)
    dataset: fashion-mnist     # or a list of datasets
    dataset_options: {}        # keyword options of the dataset loader (synthetic: num_classes, ...;
                               #   fashion-mnist / mnist: channels: 3 for RGB-only models)
    model: fastcnn             # or a list; null → the dataset recipe's default architecture;
                               #   a list entry may be a mapping with its own settings (below)
    model_kwargs: {}           # keyword options of the model builder (fastcnn: width, ...);
                               #   timm:/tv: models: pretrained: FILE (or true: the local
                               #   timm / torch hub cache) fine-tunes from those weights
    data_dir: null             # where datasets live (else $SCAR_DATA_DIR, then system locations)
    download: false            # allow downloading a missing dataset (and pretrained weights)
    device: auto               # auto | cpu | cuda | cuda:N  (`scar run --device` overrides it)
    train: {epochs: 6}         # recipe overrides for the original and oracle models
    scenario: CR               # CR (class removal) | HR (random, "homogeneous" removal)
    classes: [0, 1, 2]         # CR: one run per entry; an entry may be a list ([3, 5]) to remove
                               #     several classes at once; "all" = every class, one at a time
    seeds: [0]                 # HR: one forget set per seed; CR: seeds of the unlearning call
    forget_fraction: 0.1       # HR only: fraction of the train set (or forget_count: N images)
    surrogate: natural-patches # surrogate source (default per dataset, see experiments/unlearn.py)
    surrogate_n: 5000          # number of surrogate images
    mia: true                  # run the membership-inference attack
    mia_variant: balanced      # balanced | reference (protocol.md)
    audit: null                # rmia | lira: the likelihood-ratio membership audit with
                               #   reference models (trained once, cached in checkpoints/)
    audit_references: 4        # number of reference models of the audit (even)
    relearn: false             # true or {max_steps: 100, ...}: also measure each model's relearn
                               #   time (evaluation/relearn.py; fine-tunes a copy per model)
    oracles: all               # all | none | the class entries (CR) / seeds (HR) that get one
    preset: null               # named hyperparameters of every method (`scar list presets`)
    checkpoint: null           # an existing original of the grid's one model instead of training
                               #   one (a SCAR checkpoint, or a plain state dict of 'model';
                               #   per model: a 'checkpoint' key in its mapping)
    methods:                   # name → hyperparameters ({} or null = the preset's, else defaults)
      scar: {}
      scar_self_forget: {}
      negative_gradient: {lr: 1e-4}
      duck: {preset: null}     # a method's own 'preset' replaces the grid's (null: defaults)

**Presets.** ``preset: reference`` gives every listed method the values of that preset
(:mod:`scar.methods.presets`, for the run's dataset); the method's own mapping sets values over
them. Each run records its preset (``RunSpec.preset``, the ``preset`` of its results row), and a
run with a preset gets another id than one without.

**Per-model settings.** An entry of the ``model`` list may be a mapping (keys ``name``, required,
and optionally ``dataset_options``, ``model_kwargs``, ``train``, ``checkpoint``); each of its
mappings is set, key by key, over the grid-level mapping of the same name, for that model only::

    model:
      - fastcnn                                   # the grid-level settings
      - {name: resnet18, train: {epochs: 10}}     # epochs 10; other grid 'train' keys kept
      - name: tv:mobilenet_v3_small               # torchvision models take RGB input only
        dataset_options: {channels: 3}            #   so Fashion-MNIST is loaded as 3 channels
        train: {epochs: 5, lr: 0.05}

A model may appear once per dataset (report tables are per dataset and model). Run ids and the
cached checkpoints depend on the resolved (merged) per-model settings.

**Oracles.** Every request (dataset x model x forget set) gets an ``original`` row: the cached
original checkpoint, evaluated like any method; it gives A_or for every AUS of the request. With
``oracles: all`` (the default) every request also gets a ``retrain`` row, the oracle retrained
without the forget set (trained once and cached). ``oracles: none`` trains no oracle; a list
trains one only for those requests: CR class entries as written in ``classes`` (``[0, [3, 5]]``),
HR seeds from ``seeds``. Requests without an oracle have no ``retrain`` row; reports show the
methods against the original only. Listing ``retrain`` (or ``original``) under ``methods`` is
allowed and changes nothing (with ``oracles: none`` it is an error); neither takes
hyperparameters (the oracle is trained with the ``train`` overrides).

Everything is validated before anything runs: unknown keys (with "did you mean"), unknown
datasets, models, methods and surrogate sources, hyperparameters (each method is built once),
class ids (when the class count is known without loading images), scenario and amounts.

A run's id is the first 12 hex digits of the SHA-1 of the canonical JSON of its *resolved* spec:
the model name after the recipe default is applied, every hyperparameter of the method (defaults
included, so a changed default gives new ids), the surrogate actually used (none for methods that
do not read one). Where data lives (``data_dir``) and where it runs (``device``) are not part of it.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from scar.data.forget import SCENARIOS, ForgetSpec, validate_amount, validate_classes
from scar.errors import ConfigError
from scar.evaluation.lr_attack import DEFAULT_REFERENCES

log = logging.getLogger(__name__)

#: Top-level keys of a grid file.
GRID_KEYS: tuple[str, ...] = (
    "name", "dataset", "dataset_options", "model", "model_kwargs", "data_dir", "download",
    "device", "train", "scenario", "classes", "seeds", "forget_fraction", "forget_count",
    "surrogate", "surrogate_n", "mia", "mia_variant", "oracles", "preset", "methods",
    "checkpoint", "audit", "audit_references", "relearn",
)  # fmt: skip
#: Keys of a mapping entry of the ``model`` list.
MODEL_ENTRY_KEYS: tuple[str, ...] = ("name", "dataset_options", "model_kwargs", "train",
                                     "checkpoint")
#: The entry keys that are mappings, set key by key over the grid-level mapping of that name.
MERGED_KEYS: tuple[str, ...] = ("dataset_options", "model_kwargs", "train")
#: The words ``oracles`` takes besides a list of requests.
ORACLE_CHOICES = ("all", "none")
#: Rows every request gets, whatever the methods: the original model and the oracle.
REFERENCE_METHODS = ("original", "retrain")
#: Key of a method's mapping that names its preset (not a hyperparameter).
PRESET_KEY = "preset"
#: Seed of the cached original / oracle trainings, and of the reference rows of CR requests
#: (in HR, a request's reference rows carry its forget-set seed).
TRAIN_SEED = 0

Items = tuple[tuple[str, Any], ...]


# ---------------------------------------------------------------- the grid
@dataclass(frozen=True)
class ModelEntry:
    """One architecture of a grid with its resolved settings: the grid-level dataset options,
    model kwargs and training overrides with the entry's own keys set on top."""

    name: str | None  # None → the dataset recipe's default architecture
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # an existing original (no training); else one is trained

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else "(the recipe's default)"


@dataclass(frozen=True)
class Grid:
    """A validated grid (see the module docstring for the file format).

    ``dataset_options``, ``model_kwargs`` and ``train`` are the grid-level mappings; what each
    model uses is in its :class:`ModelEntry` (``models``).
    """

    datasets: tuple[str, ...]
    scenario: str
    models: tuple[ModelEntry, ...] = (ModelEntry(None),)
    name: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    classes: tuple[tuple[int, ...], ...] | str | None = None  # "all" or class groups (CR)
    seeds: tuple[int, ...] = (0,)
    forget_fraction: float | None = None
    forget_count: int | None = None
    surrogate: str | None = None
    surrogate_n: int | None = None
    mia: bool = True
    mia_variant: str = "balanced"
    audit: str | None = None  # the membership audit's attack (evaluation/lr_attack.py)
    audit_references: int = DEFAULT_REFERENCES
    relearn: Items = ()  # the relearn settings' items; () = off (grid key 'relearn')
    oracles: str | tuple = "all"  # "all", "none", or CR class groups / HR seeds
    preset: str | None = None  # of every method without its own 'preset' key
    methods: tuple[tuple[str, dict[str, Any]], ...] = ()  # a mapping may hold 'preset'

    def with_device(self, device: str | None) -> Grid:
        return self if device is None else replace(self, device=_device(device))


def load_grid(source: str | Path | Mapping[str, Any]) -> Grid:
    """Read (a YAML file) and validate a grid; every error is a ConfigError naming the key."""
    raw = _read_yaml(Path(source)) if isinstance(source, (str, Path)) else dict(source)
    return parse_grid(raw)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"grid file {path} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start}); save it as UTF-8.") from exc

    class UniqueKeyLoader(yaml.SafeLoader):
        """PyYAML keeps the last of two equal keys silently (a method listed twice would run
        once, with the second settings): refuse instead."""

    def unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                raise ConfigError(
                    f"grid file {path}, line {key_node.start_mark.line + 1}: key {key!r} "
                    "appears twice in one mapping; list it once (to compare two settings of "
                    "one method, run a second grid into the same --out: the report gives each "
                    "setting its own row)."
                )
            seen.add(key)
        return loader.construct_mapping(node)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                    unique_mapping)
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"grid file {path} must hold a mapping of keys ({', '.join(GRID_KEYS)}); got "
            f"{type(raw).__name__}."
        )
    return raw


def parse_grid(raw: Mapping[str, Any]) -> Grid:
    check_keys("grid", raw, GRID_KEYS)
    for key in ("dataset", "scenario"):
        if raw.get(key) is None:
            raise ConfigError(f"grid key {key!r} is required.")
    scenario = str(raw["scenario"]).upper()
    if scenario not in SCENARIOS:
        raise ConfigError(
            f"grid key 'scenario' must be one of {list(SCENARIOS)}; got {raw['scenario']!r}."
        )
    mia_variant = raw.get("mia_variant", "balanced")
    from scar.evaluation.mia import MIA_VARIANTS

    if mia_variant not in MIA_VARIANTS:
        raise ConfigError(
            f"grid key 'mia_variant' must be one of {list(MIA_VARIANTS)}; got {mia_variant!r}."
        )
    shared = {key: _mapping(key, raw.get(key)) for key in MERGED_KEYS}
    grid = Grid(
        datasets=_names("dataset", raw["dataset"]),
        scenario=scenario,
        models=_with_checkpoint(_models(raw.get("model"), shared),
                                _optional_str("checkpoint", raw.get("checkpoint"))),
        name=_name(raw.get("name")),
        data_dir=_optional_str("data_dir", raw.get("data_dir")),
        download=_bool("download", raw.get("download", False)),
        device=_device(raw.get("device", "auto")),
        **shared,
        classes=_classes(raw.get("classes")),
        seeds=_seeds(raw.get("seeds", [0])),
        forget_fraction=_fraction(raw.get("forget_fraction")),
        forget_count=_optional_int("forget_count", raw.get("forget_count"), low=1),
        surrogate=_optional_str("surrogate", raw.get("surrogate")),
        surrogate_n=_optional_int("surrogate_n", raw.get("surrogate_n"), low=1),
        mia=_bool("mia", raw.get("mia", True)),
        mia_variant=mia_variant,
        **_audit(raw),
        relearn=_relearn(raw.get("relearn")),
        oracles=_oracles(raw.get("oracles"), scenario),
        preset=_optional_str("preset", raw.get("preset")),
        methods=_methods(raw.get("methods")),
    )
    validate_grid(grid)
    return grid


def _audit(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Grid keys 'audit' (an attack of :data:`~scar.evaluation.lr_attack.ATTACKS` or null) and
    'audit_references' (an even integer >= 2)."""
    from scar.evaluation.lr_attack import ATTACKS

    audit = _optional_str("audit", raw.get("audit"))
    if audit is not None and audit not in ATTACKS:
        raise ConfigError(f"grid key 'audit' must be one of {ATTACKS.names()} or null; got "
                          f"{audit!r}.")
    count = _optional_int("audit_references", raw.get("audit_references"), low=2)
    count = DEFAULT_REFERENCES if count is None else count
    if count % 2:
        raise ConfigError(f"grid key 'audit_references' must be even (reference models come in "
                          f"complementary pairs); got {count}.")
    return {"audit": audit, "audit_references": count}


def _relearn(value: Any) -> Items:
    """Grid key 'relearn': false / null (off), true (the defaults) or a mapping of
    :class:`~scar.evaluation.relearn.RelearnSettings`; stored as all its items (validated)."""
    from scar.evaluation.relearn import RelearnSettings

    settings = RelearnSettings.parse(value)
    return () if settings is None else freeze(settings.to_dict())


def relearn_settings(items: Items):
    """The :class:`~scar.evaluation.relearn.RelearnSettings` of a grid's / run's items, or None."""
    if not items:
        return None
    from scar.evaluation.relearn import RelearnSettings

    return RelearnSettings(**dict(items))


def check_keys(where: str, raw: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """Unknown keys → ConfigError naming the key, a close match, and every allowed key."""
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {where} key {key!r}.{hint} Allowed keys: {', '.join(allowed)}."
            )


# ---------------------------------------------------------------- value parsers
def _names(key: str, value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"grid key {key!r} must be a name or a list of names; got {value!r}.")
    return tuple(values)


def _is_model_name(value: Any) -> bool:
    return value is None or (isinstance(value, str) and bool(value))


def _models(value: Any, shared: Mapping[str, dict[str, Any]]) -> tuple[ModelEntry, ...]:
    """The ``model`` entries, each with the grid-level ``shared`` mappings merged under its own."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_model_name(v) or isinstance(v, dict) for v in values):
        raise ConfigError(
            f"grid key 'model' must be a model name, a list of names or of mappings "
            f"({{name: ..., {', '.join(MODEL_ENTRY_KEYS[1:])}}}), or null (the recipe's "
            f"default); got {value!r}."
        )
    entries = []
    for i, v in enumerate(values):
        if not isinstance(v, dict):
            entries.append(ModelEntry(v, **{k: dict(m) for k, m in shared.items()}))
            continue
        where = f"model[{i}]"
        check_keys(where, v, MODEL_ENTRY_KEYS)
        if "name" not in v or not _is_model_name(v["name"]):
            raise ConfigError(
                f"grid key '{where}' needs 'name': a model name (or null for the recipe's "
                f"default); got {v.get('name', '(missing)')!r}."
            )
        own = {k: _mapping(f"{where}.{k}", v.get(k)) for k in shared}
        entries.append(ModelEntry(v["name"], **{k: {**shared[k], **own[k]} for k in shared},
                                  checkpoint=_optional_str(f"{where}.checkpoint",
                                                           v.get("checkpoint"))))
    return tuple(entries)


def _with_checkpoint(entries: tuple[ModelEntry, ...], checkpoint: str | None
                     ) -> tuple[ModelEntry, ...]:
    """The grid-level ``checkpoint``: the original of the grid's one model."""
    if checkpoint is None:
        return entries
    if len(entries) != 1 or entries[0].checkpoint is not None:
        raise ConfigError(
            "grid key 'checkpoint' is the original of one model, but the grid lists "
            f"{len(entries)} models; give each model its own ('model: [{{name: ..., checkpoint: "
            "...}]') or list one model."
        )
    return (replace(entries[0], checkpoint=checkpoint),)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(
            f"grid key 'name' must be a folder-safe name (letters, digits, '.', '_', '-'); got "
            f"{value!r}."
        )
    return value


def _mapping(key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"grid key {key!r} must be a mapping of option → value; got {value!r}.")
    return dict(value)


def _optional_str(key: str, value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        raise ConfigError(f"grid key {key!r} must be a string or null; got {value!r}.")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"grid key {key!r} must be true or false; got {value!r}.")
    return value


def _device(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise ConfigError(
            f"grid key 'device' must be one of auto, cpu, cuda, cuda:N; got {value!r}."
        )
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(key: str, value: Any, low: int | None = None) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ConfigError(f"grid key {key!r} must be an integer{bound} or null; got {value!r}.")
    return value


def _fraction(value: Any) -> float | None:
    if value is None:
        return None
    try:  # YAML 1.1 reads "1e-1" as a string
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < 1:
        raise ConfigError(f"grid key 'forget_fraction' must be in (0, 1); got {value!r}.")
    return float(number)


def _seeds(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_int(v) and v >= 0 for v in values):
        raise ConfigError(
            f"grid key 'seeds' must be a non-negative integer or a list of them; got {value!r}."
        )
    if len(set(values)) != len(values):
        raise ConfigError(f"grid key 'seeds' must not repeat a seed; got {value!r}.")
    return tuple(values)


def _classes(value: Any) -> tuple[tuple[int, ...], ...] | str | None:
    if value is None or value == "all":
        return value
    entries = value if isinstance(value, list) else [value]
    groups = tuple(tuple(e) if isinstance(e, list) else (e,) for e in entries)
    if not groups or not all(g and all(_is_int(c) and c >= 0 for c in g) for g in groups):
        raise ConfigError(
            "grid key 'classes' must be \"all\" or a list of class ids (an entry may itself be a "
            f"list, to remove several classes in one run); got {value!r}."
        )
    for g in groups:
        validate_classes(g)
    groups = tuple(tuple(sorted(g)) for g in groups)
    if len(set(groups)) != len(groups):
        raise ConfigError(f"grid key 'classes' lists the same request twice; got {value!r}.")
    return groups


def _oracles(value: Any, scenario: str) -> str | tuple:
    """"all" (also for null), "none", or the requests that get an oracle: CR class groups
    (sorted, like ``classes``), HR seeds. Checked against ``classes`` / ``seeds`` later."""
    if value is None:
        return "all"
    if value in ORACLE_CHOICES:
        return value
    if isinstance(value, list) and value:
        if scenario == "CR":
            groups = tuple(tuple(e) if isinstance(e, list) else (e,) for e in value)
            if all(g and all(_is_int(c) and c >= 0 for c in g) for g in groups):
                return tuple(dict.fromkeys(tuple(sorted(g)) for g in groups))
        elif all(_is_int(v) and v >= 0 for v in value):
            return tuple(dict.fromkeys(value))
    what = "class entries of 'classes'" if scenario == "CR" else "seeds of 'seeds'"
    raise ConfigError(
        f"grid key 'oracles' must be one of {list(ORACLE_CHOICES)} or a non-empty list of the "
        f"{what} whose requests get an oracle; got {value!r}."
    )


def _methods(value: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(
            f"grid key 'methods' must map method names to hyperparameters (a mapping, {{}} or "
            f"null); got {value!r}."
        )
    out = []
    for name, hparams in value.items():
        if hparams is not None and not isinstance(hparams, dict):
            raise ConfigError(
                f"grid key 'methods.{name}' must be a mapping of hyperparameters, {{}} or null; "
                f"got {hparams!r}."
            )
        out.append((str(name), dict(hparams or {})))
    return tuple(out)


# ---------------------------------------------------------------- cross-checks (registries)
def validate_grid(grid: Grid) -> None:
    """Everything that can be checked without loading images or training."""
    from scar.data.datasets import (
        DATASETS,
        KNOWN_DATASETS,
        RESERVED_KEYWORDS,
        check_channels,
        check_option_types,
        check_options,
    )
    from scar.data.surrogates import SURROGATES
    from scar.models import MODELS
    from scar.training.recipes import recipe_from

    _check_scenario_keys(grid)
    _check_checkpoints(grid)
    for dataset in grid.datasets:
        loader, _ = DATASETS.resolve(dataset)
        for entry in grid.models:
            where = f"dataset {dataset!r} (grid key 'dataset_options', model {entry.label})"
            check_options(where, loader, entry.dataset_options, reserved=RESERVED_KEYWORDS)
            check_option_types(dataset, entry.dataset_options, where)
            if "channels" in entry.dataset_options and dataset in KNOWN_DATASETS:
                check_channels(dataset, entry.dataset_options["channels"])
            num = known_num_classes(dataset, entry.dataset_options)
            if grid.scenario == "CR" and num is not None:
                for group in class_groups(grid, dataset, entry.dataset_options):
                    try:
                        validate_classes(group, num)
                    except ConfigError as exc:
                        raise ConfigError(
                            f"grid key 'classes', dataset {dataset!r}: {exc}"
                        ) from exc
            if grid.scenario == "CR" and isinstance(grid.oracles, tuple):
                _check_oracle_classes(grid, dataset, entry.dataset_options)
    for entry in grid.models:
        if "pretrained" in entry.model_kwargs:  # starting weights, not a builder kwarg
            from scar.models.pretrained import check_request

            try:
                check_request(entry.name, entry.model_kwargs["pretrained"])
            except ConfigError as exc:
                raise ConfigError(f"grid key 'model_kwargs' (model {entry.label}): {exc}") \
                    from exc
        if entry.name is not None:
            builder, _ = MODELS.resolve(entry.name)
            _check_model_kwargs(entry.name, builder, {k: v for k, v in
                                                      entry.model_kwargs.items()
                                                      if k != "pretrained"})
        try:
            recipe_from(None, entry.train)  # unknown training options / bad types
        except ConfigError as exc:
            raise ConfigError(f"grid key 'train' (model {entry.label}): {exc}") from exc
    if grid.surrogate is not None:
        source, arg = SURROGATES.resolve(grid.surrogate)
        if grid.surrogate.startswith("imagefolder:") and arg is not None:
            folder = Path(arg).expanduser()
            if not folder.is_dir() and not (grid.data_dir is not None and not folder.is_absolute()
                                            and (Path(grid.data_dir) / folder).is_dir()):
                raise ConfigError(f"grid key 'surrogate': image folder {folder} does not exist.")
    if grid.oracles == "none" and "retrain" in dict(grid.methods):
        raise ConfigError(
            "grid key 'methods' lists 'retrain' but 'oracles' is \"none\": no oracle is "
            "trained; remove 'retrain' or set oracles to \"all\" or a list of requests."
        )
    if grid.preset is not None:
        from scar.methods.presets import PRESETS

        PRESETS.get(grid.preset)  # UnknownComponentError naming the known presets
    for name, hparams in grid.methods:
        _check_method(name, hparams, grid)


def _check_checkpoints(grid: Grid) -> None:
    """Existing originals (key ``checkpoint``): a file, for one dataset, of a named model."""
    for entry in grid.models:
        if entry.checkpoint is None:
            continue
        if not Path(entry.checkpoint).is_file():
            raise ConfigError(f"grid key 'checkpoint': file {entry.checkpoint} does not exist.")
        if len(grid.datasets) != 1:
            raise ConfigError(
                f"grid key 'checkpoint' ({entry.checkpoint}) is the original of one dataset, but "
                f"the grid lists {list(grid.datasets)}; run one grid per dataset."
            )
        if entry.name is None:
            raise ConfigError(
                f"grid key 'checkpoint' ({entry.checkpoint}) needs the model's name (grid key "
                "'model', e.g. tv:resnet18): a plain state dict does not record its "
                "architecture, and an oracle is trained with it."
            )


def _check_oracle_classes(grid: Grid, dataset: str, options: Mapping[str, Any]) -> None:
    requests = class_groups(grid, dataset, options)
    for group in grid.oracles:
        if group not in requests:
            shown = [g[0] if len(g) == 1 else list(g) for g in requests]
            raise ConfigError(
                f"grid key 'oracles' lists {group[0] if len(group) == 1 else list(group)}, "
                f"which is not a request of 'classes' of dataset {dataset!r}; allowed: {shown}."
            )


def _check_scenario_keys(grid: Grid) -> None:
    if grid.scenario == "CR":
        if grid.classes is None:
            raise ConfigError("grid key 'classes' is required for class removal (scenario CR).")
        stray = [k for k in ("forget_fraction", "forget_count") if getattr(grid, k) is not None]
        if stray:
            raise ConfigError(
                f"grid key {stray[0]!r} only applies to random removal (scenario HR); class "
                "removal (CR) forgets whole classes given by 'classes'."
            )
        return
    if grid.classes is not None:
        raise ConfigError(
            "grid key 'classes' only applies to class removal (scenario CR); random removal (HR) "
            "takes forget_fraction or forget_count."
        )
    if grid.forget_fraction is None and grid.forget_count is None:
        raise ConfigError(
            "random removal (scenario HR) needs grid key 'forget_fraction' (e.g. 0.1) or "
            "'forget_count'."
        )
    validate_amount(grid.forget_count, grid.forget_fraction)
    if isinstance(grid.oracles, tuple):
        stray = [s for s in grid.oracles if s not in grid.seeds]
        if stray:
            raise ConfigError(
                f"grid key 'oracles' lists seed(s) {stray} not in 'seeds'; allowed: "
                f"{list(grid.seeds)}."
            )


def _check_model_kwargs(model: str, builder: Any, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params) or not kwargs:
        return
    allowed = sorted(p.name for p in params if p.kind is p.KEYWORD_ONLY)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"grid key 'model_kwargs': model {model!r} does not take {unknown}; allowed: "
            f"{allowed or '(none)'}."
        )


def _check_method(name: str, hparams: dict[str, Any], grid: Grid) -> None:
    from scar.methods import METHODS

    if name in REFERENCE_METHODS:
        if hparams:
            raise ConfigError(
                f"grid key 'methods.{name}' takes no hyperparameters: the {name} row is the "
                "cached checkpoint trained with the grid's 'train' overrides; got "
                f"{sorted(hparams)}."
            )
        return
    cls = METHODS.get(name)  # UnknownComponentError with "did you mean"
    if grid.scenario not in cls.scenarios:
        raise ConfigError(
            f"grid key 'methods.{name}': method {name!r} supports scenarios "
            f"{list(cls.scenarios)}; the grid's scenario is {grid.scenario!r}."
        )
    preset, own = method_preset(grid, hparams)
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(
            f"grid key 'methods.{name}.preset' must be a preset name or null; got {preset!r}."
        )
    try:
        for dataset in grid.datasets:
            resolved_hparams(name, own, preset, dataset)
    except ConfigError as exc:
        raise ConfigError(f"grid key 'methods.{name}': {exc}") from exc


def method_preset(grid: Grid, hparams: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(preset, hyperparameters) of one ``methods`` entry: its own ``preset`` key, else the
    grid's."""
    own = dict(hparams)
    return own.pop(PRESET_KEY, grid.preset), own


def known_num_classes(dataset: str, options: Mapping[str, Any]) -> int | None:
    """The class count without loading images: the dataset option, the table of well-known
    datasets, or the loader's ``num_classes`` default; None when only loading can tell."""
    from scar.data.datasets import DATASETS, KNOWN_DATASETS

    if _is_int(options.get("num_classes")):
        return int(options["num_classes"])
    if dataset in KNOWN_DATASETS:
        return KNOWN_DATASETS[dataset].num_classes
    loader, _ = DATASETS.resolve(dataset)
    param = inspect.signature(loader).parameters.get("num_classes")
    if param is not None and _is_int(param.default):
        return int(param.default)
    return None


def class_groups(grid: Grid, dataset: str, options: Mapping[str, Any]
                 ) -> tuple[tuple[int, ...], ...]:
    """The CR requests of ``dataset`` loaded with ``options``: one group of class ids per run
    ("all" → every class)."""
    if grid.classes != "all":
        return grid.classes or ()
    num = known_num_classes(dataset, options)
    if num is None:
        raise ConfigError(
            f"grid key 'classes' is \"all\" but the class count of dataset {dataset!r} is only "
            "known after loading it; list the class ids instead."
        )
    return tuple((c,) for c in range(num))


# ---------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec:
    """One run: a method (or the ``original`` / ``retrain`` reference) on one forget request.

    Mappings are stored as sorted item tuples so that specs are hashable; use the properties.
    """

    dataset: str
    model: str | None
    scenario: str
    forget: ForgetSpec
    seed: int
    method: str
    hparams_items: Items = ()
    surrogate: str | None = None
    surrogate_n: int | None = None
    mia: bool = True
    mia_variant: str = "balanced"
    train_items: Items = ()
    dataset_options_items: Items = ()
    model_kwargs_items: Items = ()
    preset: str | None = None  # the preset the hyperparameters started from
    checkpoint: str | None = None  # an existing original (grid key 'checkpoint'); else trained
    audit: str | None = None  # the membership audit's attack (grid key 'audit')
    audit_references: int = DEFAULT_REFERENCES
    relearn_items: Items = ()  # the relearn settings (grid key 'relearn'); () = off

    @property
    def relearn(self):
        """The run's :class:`~scar.evaluation.relearn.RelearnSettings`, or None (off)."""
        return relearn_settings(self.relearn_items)

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.hparams_items)

    @property
    def train(self) -> dict[str, Any]:
        return dict(self.train_items)

    @property
    def dataset_options(self) -> dict[str, Any]:
        return dict(self.dataset_options_items)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.model_kwargs_items)

    @property
    def forget_id(self) -> str:
        return forget_id(self.forget)

    @property
    def is_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    def request(self) -> tuple:
        """What the original / oracle checkpoints and the reference rows depend on."""
        return (self.dataset, self.dataset_options_items, self.model, self.model_kwargs_items,
                self.train_items, self.forget, self.mia, self.mia_variant, self.checkpoint,
                self.audit, self.audit_references, self.relearn_items)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "dataset_options": self.dataset_options,
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "train": self.train,
            "scenario": self.scenario,
            "forget": self.forget.to_dict(),
            "seed": self.seed,
            "method": self.method,
            "hparams": self.hparams,
            "surrogate": self.surrogate,
            "surrogate_n": self.surrogate_n,
            "mia": self.mia,
            "mia_variant": self.mia_variant,
            # Only when set, so that the ids of runs without a preset / a given original stay
            # what they were.
            **({"preset": self.preset} if self.preset is not None else {}),
            **({"checkpoint": self.checkpoint} if self.checkpoint is not None else {}),
            **({"audit": self.audit, "audit_references": self.audit_references}
               if self.audit is not None else {}),
            **({"relearn": dict(self.relearn_items)} if self.relearn_items else {}),
        }

    @property
    def run_id(self) -> str:
        return stable_hash(self.to_dict())


def stable_hash(obj: Any, length: int = 12) -> str:
    """First ``length`` hex digits of the SHA-1 of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:length]


def forget_id(spec: ForgetSpec) -> str:
    """Short name of a forget request: class3, class3-5 (CR); seed0 (HR); the file stem."""
    if spec.kind == "class":
        return "class" + "-".join(map(str, spec.classes))
    if spec.kind == "random":
        return f"seed{spec.seed}"
    return Path(spec.indices_file or "indices").stem


def freeze(mapping: Mapping[str, Any]) -> Items:
    return tuple(sorted((k, _freeze_value(v)) for k, v in mapping.items()))


def _freeze_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_value(v) for v in value)
    if isinstance(value, dict):
        return freeze(value)
    return value


def default_model(dataset: str, train: Mapping[str, Any]) -> str | None:
    """The architecture the dataset's recipe trains when the grid names none (None when the
    recipe is only known after loading the dataset)."""
    from scar.training.recipes import RECIPE_KEY, RECIPES

    if isinstance(train.get("model"), str):
        return train["model"]
    if isinstance(train.get(RECIPE_KEY), str) and train[RECIPE_KEY] in RECIPES.names():
        return RECIPES.get(train[RECIPE_KEY]).model
    for name in (dataset, dataset.split(":", 1)[0]):
        if name in RECIPES.names():
            return RECIPES.get(name).model
    return None


def forget_requests(grid: Grid, dataset: str, options: Mapping[str, Any]
                    ) -> list[tuple[ForgetSpec, tuple[int, ...]]]:
    """(forget spec, unlearning seeds) per request: CR → one per class group (all seeds);
    HR → one forget set per seed (its own seed)."""
    if grid.scenario == "CR":
        return [(ForgetSpec.for_classes(list(g)), grid.seeds)
                for g in class_groups(grid, dataset, options)]
    return [(ForgetSpec.random(count=grid.forget_count, fraction=grid.forget_fraction, seed=s),
             (s,)) for s in grid.seeds]


def has_oracle(grid: Grid, forget: ForgetSpec) -> bool:
    """Whether the request of ``forget`` gets an oracle (a ``retrain`` row) under ``oracles``."""
    if not isinstance(grid.oracles, tuple):
        return grid.oracles == "all"
    if forget.kind == "class":
        return tuple(sorted(forget.classes)) in grid.oracles
    return forget.seed in grid.oracles


def reference_methods(grid: Grid, forget: ForgetSpec) -> tuple[str, ...]:
    """The reference rows of a request: ``original``, and ``retrain`` when it has an oracle."""
    return REFERENCE_METHODS if has_oracle(grid, forget) else REFERENCE_METHODS[:1]


def configured_method(name: str, hparams: Mapping[str, Any], preset: str | None = None,
                      dataset: str | None = None):
    """The method ``name`` built from ``preset``'s values for ``dataset`` with ``hparams`` over
    them."""
    from scar.methods import build_method
    from scar.methods.presets import with_preset

    return build_method(name, **with_preset(name, hparams, preset, dataset))


def resolved_hparams(name: str, hparams: Mapping[str, Any], preset: str | None = None,
                     dataset: str | None = None) -> dict[str, Any]:
    """Every hyperparameter of the configured method (preset applied, strings coerced, defaults
    filled in)."""
    return configured_method(name, hparams, preset, dataset).hparams()


def resolved_surrogate(grid: Grid, dataset: str) -> tuple[str, int | None]:
    from scar.experiments.unlearn import default_surrogate, surrogate_size

    name = grid.surrogate or default_surrogate(dataset)
    return name, surrogate_size(name, grid.surrogate_n)


def expand(grid: Grid) -> list[RunSpec]:
    """All runs of the grid, reference rows first within each request; stable order."""
    methods = [(n, *method_preset(grid, h)) for n, h in grid.methods
               if n not in REFERENCE_METHODS]
    specs: list[RunSpec] = []
    for dataset in grid.datasets:
        surrogate = resolved_surrogate(grid, dataset)
        resolved = {}
        for name, preset, hparams in methods:
            method = configured_method(name, hparams, preset, dataset)
            resolved[name] = (freeze(method.hparams()), "surrogate" in method.uses(), preset)
        models: dict[str, int] = {}
        for i, entry in enumerate(grid.models):
            model = entry.name or default_model(dataset, entry.train)
            if model is not None and models.setdefault(model, i) != i:
                raise ConfigError(
                    f"grid key 'model' lists model {model!r} twice for dataset {dataset!r} "
                    f"(entries {models[model]} and {i}); report tables are per dataset and "
                    "model, so list each model once (compare settings in separate grids)."
                )
            common = {
                "dataset": dataset, "model": model,
                "scenario": grid.scenario, "mia": grid.mia, "mia_variant": grid.mia_variant,
                "train_items": freeze(entry.train),
                "dataset_options_items": freeze(entry.dataset_options),
                "model_kwargs_items": freeze(entry.model_kwargs),
                "checkpoint": entry.checkpoint,
                "audit": grid.audit, "audit_references": grid.audit_references,
                "relearn_items": grid.relearn,
            }
            for forget, seeds in forget_requests(grid, dataset, entry.dataset_options):
                ref_seed = forget.seed if grid.scenario == "HR" else TRAIN_SEED
                specs += [RunSpec(forget=forget, seed=ref_seed, method=m, **common)
                          for m in reference_methods(grid, forget)]
                for seed in seeds:
                    for name, (items, needs_surrogate, preset) in resolved.items():
                        specs.append(RunSpec(
                            forget=forget, seed=seed, method=name, hparams_items=items,
                            surrogate=surrogate[0] if needs_surrogate else None,
                            surrogate_n=surrogate[1] if needs_surrogate else None,
                            preset=preset, **common))
    check_unique(specs)
    return specs


def check_unique(specs: list[RunSpec]) -> None:
    seen: dict[str, RunSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.run_id, spec)
        if other is not spec:
            raise ConfigError(
                f"the grid lists the same run twice ({spec.method} on {spec.dataset}, "
                f"{spec.forget_id}, seed {spec.seed}): remove the repeated dataset / model / seed."
            )


# ---------------------------------------------------------------- selecting runs
#: Keys of ``only`` filters besides the RunSpec fields.
EXTRA_FILTER_KEYS = ("class", "forget_id", "run_id")


def filter_keys() -> tuple[str, ...]:
    names = [f.name for f in fields(RunSpec)
             if not f.name.endswith("_items") and f.name != "forget"]
    return (*names, *EXTRA_FILTER_KEYS)


def matches(spec: RunSpec, only: Mapping[str, Any] | None) -> bool:
    """Whether ``spec`` passes every ``key=value`` of ``only`` (values compared as strings;
    ``a|b`` means either; ``class`` matches any of the forget classes)."""
    for key, wanted in (only or {}).items():
        options = set(str(wanted).split("|"))
        if key == "class":
            values = {str(c) for c in spec.forget.classes}
        elif key in ("forget_id", "run_id"):
            values = {getattr(spec, key)}
        else:
            values = {str(getattr(spec, key))}
        if not values & options:
            return False
    return True


def check_only(only: Mapping[str, Any] | None) -> None:
    allowed = filter_keys()
    check_keys("--only filter", only or {}, allowed)


def hparams_changed(spec: RunSpec) -> dict[str, Any]:
    """The preset of ``spec`` (if any) and the hyperparameters that differ from its values, else
    from the method's defaults (for display)."""
    if spec.is_reference:
        return {}
    base = freeze(resolved_hparams(spec.method, {}, spec.preset, spec.dataset))
    changed = {k: v for k, v in spec.hparams_items if (k, v) not in base}
    return {"preset": spec.preset, **changed} if spec.preset else changed
