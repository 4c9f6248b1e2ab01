"""Time and peak memory of ONE full SCAR optimisation step as batch, classes and width grow.

The step is the body of ``SCAR._unlearn``'s inner loop without its bookkeeping: forward of the
forget batch through ``FeatureModel`` (features + logits in one pass), Mahalanobis loss to each
sample's target class (``MahalanobisHead.distance_to``), teacher forward on a surrogate batch with
the class-removal mask (``mask_teacher_cr``), student forward on the kept surrogates, KL
distillation (``kl_divergence``), backward, Adam step.

The model is a small synthetic backbone with a configurable feature width (conv stem → global
pool → Linear(width) → ReLU → head Linear(width, classes)) on 3x32x32 inputs, so the Mahalanobis
term, whose cost grows with batch·classes·width², is what changes between rows.

Class statistics come from random non-negative features through ``StatsAccumulator``. Building
the head needs a pseudo-inverse and an eigendecomposition per class (minutes for 2048-d classes
on a CPU), and the step's cost depends on the head's shapes, not its values: so the head is built
from ``--distinct`` classes (default 4) and its buffers are tiled to the requested class count
(checked: the tiled columns equal the distinct head's distances).

Peak memory is the memory above the level just before one warm step (after a warm-up step, so
Adam's state is not counted): CPU — peak RSS with the kernel's peak mark reset, CUDA —
``torch.cuda.max_memory_allocated``. By default every configuration runs in a fresh process.

    python benchmarks/bench_step.py              # sweeps around batch 256 / 100 classes / 512
    python benchmarks/bench_step.py --grid full  # every combination (45 configurations)
    python benchmarks/bench_step.py --small      # batch 64/128, 10 classes, width 128 (CI)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

import common
import torch
from torch import nn

from scar.methods.base import set_bn_train
from scar.methods.mahalanobis import MahalanobisHead, StatsAccumulator
from scar.methods.scar_method import kl_divergence, mask_teacher_cr
from scar.models.adapter import FeatureModel

HEADERS = ["batch", "classes", "width", "ms/step", "peak MB", "head MB"]
BATCHES = (64, 128, 256, 512, 1024)
CLASSES = (10, 100, 200)
WIDTHS = (128, 512, 2048)
BASE = (256, 100, 512)  # batch, classes, width held fixed while another axis grows


class SyntheticBackbone(nn.Module):
    """Conv stem + global average pool + Linear(width) + ReLU; head ``fc`` = Linear(width, C)."""

    def __init__(self, width: int, num_classes: int, channels: int = 3, stem: int = 32):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, 2 * stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * stem),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.proj = nn.Sequential(nn.Linear(2 * stem, width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.proj(self.stem(x)))


def random_head(num_classes: int, width: int, distinct: int, device: torch.device,
                per_class: int = 16, seed: int = 0) -> MahalanobisHead:
    """A float32 head over ``num_classes`` classes, built from ``min(distinct, num_classes)``
    classes of random non-negative features and tiled (see the module docstring)."""
    k = max(2, min(distinct, num_classes))
    g = torch.Generator().manual_seed(seed)
    acc = StatsAccumulator(k, width, delta=0.5)
    labels = torch.arange(k).repeat_interleave(per_class)
    feats = torch.relu(torch.randn(len(labels), width, generator=g)
                       + torch.rand(k, width, generator=g)[labels])
    acc.update(feats, labels)
    head = MahalanobisHead(acc.finalize()).to(dtype=torch.float32)
    if k != num_classes:
        probe = torch.relu(torch.randn(8, width, generator=g))
        before = head.distances(probe)
        tile_head(head, num_classes)
        after = head.distances(probe)
        src = torch.arange(num_classes) % k
        assert torch.allclose(after, before[:, src], rtol=1e-5, atol=1e-6), "tiling changed values"
    return head.to(device)


def tile_head(head: MahalanobisHead, num_classes: int) -> None:
    """Repeat the head's K classes cyclically to ``num_classes`` classes, in place."""
    k, d, r = head.class_ids.numel(), head.dim, head.rank
    src = torch.arange(num_classes) % k
    head.factors_flat = head.factors_flat.view(d, k, r)[:, src].reshape(d, -1).contiguous()
    head.proj_means = head.proj_means[src].contiguous()
    head.means = head.means[src].contiguous()
    head.class_ids = torch.arange(num_classes)
    head.position_of = torch.arange(num_classes)
    head.num_classes = num_classes


class ScarStep:
    """One SCAR optimisation step (class removal) on a forget batch and a surrogate batch."""

    def __init__(self, model: nn.Module, head: MahalanobisHead, removed: list[int],
                 example: torch.Tensor, *, lr: float = 5e-4, lambda_1: float = 1.0,
                 lambda_2: float = 5.0, temperature: float = 1.0):
        self.model = model
        self.student = FeatureModel(model, example=example)
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.head = head
        self.removed = torch.tensor(removed, device=example.device)
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.lambda_1, self.lambda_2, self.temperature = lambda_1, lambda_2, temperature

    def __call__(self, x_forget: torch.Tensor, targets: torch.Tensor,
                 x_surrogate: torch.Tensor) -> torch.Tensor:
        set_bn_train(self.model, True)
        feats, _ = self.student(x_forget)
        loss_m = self.lambda_1 * self.head.distance_to(feats, targets).mean()
        with torch.no_grad():
            t = self.teacher(x_surrogate)
        t_logits, keep = mask_teacher_cr(t, self.removed)
        if t_logits.shape[0]:
            loss_td = self.lambda_2 * kl_divergence(t_logits, self.model(x_surrogate[keep]),
                                                    self.temperature)
        else:
            loss_td = torch.zeros((), device=x_forget.device)
        loss = loss_m + loss_td
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def run_config(batch: int, classes: int, width: int, *, repeats: int, distinct: int,
               device: torch.device) -> dict:
    torch.manual_seed(0)
    model = SyntheticBackbone(width, classes).to(device)
    head = random_head(classes, width, distinct, device)
    x_f = torch.randn(batch, 3, 32, 32, device=device)
    x_s = torch.randn(batch, 3, 32, 32, device=device)
    targets = torch.randint(1, classes, (batch,), device=device)  # class 0 is the removed one
    step = ScarStep(model, head, [0], x_f[:2])
    step(x_f, targets, x_s)  # warm-up: Adam state, lazy initialisation
    with common.PeakMemory(device) as mem:
        step(x_f, targets, x_s)
    seconds, _ = common.time_call(lambda: step(x_f, targets, x_s), repeats=repeats, warmup=0,
                                  device=device)
    head_mb = (head.factors_flat.numel() + head.proj_means.numel()) * 4 / 2**20
    return {"batch": batch, "classes": classes, "width": width, "ms": seconds * 1e3,
            "peak_mb": mem.peak_mb, "head_mb": head_mb, "mem_method": mem.method}


def configs(grid: str, small: bool) -> list[tuple[int, int, int]]:
    if small:
        return [(64, 10, 128), (128, 10, 128)]
    if grid == "full":
        return list(itertools.product(BATCHES, CLASSES, WIDTHS))
    b0, c0, w0 = BASE
    out = [(b, c0, w0) for b in BATCHES] + [(b0, c, w0) for c in CLASSES]
    out += [(b0, c0, w) for w in WIDTHS]
    return list(dict.fromkeys(out))  # the base configuration once


def batch_ratios(results: list[dict]) -> list[str]:
    """peak(2B)/peak(B) along each batch sweep (same classes and width)."""
    lines = []
    key = lambda r: (r["classes"], r["width"])  # noqa: E731
    for (c, w), group in itertools.groupby(sorted(results, key=key), key=key):
        rows = sorted(group, key=lambda r: r["batch"])
        if len(rows) < 2:
            continue
        parts = [f"peak({b['batch']})/peak({a['batch']}) = "
                 f"{b['peak_mb'] / a['peak_mb']:.2f} (batch x{b['batch'] / a['batch']:.0f})"
                 for a, b in itertools.pairwise(rows) if a["peak_mb"] > 0]
        per = ", ".join(f"{r['peak_mb'] / r['batch']:.2f}" for r in rows)
        lines.append(f"{c} classes, width {w}: " + "; ".join(parts) +
                     f". MB per sample: {per}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--grid", choices=("sweep", "full"), default="sweep",
                        help="sweep: one axis at a time around batch 256 / 100 classes / width "
                             "512 (default); full: every combination")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per configuration (default 3; 1 with --small)")
    parser.add_argument("--distinct", type=int, default=4,
                        help="classes with their own statistics; the head is tiled to the class "
                             "count (default 4)")
    iso = parser.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="run each configuration in a fresh process (default unless --small)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "batch,classes,width"
    args = parser.parse_args(argv)
    common.setup_logging()
    device = common.get_device(args)
    repeats = args.repeats or (1 if args.small else 3)

    if args.child:
        b, c, w = (int(v) for v in args.child.split(","))
        common.emit_child_result(run_config(b, c, w, repeats=repeats, distinct=args.distinct,
                                            device=device))
        return 0

    isolate = (not args.small) if args.isolate is None else args.isolate
    results = []
    for b, c, w in configs(args.grid, args.small):
        with common.phase(f"batch {b}, {c} classes, width {w}"):
            if isolate:
                child = [str(Path(__file__).resolve()), "--child", f"{b},{c},{w}",
                         "--repeats", str(repeats), "--distinct", str(args.distinct),
                         "--device", str(device)]
                if args.threads:
                    child += ["--threads", str(args.threads)]
                results.append(common.run_child(child))
            else:
                results.append(run_config(b, c, w, repeats=repeats, distinct=args.distinct,
                                          device=device))

    rows = [[r["batch"], r["classes"], r["width"], common.fmt(r["ms"], 1),
             common.fmt(r["peak_mb"], 1), common.fmt(r["head_mb"], 1)] for r in results]
    table = common.markdown_table(HEADERS, rows)
    print(table)
    notes = [
        f"One step = forget forward (FeatureModel) + Mahalanobis loss + teacher forward + CR mask "
        f"+ KL on the surrogate batch (same size) + backward + Adam. ms/step = median of "
        f"{repeats} warm step(s); peak MB = memory above the pre-step level during one warm step "
        f"({results[0]['mem_method']}); head MB = float32 factors + projected means. "
        f"{'Each configuration ran in a fresh process. ' if isolate else ''}"
        f"Heads built from {args.distinct} distinct classes, tiled.",
        *batch_ratios(results),
    ]
    print("\n" + "\n".join(notes))
    common.maybe_record(args, "SCAR optimisation step: time and peak memory", table,
                        "\n".join(f"- {n}" for n in notes), device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
