"""Opt-in pretrained starting weights for ``timm:<name>`` and ``tv:<name>`` models.

``scar train --model timm:NAME --pretrained [FILE]`` (grid: ``model_kwargs: {pretrained: FILE}``
or ``{pretrained: true}``) fine-tunes from pretrained weights instead of a random initialisation.
The weights must already be on this machine, from

* ``FILE``: a safetensors file or a torch state dict read with ``torch.load(weights_only=True)``
  (:func:`scar.checkpoint.read_state`: nothing else is ever unpickled); or
* the library's own cache: timm's Hugging Face hub cache (``model.safetensors``, else
  ``pytorch_model.bin``) or, for timm weights hosted elsewhere and for torchvision's ``DEFAULT``
  weights, the torch hub checkpoints folder. Nothing is downloaded unless the caller allows it
  (``--download``); without it the lookups are ``local_files_only``, so a missing file is a
  ConfigError naming what was looked for and where, never a silent download.

The classifier head is sized to the dataset: timm drops a pretrained head whose class count
differs (and adapts the first convolution to the input channels); for torchvision the model is
built for the dataset's classes and every weight but a differently shaped head (found by
:func:`scar.models.adapter.find_head`) is loaded, which is the same as building the 1000-class
model torchvision insists on for its weights and swapping the head, but keeps torchvision's own
initialisation of the new head. Any other mismatch (missing, unexpected or reshaped weights) is a
CheckpointError: a file that fits nothing never loads "partly" in silence.

Only the *starting* weights come from here: the trained checkpoint records the plain model spec
(rebuilt without pretrained weights on load) plus a ``pretrained`` entry in its metadata saying
where the initial weights came from (path and sha256), so no reader mistakes it for a model
trained from scratch.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scar.errors import CheckpointError, ConfigError, optional_import
from scar.models.base import ModelSpec, build_model

log = logging.getLogger(__name__)

#: Model name prefixes that can start from pretrained weights.
PRETRAINED_PREFIXES = ("timm:", "tv:")
_HOW = ("give a weights file (`--pretrained FILE`: safetensors or a torch state dict; grid: "
        "model_kwargs {pretrained: FILE}) or allow downloading it (`--download`)")
#: torchvision classifiers whose pretrained weights carry auxiliary heads SCAR builds without.
_TV_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")
_lock = threading.Lock()


def check_request(model: str | None, pretrained: Any) -> None:
    """Validate a pretrained request before any work: a ``timm:``/``tv:`` model, and ``True``
    (the library's cache) or the path of an existing file."""
    if pretrained is None or pretrained is False:
        return
    if not model or not model.startswith(PRETRAINED_PREFIXES):
        raise ConfigError(
            f"pretrained weights are available for timm:<name> and tv:<name> models only; got "
            f"model {model or '(the recipe default)'!r}. Start from your own checkpoint of another "
            "model with `scar unlearn --checkpoint FILE --model NAME` instead."
        )
    if pretrained is True:
        return
    if not isinstance(pretrained, (str, Path)) or not str(pretrained):
        raise ConfigError(
            f"pretrained must be true (the library's local cache) or a weights file path; got "
            f"{pretrained!r}."
        )
    path = Path(pretrained).expanduser()
    if not path.is_file():
        what = "is a folder, not a weights file" if path.is_dir() else "does not exist"
        raise ConfigError(f"pretrained weights file {path} {what}; {_HOW}.")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    from scar.checkpoint import read_state

    return dict(read_state(path))  # safetensors, or torch.load(weights_only=True) only


# ---------------------------------------------------------------- finding the weights
def _timm_cached(name: str, download: bool) -> tuple[Path, dict[str, Any]]:
    """The weights file of ``timm:name`` in the Hugging Face hub cache (or, for weights timm
    fetches from a URL, the torch hub checkpoints folder); downloaded only when allowed."""
    timm = optional_import("timm", "timm")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"timm has no pretrained weights for {name!r}; {_HOW.split(' or ')[0]}.")
    looked: list[str] = []
    if cfg.hf_hub_id:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                                    "pytorch_model.bin"]
        for filename in files:
            looked.append(f"{repo}/{filename}")
            try:
                path = hf_hub_download(repo, filename, revision=revision or None,
                                       local_files_only=not download)
            except (LocalEntryNotFoundError, EntryNotFoundError):
                continue
            except Exception as exc:  # noqa: BLE001 - network / hub errors become one line
                raise ConfigError(f"could not download {repo}/{filename} from the Hugging Face "
                                  f"hub ({type(exc).__name__}: {exc}); {_HOW}.") from exc
            return Path(path), {"cache": "huggingface-hub", "repo": cfg.hf_hub_id,
                                "tag": cfg.tag, "file": str(path)}
        where = f"the Hugging Face hub cache ({constants.HF_HUB_CACHE})"
    else:
        where = ""
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        looked.append(path.name)
        if not path.exists() and download and not cfg.hf_hub_id:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(cfg.url, str(path), progress=True)
        if path.exists():
            return path, {"cache": "torch-hub", "url": cfg.url, "tag": cfg.tag,
                          "file": str(path)}
        where += (" or " if where else "") + f"the torch hub cache ({path.parent})"
    raise ConfigError(
        f"pretrained weights for 'timm:{name}' are not on this machine (looked for "
        f"{', '.join(looked)} in {where}); {_HOW}."
    )


def _tv_cached(name: str, download: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torchvision's DEFAULT weights of ``name`` from the torch hub checkpoints folder."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"torchvision has no pretrained weights for {name!r}; "
                          f"{_HOW.split(' or ')[0]}.") from exc
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    info = {"cache": "torch-hub", "weights": str(weights), "url": weights.url,
            "file": str(path)}
    if path.exists():
        return _read_file(path), info
    if not download:
        raise ConfigError(
            f"pretrained weights for 'tv:{name}' ({weights}) are not on this machine (looked for "
            f"{path.name} in the torch hub cache {path.parent}); {_HOW}."
        )
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu",
                                                   check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - network errors become one line
        raise ConfigError(f"could not download {weights.url} ({type(exc).__name__}: {exc}); "
                          f"{_HOW}.") from exc
    return dict(state), info


def _tv_fixups(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's published DenseNet weights use pre-0.4 key names
    (``denselayer1.norm.1.weight``); torchvision renames them on load, and so do we."""
    if not name.startswith("densenet"):
        return state
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\."
                         r"(?:weight|bias|running_mean|running_var))$")
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


# ---------------------------------------------------------------- loading them
def _mismatch_error(spec: ModelSpec, origin: str, model: nn.Module,
                    state: dict[str, torch.Tensor]) -> CheckpointError:
    from scar.checkpoint import state_mismatch

    return CheckpointError(
        f"pretrained weights {origin} do not fit model {spec.name!r} "
        f"({spec.channels}x{spec.size}x{spec.size} inputs, {spec.num_classes} classes): "
        f"{state_mismatch(model, state)}."
    )


def _load_tv(spec: ModelSpec, state: dict[str, torch.Tensor], origin: str
             ) -> tuple[nn.Module, str, dict[str, Any]]:
    from scar.models.adapter import find_head

    name = spec.name.split(":", 1)[1]
    model = build_model(spec)
    head = find_head(model, spec.head, torch.zeros(2, spec.channels, spec.size, spec.size))
    state = _tv_fixups(name, state)
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if k in own or not k.startswith(_TV_AUX_PREFIXES)}
    head_keys = [f"{head}.weight", f"{head}.bias"]
    file_classes = state[head_keys[0]].shape[0] if head_keys[0] in state else None
    replaced = [k for k in head_keys
                if k in state and k in own and state[k].shape != own[k].shape]
    kept = {k: v for k, v in state.items() if k not in replaced}
    probe = {**kept, **{k: own[k] for k in replaced}}
    # BatchNorm fills in a num_batches_tracked that older published weights lack.
    missing = [k for k in own if k not in probe and not k.endswith("num_batches_tracked")]
    if missing or set(probe) - set(own) or any(
            probe[k].shape != own[k].shape for k in own if k in probe):
        raise _mismatch_error(spec, origin, model, probe)
    model.load_state_dict(probe, strict=False)
    return model, head, {"file_classes": file_classes, "replaced": bool(replaced)}


def _load_timm(spec: ModelSpec, state: dict[str, torch.Tensor], origin: str
               ) -> tuple[nn.Module, str, dict[str, Any]]:
    """timm's own loader (``pretrained=True`` with the state dict as the source): it adapts
    the first convolution to the input channels, resamples position embeddings to the image
    size and drops a head of another class count. Its non-strict load is checked here."""
    from timm.models import _builder

    from scar.models.zoo import create_timm

    name = spec.name.split(":", 1)[1]
    timm = optional_import("timm", "timm")
    if not timm.is_model(name):
        build_model(spec)  # its error names close matches
    cfg = timm.models.get_pretrained_cfg(name)
    classifiers = cfg.classifier if cfg is not None else None
    classifiers = [classifiers] if isinstance(classifiers, str) else list(classifiers or [])
    allowed = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    seen: dict[str, list[str]] = {}

    original = _builder.load_pretrained

    def checked(model: nn.Module, *args: Any, **kwargs: Any) -> None:
        def hook(_module: nn.Module, incompatible: Any) -> None:
            seen["missing"] = list(incompatible.missing_keys)
            seen["unexpected"] = list(incompatible.unexpected_keys)

        handle = model.register_load_state_dict_post_hook(hook)
        try:
            original(model, *args, **kwargs)
        finally:
            handle.remove()

    # timm.create_model calls _builder.load_pretrained by its module-global name; wrapping it
    # (under a lock, restored at once) is how its non-strict load's result is seen.
    quiet = logging.getLogger(_builder.__name__)  # its key lists are checked (and said) here
    with _lock:
        _builder.load_pretrained = checked
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            model = create_timm(name, spec.num_classes, spec.channels, spec.size,
                                pretrained=True,
                                pretrained_cfg_overlay={"state_dict": dict(state)},
                                **spec.kwargs)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0][:300]
            raise CheckpointError(f"pretrained weights {origin} do not fit model "
                                  f"{spec.name!r}: {reason}") from exc
        finally:
            _builder.load_pretrained = original
            quiet.setLevel(level)
    for attr in ("pretrained_cfg", "default_cfg"):  # no second copy of the weights kept
        cfg_dict = getattr(model, attr, None)
        if isinstance(cfg_dict, dict):
            cfg_dict.pop("state_dict", None)
    bad = [k for k in seen.get("missing", []) if k not in allowed] + seen.get("unexpected", [])
    if bad:
        raise _mismatch_error(spec, origin, model, state)
    head_name = classifiers[0] if classifiers else ""
    own = model.state_dict()
    dropped = [k for k in seen.get("missing", []) if k in allowed]
    file_classes = state[f"{head_name}.weight"].shape[0] if f"{head_name}.weight" in state \
        else None
    # timm drops the head whenever the class count differs from the *published* weights'; a
    # file whose head already has the dataset's classes (an earlier fine-tune) keeps it.
    if dropped and all(k in state and state[k].shape == own[k].shape for k in dropped):
        with torch.no_grad():
            for k in dropped:
                own[k].copy_(state[k])
        dropped = []
    return model, head_name, {"file_classes": file_classes, "replaced": bool(dropped)}


def build_pretrained(spec: ModelSpec, pretrained: str | Path | bool, *, download: bool = False
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``spec`` starting from pretrained weights (a file, or ``True``: the
    library's local cache), with its head sized to ``spec.num_classes``. Returns the model and
    a record of where the weights came from (for the checkpoint's metadata)."""
    check_request(spec.name, pretrained)
    kind, name = spec.name.split(":", 1)
    if pretrained is True:
        if kind == "timm":
            path, info = _timm_cached(name, download)
            state = _read_file(path)
        else:
            state, info = _tv_cached(name, download)
            path = Path(info["file"])
        origin = f"from the {info['cache']} cache ({path})"
    else:
        path = Path(pretrained).expanduser().resolve()
        state = _read_file(path)
        info = {"file": str(path)}
        origin = f"from {path}"
    info["sha256"] = sha256(path) if path.exists() else None
    load = _load_timm if kind == "timm" else _load_tv
    model, head, result = load(spec, state, origin)
    info.update(head=head, head_replaced=result["replaced"], file_classes=result["file_classes"],
                num_classes=spec.num_classes)
    log.info("%s starts from pretrained weights %s (head %s %s)", spec.name, origin, head,
             "re-initialised" if result["replaced"] else "loaded")
    return model, info
