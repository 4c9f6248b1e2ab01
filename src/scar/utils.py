"""Small shared helpers: devices, seeding, atomic writes, version stamps."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scar.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → first CUDA device if available else CPU; ``cpu``; ``cuda``; ``cuda:N``."""
    if isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} was requested but CUDA is not available on this machine; "
                "use --device cpu or --device auto."
            )
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})."
            )
        return dev
    raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}.")


def device_name(device: torch.device) -> str:
    """Human-readable device name recorded next to every timing."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_BYTES = 1 << 30


def tune_cpu_allocator() -> bool:
    """Keep large CPU tensors in glibc's heap instead of fresh ``mmap`` pages (Linux, glibc).

    glibc serves allocations above its mmap threshold (at most 32 MiB) with new pages from the
    kernel and unmaps them on free, so every such tensor is page-faulted and zeroed again: a
    ReLU over a [1024, 16, 28, 28] batch took 29 ms instead of 9 ms here (2-core VM), and a SCAR
    step at batch 1024 was 26% slower. Raising the mmap and trim thresholds to 1 GiB makes freed
    blocks reusable. Called by the ``scar`` command and the benchmarks (process-wide, so not on
    import); set ``SCAR_NO_MALLOPT=1`` to leave glibc's defaults. Returns whether it applied.
    """
    if os.environ.get("SCAR_NO_MALLOPT") or platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    import torchvision

    from scar import __version__

    return {
        "scar": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive lock among processes on this machine, held on a hidden ``.<name>.lock`` next
    to ``path`` (``flock``; the kernel releases it if the process dies). A no-op where
    ``fcntl`` is missing (Windows): there, one writer per file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; a result file gets the mode any new file gets here.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
