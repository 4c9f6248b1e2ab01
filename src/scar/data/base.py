"""Core data types: image sets held as uint8 tensors (or decoded lazily), and batch iteration.

Every dataset, split and surrogate source is an :class:`ImageSet`: ``labels`` (int64, always in
memory) plus ``load(idx) -> uint8 [B, C, H, W]``. Images stay uint8 until a batch is formed; the
batch is then moved to the device, converted to float, augmented on tensors and normalised with the
*model's* :class:`InputSpec` (so surrogate images are normalised like the data the model knows).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from scar.errors import ConfigError


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: image size (square), channels and normalisation constants."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"InputSpec mean/std need {self.channels} values (one per channel); "
                f"got mean={self.mean}, std={self.std}."
            )

    def to_dict(self) -> dict:
        return {"channels": self.channels, "size": self.size, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(int(d["channels"]), int(d["size"]), tuple(d["mean"]), tuple(d["std"]))


class ImageSet:
    """Abstract image set: ``labels`` in memory, images loaded by index as uint8 tensors."""

    labels: torch.Tensor
    channels: int
    size: int

    def __len__(self) -> int:
        return int(self.labels.numel())

    def load(self, idx: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def subset(self, idx: torch.Tensor | Sequence[int],
               labels: torch.Tensor | None = None) -> ImageSet:
        """A view of the images at ``idx``; ``labels`` relabels it."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return SubsetImages(self, idx, labels)

    def materialize(self) -> TensorImages:
        """Decode everything into one in-memory :class:`TensorImages` (used for small sets)."""
        idx = torch.arange(len(self))
        return TensorImages(self.load(idx), self.labels.clone())


class TensorImages(ImageSet):
    """Images already decoded in memory: uint8 [N, C, H, W] and int64 labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ConfigError(
                f"TensorImages needs uint8 images of shape [N, C, H, W]; got {images.dtype} "
                f"{tuple(images.shape)}."
            )
        if images.shape[2] != images.shape[3]:
            raise ConfigError(f"Images must be square; got {tuple(images.shape[2:])}.")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ConfigError(
                f"labels must have shape [{images.shape[0]}]; got {tuple(labels.shape)}."
            )
        self.images = images
        self.labels = labels
        self.channels = int(images.shape[1])
        self.size = int(images.shape[2])

    def load(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]

    def subset(self, idx: torch.Tensor | Sequence[int],
               labels: torch.Tensor | None = None) -> TensorImages:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorImages(self.images[idx], self.labels[idx] if labels is None else labels)

    def materialize(self) -> TensorImages:
        return self


class SubsetImages(ImageSet):
    """A view of another image set through an index tensor (used for lazily decoded sets)."""

    def __init__(self, parent: ImageSet, idx: torch.Tensor, labels: torch.Tensor | None = None):
        self.parent = parent
        self.idx = idx
        # ``labels`` relabels the view (e.g. surrogate images labelled by a model's predictions).
        self.labels = parent.labels[idx] if labels is None else labels.to(torch.long).cpu()
        self.channels = parent.channels
        self.size = parent.size

    def load(self, idx: torch.Tensor) -> torch.Tensor:
        return self.parent.load(self.idx[idx])


class ConcatImages(ImageSet):
    """Several image sets of one shape, one after the other (indices run through them in order)."""

    def __init__(self, parts: Sequence[ImageSet]):
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ConfigError("ConcatImages needs at least one non-empty image set.")
        shapes = {(p.channels, p.size) for p in parts}
        if len(shapes) != 1:
            raise ConfigError(f"ConcatImages needs image sets of one shape; got {sorted(shapes)}.")
        self.parts = list(parts)
        self.labels = torch.cat([p.labels for p in self.parts])
        self.channels, self.size = shapes.pop()
        self.starts = torch.tensor([0] + [len(p) for p in self.parts]).cumsum(0)

    def load(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        part = torch.bucketize(idx, self.starts[1:], right=True)
        out = torch.empty((len(idx), self.channels, self.size, self.size), dtype=torch.uint8)
        for k in torch.unique(part).tolist():
            rows = (part == k).nonzero().squeeze(1)
            out[rows] = self.parts[k].load(idx[rows] - self.starts[k])
        return out


@dataclass(frozen=True)
class Augment:
    """Tensor augmentation applied per batch: random crop with zero padding and horizontal flip."""

    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, generator)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=generator, device="cpu") < 0.5
            flip = flip.to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


def random_crop(
    x: torch.Tensor, pad: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample random crop of a zero-padded batch, done with one gather (no Python loop)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])  # [B, H]
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])  # [B, W]
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def normalize(x_uint8: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 [B, C, H, W] → float normalised with the model's input spec."""
    x = x_uint8.float().div_(255.0)
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean) / std


@dataclass
class Batch:
    x: torch.Tensor  # float, normalised, on device
    y: torch.Tensor  # int64 labels, on device
    idx: torch.Tensor  # int64 positions within the iterated ImageSet, on device


@dataclass
class BatchLoader:
    """Iterate over an :class:`ImageSet` in batches of normalised tensors on ``device``.

    ``weights`` (optional, one per sample) switches to sampling with replacement proportional to
    the weights (``num_samples`` draws per epoch, default ``len(data)``), as the balanced surrogate
    sampler of SCAR's random-removal scenario needs. ``seed`` makes the order repeatable: the n-th
    pass over the loader uses ``seed + n``.
    """

    data: ImageSet
    spec: InputSpec
    batch_size: int = 256
    shuffle: bool = False
    augment: Augment | None = None
    device: torch.device | str = "cpu"
    seed: int = 0
    weights: torch.Tensor | None = None
    num_samples: int | None = None
    drop_last: bool = False
    _epoch: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1; got {self.batch_size}.")
        if self.data.channels != self.spec.channels or self.data.size != self.spec.size:
            raise ConfigError(
                f"Images are {self.data.channels}x{self.data.size}x{self.data.size} but the model "
                f"expects {self.spec.channels}x{self.spec.size}x{self.spec.size}; resize the "
                "source "
                "to the dataset's resolution and channel count first."
            )
        self.device = torch.device(self.device)

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        n = len(self.data)
        if self.weights is not None:
            k = self.num_samples or n
            return torch.multinomial(self.weights.double(), k, replacement=True, generator=g)
        if self.shuffle:
            return torch.randperm(n, generator=g)
        return torch.arange(n)

    def __len__(self) -> int:
        n = (self.num_samples or len(self.data)) if self.weights is not None else len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        g = torch.Generator().manual_seed(10_000 + self.seed + self._epoch)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            x = self.data.load(idx).to(self.device, non_blocking=True)
            if self.augment is not None:
                x = self.augment(x, g)
            yield Batch(
                normalize(x, self.spec),
                self.data.labels[idx].to(self.device, non_blocking=True),
                idx.to(self.device),
            )


def resize_images(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to ``channels`` x ``size`` x ``size`` (bilinear, antialiased).

    Grey → RGB repeats the channel; RGB → grey uses ITU-R 601 luma weights.
    """
    x = images
    if x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        elif x.shape[1] == 4 and channels in (1, 3):
            return resize_images(x[:, :3], channels, size)
        else:
            raise ConfigError(f"Cannot convert {x.shape[1]}-channel images to {channels} channels.")
    if x.shape[2] != size or x.shape[3] != size:
        out = []
        for chunk in x.split(1024):
            y = torch.nn.functional.interpolate(
                chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                align_corners=False,
            )
            out.append(y.round().clamp(0, 255).to(torch.uint8))
        x = torch.cat(out) if out else x.new_zeros((0, channels, size, size))
    return x.contiguous()
