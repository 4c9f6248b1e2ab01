"""Checkpoints: safetensors weights + a JSON sidecar. Never unpickles anything.

``path/to/name.safetensors`` holds the weights, ``path/to/name.json`` the sidecar: model spec,
input spec, dataset and its loader options, role (original / oracle / unlearned), forget spec,
metrics, timing, device, versions, seed, and the location of stored class statistics if any. A
plain ``.pt``/``.pth`` state dict is accepted only through ``torch.load(weights_only=True)`` and
only with an explicit model spec (there is no sidecar to rebuild the architecture from).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scar.data.base import InputSpec
from scar.errors import CheckpointError, ConfigError, MissingDataError
from scar.models.base import ModelSpec, build_model
from scar.utils import atomic_write_bytes, atomic_write_json, file_lock, versions

log = logging.getLogger(__name__)

FORMAT = "scar-checkpoint/1"
#: Key of the safetensors header entry that holds the checkpoint's metadata (JSON).
META_KEY = "scar_meta"
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (on CPU, eval mode) and its sidecar metadata."""

    model: nn.Module
    model_spec: ModelSpec
    input_spec: InputSpec
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def dataset(self) -> str:
        return self.meta.get("dataset", "")

    @property
    def dataset_options(self) -> dict[str, Any] | None:
        """The dataset loader options it was trained with (defaults filled in); None for a
        checkpoint written before they were recorded."""
        options = self.meta.get("dataset_options")
        return None if options is None else dict(options)

    def stats_path(self) -> Path | None:
        """Where stored class statistics (recorded at training time) live, if any."""
        rel = self.meta.get("stats")
        if not rel or self.path is None:
            return None
        return self.path.parent / rel


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def checkpoint_exists(path: str | Path) -> bool:
    """Whether a cached checkpoint is complete: weights and sidecar."""
    return Path(path).exists() and sidecar_path(path).exists()


def file_slug(text: str) -> str:
    """``text`` as a file-name part of cached checkpoints (runs of other characters → ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def input_files(ck: Checkpoint) -> list[Path]:
    """The files a loaded checkpoint came from: weights, sidecar, stored statistics."""
    if ck.path is None:
        return []
    return [p for p in (ck.path, sidecar_path(ck.path), ck.stats_path()) if p is not None]


def check_output(outputs: list[Path], inputs: list[Path], flag: str = "--out") -> None:
    """Before any work: refuse outputs that would overwrite an input (or the sidecar of a
    checkpoint that exists next to a ``.json`` output), and make sure their folders can be
    written. Raises ConfigError naming the file."""
    same = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in same:
            raise ConfigError(
                f"{flag} {out} is an input of this command; it would be overwritten. Choose "
                "another path."
            )
        weights = out.with_suffix(".safetensors")
        if out.suffix == ".json" and weights.exists() and weights.resolve() not in {
                o.resolve() for o in outputs}:
            raise ConfigError(
                f"{flag} {out} is the sidecar of checkpoint {weights}; writing it would "
                "separate that checkpoint from its metadata. Choose another path."
            )
        folder = out.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if folder.exists() and (not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK)):
            raise ConfigError(f"{flag} {out}: cannot write into {folder} (permission denied or "
                              "not a folder); choose a writable path.")


def save_checkpoint(
    path: str | Path, model: nn.Module, model_spec: ModelSpec, input_spec: InputSpec,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar, both atomically."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    side = {
        "format": FORMAT,
        "model": model_spec.to_dict(),
        "input_spec": input_spec.to_dict(),
        "versions": versions(),
        **(meta or {}),
    }
    # The metadata travels inside the weights file too (one atomic unit): the sidecar is a
    # readable copy, and a sidecar left by another writer or an interrupted save cannot pair
    # these weights with someone else's metadata (load_checkpoint prefers the embedded copy).
    embedded = json.dumps(side, sort_keys=True, default=str)
    data = save(state, metadata={"format": FORMAT, META_KEY: embedded})
    with file_lock(path):  # two writers to one path: each pair is written whole
        atomic_write_bytes(path, data)
        atomic_write_json(sidecar_path(path), side)
    log.info("saved checkpoint %s", path)
    return path


def _embedded_meta(path: Path) -> dict[str, Any] | None:
    """The metadata a safetensors checkpoint carries in its header (None: none, or not a
    safetensors file)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by read_state
        return None
    if raw is None:
        return None
    try:
        return _checked_meta(json.loads(raw), f"the metadata embedded in {path}")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"The metadata embedded in {path} is not valid JSON: {exc}.") \
            from exc


def _read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata: the copy embedded in the weights file when there is one (a
    sidecar that disagrees with it is reported and ignored), else the sidecar."""
    embedded = _embedded_meta(path)
    side = sidecar_path(path)
    if embedded is not None:
        if side.exists():
            try:
                same = json.loads(side.read_text()) == embedded
            except (json.JSONDecodeError, OSError, UnicodeDecodeError):
                same = False
            if not same:
                log.warning("%s does not match the metadata inside %s (another writer or an "
                            "interrupted save); using the embedded metadata", side, path.name)
        return embedded
    return _read_sidecar(path)


def _checked_meta(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta \
            or "input_spec" not in meta:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"{where} is not SCAR checkpoint metadata (expected format {FORMAT!r} with "
            f"'model' and 'input_spec'; got {got!r})."
        )
    return meta


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.exists():
        raise CheckpointError(
            f"Checkpoint {path} has no sidecar {side.name}: the architecture cannot be rebuilt. "
            "Checkpoints written by `scar train` / `scar unlearn` always have one."
        )
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"Sidecar {side} is not valid JSON: {exc}.") from exc
    return _checked_meta(meta, f"Sidecar {side}")


def _torch_reason(exc: BaseException) -> str:
    """What torch.load's refusal says about the file, without its advice to disable the
    safety check (weights_only=False), which SCAR never does."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    noise = ("weights_only", "please file an issue", "check the documentation",
             "weights only load failed", "add_safe_globals", "safe_globals")
    lines = [ln.split(" Please use")[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not any(n in ln.lower() for n in noise)]
    return lines[0].rstrip(".") if lines else type(exc).__name__


def check_file(path: str | Path) -> Path:
    """``path`` as a Path, when it names an existing file (else a clear error)."""
    path = Path(path)
    if not path.exists():
        raise MissingDataError(f"Checkpoint {path} does not exist.")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))[:5]
        raise CheckpointError(
            f"Checkpoint {path} is a folder; give the weights file inside it"
            + (f" (e.g. {', '.join(found)})." if found else " (a .safetensors file).")
        )
    return path


def has_metadata(path: str | Path) -> bool:
    """Whether the checkpoint carries SCAR metadata (embedded, or a sidecar next to it): a
    plain state dict saved by other tools has none and needs its model and data named."""
    path = Path(path)
    return sidecar_path(path).exists() or _embedded_meta(path) is not None


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}.") from exc
    if path.suffix in _PICKLE_SUFFIXES:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint.")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling refusal becomes a clear error
            raise CheckpointError(
                f"Refusing to load {path}: it is not a plain tensor state dict "
                f"(torch.load(weights_only=True) said: {_torch_reason(exc)}). "
                "SCAR never unpickles arbitrary objects; convert it to safetensors."
            ) from exc
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors.")
        return obj
    raise CheckpointError(
        f"Unsupported checkpoint file {path.name!r}: use .safetensors (preferred) or a "
        f"weights-only torch state dict ({', '.join(sorted(_PICKLE_SUFFIXES))})."
    )


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor], shown: int = 3) -> str:
    """A short account of how ``state`` differs from ``model``'s state dict: counts of
    missing, unexpected and reshaped entries with a few examples (not torch's full key dump)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
                if k in state and state[k].shape != own[k].shape]

    def part(items: list[str], what: str) -> str | None:
        if not items:
            return None
        more = f", … {len(items) - shown} more" if len(items) > shown else ""
        return f"{len(items)} {what} ({', '.join(items[:shown])}{more})"

    parts = [p for p in (part(missing, "missing"), part(unexpected, "unexpected"),
                         part(reshaped, "with another shape (file vs model)")) if p]
    return "; ".join(parts) or "the weights do not load"


def _specs(path: Path, meta: dict[str, Any], model_spec: ModelSpec | None,
           input_spec: InputSpec | None) -> tuple[ModelSpec, InputSpec]:
    """Model and input specs: the given ones, else the metadata's (a malformed entry is a
    CheckpointError saying what a valid one looks like)."""
    def read(key: str, cls, example: str):
        try:
            return cls.from_dict(meta[key])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"Checkpoint {path}: its metadata's {key!r} is malformed ({type(exc).__name__}: "
                f"{exc}); expected an object like {example}. Was the sidecar edited by hand?"
            ) from exc

    return (model_spec or read("model", ModelSpec, '{"name": "fastcnn", "num_classes": 10, '
                               '"channels": 1, "size": 28}'),
            input_spec or read("input_spec", InputSpec, '{"channels": 1, "size": 28, "mean": '
                               '[0.286], "std": [0.353]}'))


def load_checkpoint(
    path: str | Path,
    *,
    model_spec: ModelSpec | None = None,
    input_spec: InputSpec | None = None,
    expect_num_classes: int | None = None,
) -> Checkpoint:
    """Load a checkpoint safely; a wrong architecture or class count is a clear CheckpointError."""
    path = check_file(path)
    state = read_state(path)  # first: an unsafe file is refused before anything else
    if model_spec is None or sidecar_path(path).exists():
        meta = _read_meta(path)
    else:
        meta = _embedded_meta(path) or {}
    spec, ispec = _specs(path, meta, model_spec, input_spec)
    if expect_num_classes is not None and spec.num_classes != expect_num_classes:
        raise CheckpointError(
            f"Checkpoint {path} is a {spec.num_classes}-class model but {expect_num_classes} "
            "classes were expected (different dataset?)."
        )
    try:
        model = build_model(spec)
    except TypeError as exc:  # e.g. a kwarg the architecture does not take
        raise CheckpointError(f"Checkpoint {path}: model {spec.name!r} cannot be built from "
                              f"its recorded settings {spec.kwargs}: {exc}.") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"Checkpoint {path} does not match architecture {spec.name!r} with "
            f"{spec.num_classes} classes: {state_mismatch(model, state)}."
        ) from exc
    model.eval()
    return Checkpoint(model=model, model_spec=spec, input_spec=ispec, meta=meta, path=path)
