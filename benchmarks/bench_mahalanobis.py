"""The Mahalanobis term alone: batched ``MahalanobisHead.distances`` vs a per-sample loop.

Both compute d_c(x) = (u − m_c)ᵀ P_c (u − m_c) for every sample and every kept class, in float32
on the same device, in the same process:

* batched: ``MahalanobisHead.distances`` — P_c = W_c W_cᵀ factored once, all classes in one GEMM;
* per-sample: for each sample b, ``diff = u_b − m`` ([C, d]) and
  ``einsum('cd,cde,ce->c', diff, P, diff)`` with P from ``precision_matrices`` — vectorised over
  classes, looped over samples (the loop is the point; ``mahalanobis.direct_distances`` loops over
  classes too and runs in float64, so it is only used as a float64 spot check of 4 samples).

Both do the same number of multiply-adds (B·C·d²); the batched form turns B matrix-vector
products per class into one matrix-matrix product. The values are checked to agree (rtol 1e-4);
the peak memory of the batched distances + backward is measured too (see ``common.PeakMemory``).

    python benchmarks/bench_mahalanobis.py --threads 1  # batch {64,256,1024} x {10,100} classes
    python benchmarks/bench_mahalanobis.py --small      # batch 64, 10 classes, 64-d (CI smoke)
"""

from __future__ import annotations

import argparse
import sys

import common
import torch
import torch.nn.functional as F

from scar.methods.mahalanobis import (
    MahalanobisHead,
    StatsAccumulator,
    direct_distances,
    precision_matrices,
    tukey,
)

HEADERS = ["batch", "classes", "dim", "batched ms", "per-sample ms", "speed-up", "max rel err",
           "peak MB (fwd+bwd)", "[B, C·d] MB"]
RTOL = 1e-4
ATOL = 1e-6
ACCEPT = (1024, 100, 512, 10.0)  # batch, classes, dim, required speed-up on CPU


def random_stats(num_classes: int, dim: int, per_class: int, seed: int = 0):
    """Class statistics of random non-negative (ReLU-like) features, via StatsAccumulator."""
    g = torch.Generator().manual_seed(seed)
    acc = StatsAccumulator(num_classes, dim, delta=0.5)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    shift = torch.rand(num_classes, dim, generator=g)[labels]  # class-dependent means
    feats = torch.relu(torch.randn(len(labels), dim, generator=g) + shift)
    acc.update(feats, labels)
    return acc.finalize()


class PerSample:
    """The per-sample formula, float32, with P_c from ``precision_matrices`` (not the factors)."""

    def __init__(self, stats, device: torch.device):
        ids = stats.classes
        self.delta, self.mode = stats.delta, stats.tukey_mode
        self.p = precision_matrices(stats.covs[ids]).to(device, torch.float32)  # [C, d, d]
        self.m = F.normalize(stats.means[ids].to(torch.float64), dim=-1).to(device, torch.float32)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        u = F.normalize(tukey(features, self.delta, self.mode), dim=-1)
        out = torch.empty(u.shape[0], self.m.shape[0], device=u.device, dtype=u.dtype)
        for b in range(u.shape[0]):
            diff = u[b] - self.m  # [C, d]
            out[b] = torch.einsum("cd,cde,ce->c", diff, self.p, diff)
        return out


def measure(batch: int, head: MahalanobisHead, direct: PerSample, stats, device: torch.device,
            small: bool) -> dict:
    g = torch.Generator().manual_seed(batch)
    feats = torch.relu(torch.randn(batch, head.dim, generator=g) + 0.5).to(device)
    with torch.no_grad():
        fast = head.distances(feats)
        slow = direct(feats)
        ok = torch.allclose(fast, slow, rtol=RTOL, atol=ATOL)
        rel = float(((fast - slow).abs() / slow.abs().clamp_min(1e-12)).max())
        # float64 spot check against the library's explicit double loop (4 samples).
        ref = direct_distances(feats[:4], stats)
        rel64 = float(((fast[:4].double().cpu() - ref).abs() / ref.abs().clamp_min(1e-12)).max())
        t_fast, _ = common.time_call(lambda: head.distances(feats), repeats=5, warmup=2,
                                     device=device, min_seconds=0.3 if small else 1.0)
        t_slow, _ = common.time_call(lambda: direct(feats), repeats=1 if small else 3, warmup=1,
                                     device=device)
    x = feats.clone().requires_grad_(True)
    with common.PeakMemory(device) as mem:
        head.distances(x).sum().backward()
    proj_mb = batch * head.factors_flat.shape[1] * 4 / 2**20
    return {"batch": batch, "classes": int(head.class_ids.numel()), "dim": head.dim,
            "fast_s": t_fast, "slow_s": t_slow, "ok": ok, "rel": rel, "rel64": rel64,
            "peak_mb": mem.peak_mb, "mem_method": mem.method, "proj_mb": proj_mb}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--classes", default="10,100")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=32,
                        help="random feature vectors per class for the statistics (default 32)")
    args = parser.parse_args(argv)
    common.setup_logging()
    device = common.get_device(args)
    if args.small:
        batches, class_counts, dim = [64], [10], 64
    else:
        batches = [int(b) for b in args.batches.split(",")]
        class_counts = [int(c) for c in args.classes.split(",")]
        dim = args.dim

    results = []
    for c in class_counts:
        with common.phase(f"statistics + precision for {c} classes x {dim}-d"):
            stats = random_stats(c, dim, args.per_class)
            head = MahalanobisHead(stats).to(device=device, dtype=torch.float32)
            direct = PerSample(stats, device)
        for b in batches:
            with common.phase(f"batch {b}, {c} classes"):
                results.append(measure(b, head, direct, stats, device, args.small))
        del head, direct, stats

    rows = [[r["batch"], r["classes"], r["dim"], common.fmt(r["fast_s"] * 1e3, 2),
             common.fmt(r["slow_s"] * 1e3, 1), f"{r['slow_s'] / r['fast_s']:.1f}x",
             f"{r['rel']:.1e}", common.fmt(r["peak_mb"], 1), common.fmt(r["proj_mb"], 1)]
            for r in results]
    table = common.markdown_table(HEADERS, rows)
    print(table)

    notes = [
        f"Per-sample = loop over samples of einsum('cd,cde,ce->c') with P_c from "
        f"precision_matrices (float32); batched = MahalanobisHead.distances (float32). "
        f"Times are medians per call (forward only, no grad). Values agree within rtol {RTOL}: "
        f"{'yes' if all(r['ok'] for r in results) else 'NO'}; float64 spot check "
        f"(direct_distances, 4 samples) max rel err {max(r['rel64'] for r in results):.1e}.",
        f"Peak MB = memory above the pre-call level during distances + backward "
        f"({results[0]['mem_method']}); [B, C·d] MB = size of one float32 projection "
        "matrix, the dominant intermediate.",
    ]
    b, c, d, need = ACCEPT
    hit = [r for r in results if (r["batch"], r["classes"], r["dim"]) == (b, c, d)]
    if hit:
        speedup = hit[0]["slow_s"] / hit[0]["fast_s"]
        verdict = "met" if speedup >= need else "NOT met"
        notes.append(f"Acceptance (>= {need:.0f}x at batch {b}, {c} classes, {d}-d on CPU): "
                     f"{speedup:.1f}x, {verdict}{'' if device.type == 'cpu' else ' (not CPU)'}.")
    print("\n" + "\n".join(notes))
    common.maybe_record(args, "Mahalanobis distances: batched vs per-sample", table,
                        "\n".join(f"- {n}" for n in notes), device=device)
    if not all(r["ok"] for r in results):
        print("ERROR: batched and per-sample distances differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
