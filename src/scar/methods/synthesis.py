"""Image synthesis from the original model and class statistics (no data of the classes read).

Starting images (surrogate images) are optimised in pixel space so that the *frozen* original
model predicts a chosen class for them, with features close to that class's statistics under the
SCAR Mahalanobis head. Two uses:

* SCAR self-forget: proxies of the *removed* class play the forget set (``self_forget.py``);
* SCAR surrogate cover: images of every *kept* class join the distillation set, so that a
  surrogate source the model sees as one or two classes still protects every decision region
  (``scar_method.py``, ``cover_per_class``).
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from scar.data.base import ImageSet, InputSpec, TensorImages, normalize
from scar.models.adapter import FeatureModel

log = logging.getLogger(__name__)

#: Images optimised together.
SYNTH_BATCH = 256


def _pixel_stats(spec: InputSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(spec.mean, device=device)[None, :, None, None]
    std = torch.tensor(spec.std, device=device)[None, :, None, None]
    return mean, std


class GaussianSampler:
    """Draws from the stored class Gaussians N(μ_c, Σ_c), in the statistics' Tukey space
    (float64, unnormalised); each class's Cholesky factor is computed once."""

    def __init__(self, stats):
        self.stats = stats
        self._chol: dict[int, torch.Tensor] = {}

    def chol(self, c: int) -> torch.Tensor:
        if c not in self._chol:
            cov = self.stats.covs[c].to(torch.float64)
            # A small ridge keeps the factor defined for a rank-deficient covariance.
            ridge = 1e-6 * float(cov.diagonal().mean().clamp_min(1e-12))
            self._chol[c] = torch.linalg.cholesky(
                cov + ridge * torch.eye(self.stats.dim, dtype=cov.dtype))
        return self._chol[c]

    def draw(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One point per label."""
        out = torch.empty(len(labels), self.stats.dim, dtype=torch.float64)
        for c in torch.unique(labels).tolist():
            rows = (labels == c).nonzero().squeeze(1)
            z = torch.randn(len(rows), self.stats.dim, generator=g, dtype=torch.float64)
            out[rows] = self.stats.means[c].to(torch.float64) + z @ self.chol(c).T
        return out


def sample_points(stats, labels: torch.Tensor, head, g: torch.Generator) -> torch.Tensor:
    """One point per label, drawn from the class's stored Gaussian N(μ_c, Σ_c) in Tukey space
    and embedded like features (L2-normalised): targets that spread like the class."""
    out = GaussianSampler(stats).draw(labels, g)
    return torch.nn.functional.normalize(out, dim=-1).to(head.means.dtype)


def synthesize_batch(teacher: FeatureModel, x: torch.Tensor, y: torch.Tensor, spec: InputSpec,
                     head, *, steps: int, lr: float, beta: float,
                     points: torch.Tensor | None = None, on_step=None) -> torch.Tensor:
    """Optimise normalised images ``x`` (pixels kept in [0, 1] through a sigmoid) to minimise
    CE(teacher(x), y) + beta · d_y(features(x)) — the distance to the class mean, or with
    ``points`` to each image's own point; returns uint8 images."""
    mean, std = _pixel_stats(spec, x.device)
    pixels = (x * std + mean).clamp(1e-3, 1 - 1e-3)
    z = torch.logit(pixels).detach().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        xn = (torch.sigmoid(z) - mean) / std
        feats, logits = teacher(xn)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if head is not None and beta > 0:
            loss = loss + beta * head.distance_to(feats, y, points).mean()
        (grad,) = torch.autograd.grad(loss, z)
        opt.zero_grad(set_to_none=True)
        z.grad = grad
        opt.step()
        if on_step is not None:
            on_step()
    return (torch.sigmoid(z.detach()) * 255).round().clamp(0, 255).to(torch.uint8)


def synthesize(teacher: FeatureModel, seeds: ImageSet, data, head, *, steps: int, lr: float,
               beta: float, points: torch.Tensor | None = None, desc: str = "synthesis"
               ) -> TensorImages:
    """:func:`synthesize_batch` over ``seeds`` (labelled with their target classes), batch by
    batch on the data's device, with a progress bar; returns the synthesised images with the
    same labels and logs how many the teacher predicts as their label."""
    out = []
    loader = data.loader(seeds, SYNTH_BATCH, shuffle=False)
    with tqdm(total=steps * len(loader), desc=desc, disable=not data.progress,
              dynamic_ncols=True, leave=False) as bar:
        for b in loader:
            out.append(synthesize_batch(teacher, b.x, b.y, data.input_spec, head, steps=steps,
                                        lr=lr, beta=beta,
                                        points=None if points is None else points[b.idx],
                                        on_step=bar.update))
    images = TensorImages(torch.cat(out).cpu(), seeds.labels.clone())
    hit = predicted_as_label(teacher, images, data.input_spec, data.device)
    log.info("%s: %d images of classes %s, %.1f%% predicted as their class", desc, len(images),
             sorted(set(images.labels.tolist())), 100 * float(hit.float().mean()))
    return images


@torch.no_grad()
def predicted_as_label(teacher: FeatureModel, images: TensorImages, spec: InputSpec,
                       device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Boolean per image: does the teacher predict its label?"""
    preds = [teacher.logits(normalize(images.images[i:i + batch_size].to(device), spec))
             .argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(preds) == images.labels


@torch.no_grad()
def most_probable_per_class(teacher: FeatureModel, data, images: ImageSet,
                            classes: list[int], k: int, batch_size: int) -> tuple[torch.Tensor,
                                                                                  torch.Tensor]:
    """(indices, labels): for each class, the ``k`` images of ``images`` the teacher gives the
    highest probability of that class (an image can serve several classes)."""
    probs = torch.cat([teacher.logits(b.x).softmax(1).cpu()
                       for b in data.loader(images, batch_size, shuffle=False)])
    k = min(k, len(images))
    idx = [torch.argsort(probs[:, c], descending=True, stable=True)[:k] for c in classes]
    labels = [torch.full((k,), c, dtype=torch.long) for c in classes]
    return torch.cat(idx), torch.cat(labels)
