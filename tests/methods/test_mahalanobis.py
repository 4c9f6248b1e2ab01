"""Known-answer tests for SCAR's metric-forgetting math (scar.methods.mahalanobis)."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch

from scar.errors import CheckpointError, ConfigError
from scar.methods.mahalanobis import (
    ClassStats,
    MahalanobisHead,
    StatsAccumulator,
    correlation_normalize,
    direct_distances,
    inverse_tukey,
    precision_factors,
    precision_matrices,
    shrink,
    tukey,
)

F64 = torch.float64


def random_stats(num_classes: int, dim: int, seed: int = 0, n: int = 40) -> ClassStats:
    """Stats from random non-negative features (like ReLU outputs), all classes present."""
    g = torch.Generator().manual_seed(seed)
    acc = StatsAccumulator(num_classes, dim, delta=0.5)
    for c in range(num_classes):
        centre = torch.rand(dim, generator=g, dtype=F64) * 2
        x = (centre + 0.5 * torch.randn(n, dim, generator=g, dtype=F64)).relu()
        acc.update(x, torch.full((n,), c))
    return acc.finalize()


def identity_stats(means: dict[int, list[float]], num_classes: int) -> ClassStats:
    """Stats with identity covariances, so every P_c = I and d_c = ‖u − m_c‖² exactly.

    shrink(I) = I + γ1·1·I + γ2·0 (no non-zero off-diagonal) = (1 + γ1)·I, twice → (1 + γ1)²·I;
    correlation normalisation brings it back to I, and pinv(I) = I.
    """
    dim = len(next(iter(means.values())))
    mu = torch.zeros(num_classes, dim, dtype=F64)
    covs = torch.zeros(num_classes, dim, dim, dtype=F64)
    for c, m in means.items():
        mu[c] = torch.tensor(m, dtype=F64)
        covs[c] = torch.eye(dim, dtype=F64)
    counts = torch.tensor([10 if c in means else 0 for c in range(num_classes)])
    return ClassStats(mu, covs, counts, torch.tensor(sorted(means)), delta=0.5)


# ------------------------------------------------------------------------------------ tukey


def test_tukey_power_identity_and_negatives():
    f = torch.tensor([0.0, 0.25, 4.0], dtype=F64)
    assert torch.allclose(tukey(f, 0.5), torch.tensor([0.0, 0.5, 2.0], dtype=F64))
    neg = torch.tensor([-4.0, -1e-9, 0.0, 1e-9, 9.0], dtype=F64)
    assert torch.equal(tukey(neg, 1.0), neg)
    assert torch.equal(tukey(neg, 1.0, mode="clamp"), neg)  # δ = 1 is the identity in every mode
    signed = tukey(neg, 0.5, mode="signed")
    clamp = tukey(neg, 0.5, mode="clamp")
    assert torch.isfinite(signed).all() and torch.isfinite(clamp).all()
    assert signed[0] == -2.0 and signed[-1] == 3.0
    assert clamp[0] == 0.0 and clamp[1] == 0.0 and clamp[-1] == 3.0
    with pytest.raises(ConfigError):
        tukey(neg, 0.5, mode="bogus")
    with pytest.raises(ConfigError):
        tukey(neg, 0.0)


def test_inverse_tukey_undoes_tukey():
    f = torch.tensor([-9.0, -0.25, 0.0, 0.25, 4.0], dtype=F64)
    assert torch.allclose(inverse_tukey(tukey(f, 0.5), 0.5), f)
    assert torch.allclose(inverse_tukey(tukey(f, 0.5, mode="clamp"), 0.5, mode="clamp"),
                          f.clamp_min(0))
    # A draw below 0 in clamp space maps to a zero feature (ReLU features are never negative).
    assert inverse_tukey(torch.tensor([-1.0]), 0.5, mode="clamp").item() == 0.0
    assert torch.allclose(inverse_tukey(tukey(f, 2.0), 2.0), f)


@pytest.mark.parametrize("mode", ["signed", "clamp"])
def test_tukey_gradient_finite_at_zero(mode):
    f = torch.tensor([0.0, -0.0, 1e-12, -0.3, 0.3], dtype=torch.float32, requires_grad=True)
    tukey(f, 0.5, mode=mode).sum().backward()
    assert torch.isfinite(f.grad).all()
    # Exact derivative away from the linearised patch: 0.5 · 0.3^-0.5.
    assert torch.isclose(f.grad[4], torch.tensor(0.5 * 0.3**-0.5))


# ------------------------------------------------------------------------------------ shrink


def test_shrink_hand_computed_with_nonzero_offdiagonal_rule():
    s = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=F64)
    # V1 = (4 + 2 + 3)/3 = 3. Off-diagonal entries 1, 0, 0, 1, 0, 0: the non-zero ones are 1, 1,
    # so V2 = 1 (the mean over all six would be 1/3).
    # γ1 = 2, γ2 = 0.5: diagonal + 2·3 = +6, off-diagonal + 0.5·1 = +0.5.
    expected = torch.tensor([[10.0, 1.5, 0.5], [1.5, 8.0, 0.5], [0.5, 0.5, 9.0]], dtype=F64)
    assert torch.allclose(shrink(s, 2.0, 0.5), expected)


def test_shrink_twice_hand_computed():
    s = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=F64)
    # Once (γ = 3): V1 = 3, V2 = 1 → diag + 9, off-diag + 3 → [[13,4,3],[4,11,3],[3,3,12]].
    once = torch.tensor([[13.0, 4.0, 3.0], [4.0, 11.0, 3.0], [3.0, 3.0, 12.0]], dtype=F64)
    # Twice: V1 = (13+11+12)/3 = 12, V2 = (4+3+3)/3 = 10/3 → diag + 36, off-diag + 10.
    twice = torch.tensor([[49.0, 14.0, 13.0], [14.0, 47.0, 13.0], [13.0, 13.0, 48.0]], dtype=F64)
    assert torch.allclose(shrink(s, 3, 3), once)
    assert torch.allclose(shrink(shrink(s, 3, 3), 3, 3), twice)
    # precision_matrices(shrink_times=2) is pinv(corr(shrink(shrink(S)))).
    p = precision_matrices(s[None], 3, 3, shrink_times=2)[0]
    assert torch.allclose(p, torch.linalg.inv(correlation_normalize(twice)))
    # Self-forget in the reference shrinks once (the preset's shrink_times=1).
    p = precision_matrices(s[None], 3, 3, shrink_times=1)[0]
    assert torch.allclose(p, torch.linalg.inv(correlation_normalize(once)))


def test_shrink_batched_and_no_offdiagonal():
    a = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=F64)
    b = torch.diag(torch.tensor([1.0, 3.0], dtype=F64))  # no non-zero off-diagonal → V2 = 0
    out = shrink(torch.stack([a, b])[None], 1.0, 1.0)  # leading dims [1, 2]
    assert out.shape == (1, 2, 2, 2)
    # a: V1 = 3, V2 = 1 → [[7, 2], [2, 5]]; b: V1 = 2, V2 = 0 → diag(3, 5), off-diagonal stays 0.
    assert torch.allclose(out[0, 0], torch.tensor([[7.0, 2.0], [2.0, 5.0]], dtype=F64))
    assert torch.allclose(out[0, 1], torch.diag(torch.tensor([3.0, 5.0], dtype=F64)))


# ------------------------------------------------------------------------- normalise, pinv


def test_correlation_normalize_hand_2x2_and_unit_diagonal():
    s = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=F64)
    # σ = (2, 3): off-diagonal 2 / (2·3) = 1/3.
    expected = torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]], dtype=F64)
    assert torch.allclose(correlation_normalize(s), expected)
    covs = random_stats(3, 6).covs
    diag = torch.diagonal(correlation_normalize(shrink(covs, 3, 3)), dim1=-2, dim2=-1)
    assert torch.allclose(diag, torch.ones_like(diag))
    zero = correlation_normalize(torch.zeros(2, 2, dtype=F64))  # guarded: 0, not NaN
    assert torch.equal(zero, torch.zeros(2, 2, dtype=F64))


def test_pinv_of_spd_is_inverse():
    # Already a correlation matrix, no shrinkage: P = inverse of [[1, .5], [.5, 1]]
    # = 1/(1 − 0.25) · [[1, −.5], [−.5, 1]] = [[4/3, −2/3], [−2/3, 4/3]].
    corr = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]], dtype=F64)
    p = precision_matrices(corr, shrink_times=0)
    assert torch.allclose(p[0], torch.tensor([[4 / 3, -2 / 3], [-2 / 3, 4 / 3]], dtype=F64))


def test_precision_factors_reconstruct():
    p = precision_matrices(random_stats(4, 6).covs)
    w = precision_factors(p)
    assert w.shape == (4, 6, 6)
    assert torch.allclose(w @ w.transpose(-1, -2), p, rtol=1e-9, atol=1e-10)
    singular = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=F64)  # rank 1, eigenvalues 2, 0
    ws = precision_factors(singular)
    assert torch.isfinite(ws).all()
    assert torch.allclose(ws @ ws.transpose(-1, -2), singular)


def test_precision_rejects_bad_shrink_times():
    with pytest.raises(ConfigError):
        precision_matrices(torch.eye(2, dtype=F64)[None], shrink_times=-1)


# ------------------------------------------------------------------------------ accumulator


def test_accumulator_batches_equal_all_at_once_and_torch_cov():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(90, 5, generator=g, dtype=F64) + 3.0).relu()
    y = torch.randint(0, 3, (90,), generator=g)
    whole = StatsAccumulator(3, 5, 0.5)
    whole.update(x, y)
    batched = StatsAccumulator(3, 5, 0.5)
    for xb, yb in zip(x.split(7), y.split(7)):
        batched.update(xb, yb)
    a, b = whole.finalize(), batched.finalize()
    assert torch.equal(a.classes, torch.tensor([0, 1, 2]))
    assert torch.equal(a.counts, b.counts)
    assert torch.allclose(a.means, b.means, rtol=1e-12, atol=1e-12)
    assert torch.allclose(a.covs, b.covs, rtol=1e-10, atol=1e-12)
    for c in range(3):
        gc = tukey(x[y == c], 0.5)
        assert torch.allclose(a.means[c], gc.mean(0))
        assert torch.allclose(a.covs[c], torch.cov(gc.T))  # torch.cov is unbiased by default


def test_accumulator_large_mean_stays_accurate():
    # Features far from zero relative to their spread: raw Σggᵀ − nμμᵀ would cancel badly.
    g = torch.Generator().manual_seed(2)
    x64 = 1e4 + torch.randn(200, 3, generator=g, dtype=F64)
    acc = StatsAccumulator(1, 3, delta=1.0)
    for xb in x64.split(13):
        acc.update(xb, torch.zeros(xb.shape[0], dtype=torch.long))
    assert torch.allclose(acc.finalize().covs[0], torch.cov(x64.T), rtol=1e-8, atol=1e-10)


def test_accumulator_too_few_samples_warns_and_excludes(caplog):
    acc = StatsAccumulator(4, 2, 0.5)
    acc.update(
        torch.tensor([[1.0, 2.0], [2.0, 1.0], [3.0, 3.0], [0.5, 0.5]]),
        torch.tensor([0, 0, 1, 3]),
    )
    with caplog.at_level(logging.WARNING, logger="scar.methods.mahalanobis"):
        stats = acc.finalize()
    assert stats.classes.tolist() == [0]
    assert stats.counts.tolist() == [2, 1, 0, 1]
    assert "[1, 3]" in caplog.text
    assert torch.equal(stats.covs[1], torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ConfigError):
        acc.update(torch.ones(1, 2), torch.tensor([4]))


# ---------------------------------------------------------------------------- ClassStats I/O


def test_class_stats_save_load_round_trip(tmp_path):
    stats = random_stats(5, 4).subset([0, 1, 3, 4])
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    # A safetensors file: 8-byte little-endian header length, then a JSON header (no pickle).
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert json.loads(header["__metadata__"]["scar"])["delta"] == 0.5
    back = ClassStats.load(path)
    assert torch.equal(back.classes, torch.tensor([0, 1, 3, 4]))
    assert torch.equal(back.means, stats.means) and torch.equal(back.covs, stats.covs)
    assert torch.equal(back.counts, stats.counts)
    assert back.delta == 0.5 and back.tukey_mode == "signed"
    assert torch.equal(back.covs[2], torch.zeros(4, 4, dtype=F64))  # subset dropped class 2


def test_class_stats_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError):
        ClassStats.load(path)
    with pytest.raises(CheckpointError):
        ClassStats.load(tmp_path / "missing.safetensors")


def test_subset_of_class_without_stats_raises():
    with pytest.raises(ConfigError, match=r"\[2\]"):
        identity_stats({0: [1.0, 0.0], 1: [0.0, 1.0]}, 3).subset([0, 2])


# ------------------------------------------------------------------------------ distances


def test_batched_distances_equal_direct():
    stats = random_stats(5, 8, seed=3)
    g = torch.Generator().manual_seed(4)
    f = (torch.randn(7, 8, generator=g, dtype=F64) + 1.0).relu()
    for shrink_times in (1, 2):
        head = MahalanobisHead(stats, shrink_times=shrink_times)
        fast = head.distances(f)
        slow = direct_distances(f, stats, shrink_times=shrink_times)
        assert fast.shape == (7, 5) and fast.dtype == F64
        assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-12)


def test_distances_rows_independent_of_batch():
    stats = random_stats(5, 8, seed=5)
    head = MahalanobisHead(stats)
    f = torch.rand(3, 8, dtype=F64)
    together = head.distances(f)
    alone = torch.cat([head.distances(f[i : i + 1]) for i in range(3)])
    assert together.shape == (3, 5) and alone.shape == (3, 5)
    assert torch.allclose(together, alone, rtol=1e-12, atol=1e-14)


def test_distances_keep_feature_dtype_and_gradients_finite():
    head = MahalanobisHead(random_stats(4, 6, seed=6))
    f = torch.rand(3, 6)
    f[0, :3] = 0.0  # exact zeros: Tukey's power has an infinite derivative there
    f[1] = 0.0  # an all-zero feature vector (L2-normalisation of 0)
    f.requires_grad_(True)
    d = head.distances(f)
    assert d.dtype == torch.float32
    d.sum().backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    f2 = torch.rand(3, 6, requires_grad=True)
    head.distance_to(f2, torch.tensor([0, 3, 1])).sum().backward()
    assert torch.isfinite(f2.grad).all() and f2.grad.abs().sum() > 0


def test_signed_and_clamp_heads_on_negative_features():
    stats = random_stats(3, 4, seed=7)
    f = torch.randn(5, 4, dtype=F64)  # ViT-like: negative entries
    for mode in ("signed", "clamp"):
        d = MahalanobisHead(stats, tukey_mode=mode).distances(f)
        assert torch.isfinite(d).all()
        assert torch.allclose(d, direct_distances(f, stats, tukey_mode=mode), rtol=1e-6)


# --------------------------------------------------------------------- nearest wrong class


def _unit(*pairs: tuple[int, float], dim: int = 5) -> torch.Tensor:
    v = torch.zeros(dim, dtype=F64)
    for i, a in pairs:
        v[i] = a
    return v


def test_nearest_wrong_class_returns_class_ids_with_a_skipped_class():
    # Class c's mean is the basis vector e_c; class 2 has no statistics (removed). P_c = I, so
    # d_c = ‖u − e_c‖² = 2 − 2·u_c for unit u: the nearest class is the largest coordinate of u.
    eye = torch.eye(5, dtype=F64)
    stats = identity_stats({c: eye[c].tolist() for c in (0, 1, 3, 4)}, num_classes=5)
    head = MahalanobisHead(stats)
    assert head.class_ids.tolist() == [0, 1, 3, 4]
    # Features are u² (δ = 0.5 then gives back u up to normalisation).
    u = torch.stack(
        [
            _unit((1, 1.0), (3, 0.5), (4, 0.1)),  # label 1 → 3 (position 2: the buggy answer)
            _unit((3, 1.0), (4, 0.5), (2, 0.9)),  # label 3 → 4, never 2 (no stats), never 3 (own)
            _unit((0, 1.0), (4, 0.6), (1, 0.3)),  # label 0 → 4
            _unit((2, 1.0), (1, 0.4), (0, 0.2)),  # label 2 (removed class) → 1
        ]
    )
    labels = torch.tensor([1, 3, 0, 2])
    got = head.nearest_wrong_class(u.square(), labels)
    assert got.dtype == torch.long
    assert got.tolist() == [3, 4, 4, 1]
    # Cross-check with the direct implementation, mapping positions to ids ourselves.
    direct = direct_distances(u.square(), stats)
    own = stats.classes[None, :] == labels[:, None]
    assert stats.classes[direct.masked_fill(own, float("inf")).argmin(1)].tolist() == got.tolist()


def test_nearest_wrong_class_errors_with_single_class():
    head = MahalanobisHead(identity_stats({1: [1.0, 0.0]}, num_classes=3))
    with pytest.raises(ConfigError, match="wrong class"):
        head.nearest_wrong_class(torch.rand(2, 2), torch.tensor([1, 1]))
    # A sample of another class may still move to class 1.
    assert head.nearest_wrong_class(torch.rand(1, 2), torch.tensor([0])).tolist() == [1]


def test_distance_to_maps_ids_and_rejects_missing_class():
    eye = torch.eye(5, dtype=F64)
    stats = identity_stats({c: eye[c].tolist() for c in (0, 1, 3, 4)}, num_classes=5)
    head = MahalanobisHead(stats)
    f = torch.rand(2, 5, dtype=F64)
    full = head.distances(f)
    got = head.distance_to(f, torch.tensor([3, 0]))
    assert torch.allclose(got, torch.stack([full[0, 2], full[1, 0]]))
    with pytest.raises(ConfigError, match=r"\[2\]"):
        head.distance_to(f, torch.tensor([2, 0]))
    with pytest.raises(ConfigError, match=r"\[7\]"):
        head.distance_to(f, torch.tensor([7, 0]))


def test_head_rejects_mismatched_delta_and_empty_stats():
    stats = identity_stats({0: [1.0, 0.0], 1: [0.0, 1.0]}, num_classes=2)
    with pytest.raises(ConfigError, match="delta"):
        MahalanobisHead(stats, delta=1.0)
    empty = ClassStats(
        stats.means, stats.covs, stats.counts, torch.tensor([], dtype=torch.long), delta=0.5
    )
    with pytest.raises(ConfigError, match="No class"):
        MahalanobisHead(empty)


def test_grouped_distance_to_matches_full_matrix_values_and_gradients():
    acc = StatsAccumulator(6, 12, 0.5)
    g = torch.Generator().manual_seed(0)
    acc.update(torch.rand(600, 12, generator=g), torch.randint(0, 6, (600,), generator=g))
    head = MahalanobisHead(acc.finalize().subset([0, 2, 3, 5])).to(dtype=torch.float64)
    f = torch.rand(40, 12, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 3, 5])[torch.randint(0, 4, (40,), generator=g)]
    grouped = head.distance_to(f, target)
    full = head.distances(f).gather(1, head.positions(target)[:, None]).squeeze(1)
    torch.testing.assert_close(grouped, full)
    (g1,) = torch.autograd.grad(grouped.sum(), f)
    (g2,) = torch.autograd.grad(full.sum(), f)
    torch.testing.assert_close(g1, g2)


def test_distance_to_points_is_the_class_metric_between_sample_and_point():
    stats = random_stats(3, 6, seed=1)
    head = MahalanobisHead(stats).to(dtype=F64)
    g = torch.Generator().manual_seed(2)
    f = torch.rand(9, 6, generator=g, dtype=F64)
    target = torch.tensor([0, 1, 2] * 3)
    points = torch.nn.functional.normalize(torch.rand(9, 6, generator=g, dtype=F64), dim=-1)
    p = precision_matrices(stats.covs[stats.classes], 3.0, 3.0, 2)
    u = head.embed(f)
    slow = torch.stack([(u[i] - points[i]) @ p[target[i]] @ (u[i] - points[i])
                        for i in range(9)])
    torch.testing.assert_close(head.distance_to(f, target, points), slow)
    # A point at the class mean gives the plain distance to the class.
    at_mean = head.means[head.positions(target)]
    torch.testing.assert_close(head.distance_to(f, target, at_mean), head.distance_to(f, target))
