"""Contract tests run automatically over EVERY registered method."""

from __future__ import annotations

import pytest
import torch

from scar.data.base import TensorImages
from scar.errors import ConfigError, MissingRequirementError
from scar.methods import METHODS, UnlearnData, access_profile, build_method
from scar.methods.statistics import class_statistics
from scar.models.adapter import FeatureModel

#: Small hyperparameters so that each method runs in a second or two on the tiny data.
FAST: dict[str, dict] = {
    "scar": {"epochs": 2, "batch_size": 64, "surrogate_steps": 2},
    "scar_self_forget": {"epochs": 2, "batch_size": 64, "surrogate_steps": 2, "synth_steps": 5},
    "finetune": {"epochs": 1, "batch_size": 64},
    "negative_gradient": {"epochs": 2, "batch_size": 64},
    "random_labels": {"epochs": 2, "batch_size": 64},
    "duck": {"epochs": 2, "batch_size": 64},
    "retrain": {"epochs": 1, "batch_size": 64},
    "boundary_shrink": {"epochs": 2, "batch_size": 64, "lr": 1e-3},
    "boundary_expand": {"epochs": 2, "batch_size": 64, "lr": 1e-3},
    "jit": {"batch_size": 64, "n_samples": 3},
    "ssd": {"batch_size": 128, "alpha": 2.0},
    "scrub": {"epochs": 1, "msteps": 1, "batch_size": 64},
    "bad_teacher": {"batch_size": 64},
    "salun": {"epochs": 1, "batch_size": 64},
    "l1_sparse": {"epochs": 1, "batch_size": 64},
    "unsir": {"noise_batch": 16, "noise_steps": 5, "noise_copies": 2, "batch_size": 64},
}
#: A hyperparameter value each method must refuse.
BAD: dict[str, tuple[str, object]] = {}


@pytest.fixture(scope="module")
def stats(tiny_model, synth, tiny_spec):
    return class_statistics(tiny_model, synth.train, synth.info.input_spec,
                            num_classes=tiny_spec.num_classes)


@pytest.fixture(scope="module")
def surrogate(synth, tiny_surrogate):
    # Noise plus a few in-distribution images, so that self-forget finds images of the class.
    imgs = torch.cat([tiny_surrogate.images, synth.test.images])
    return TensorImages(imgs, torch.full((len(imgs),), -1))


def make_data(synth, splits, surrogate, stats, scenario="CR", **override) -> UnlearnData:
    kw = dict(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
              scenario=scenario, removed_classes=splits.removed_classes,
              forget=splits.train_forget, retain=splits.train_retain, surrogate=surrogate,
              stats=stats, original_test_acc=0.9, seed=0)
    kw.update(override)
    return UnlearnData(**kw)


def fast(name: str) -> dict:
    return dict(FAST.get(name, {}))


class Exploding(TensorImages):
    """Images that must not be read: loading any of them fails the test."""

    def load(self, idx):
        raise AssertionError("an image the method must not read was read")


def exploding(images: TensorImages) -> Exploding:
    return Exploding(images.images, images.labels)


@pytest.mark.parametrize("name", METHODS.names())
def test_does_not_mutate_input_and_is_deterministic(name, tiny_model, synth, cr_splits,
                                                    surrogate, stats):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    outs = []
    for _ in range(2):
        method = build_method(name, **fast(name))
        data = make_data(synth, cr_splits, surrogate, stats)
        new = method.unlearn(tiny_model, data)
        assert new is not tiny_model
        outs.append(new.state_dict())
        assert method.seconds_ > 0
        assert isinstance(method.history_, list)
        assert "retain-free" in access_profile(method, method.access_)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "input model was mutated"
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0]), "not deterministic"
    changed = any(not torch.equal(outs[0][k], before[k]) for k in before
                  if before[k].is_floating_point())
    assert changed, "the method returned the model unchanged"


@pytest.mark.parametrize("name", METHODS.names())
def test_reads_no_image_it_does_not_declare(name, tiny_model, synth, cr_splits, surrogate, stats):
    """The data-access profile is a claim: every image source outside ``uses()`` explodes when
    read (a method that says retain-free must load no retain image)."""
    method = build_method(name, **fast(name))
    uses = method.uses()
    given = {kind: exploding(images) if kind not in uses else images for kind, images in (
        ("forget", cr_splits.train_forget), ("retain", cr_splits.train_retain),
        ("surrogate", surrogate))}
    method.unlearn(tiny_model, make_data(synth, cr_splits, stats=stats, **given))
    touched = {k for k, v in method.access_.items() if v}
    assert touched <= uses
    assert ("retain-free: yes" in access_profile(method)) == ("retain" not in uses)


@pytest.mark.parametrize("name", METHODS.names())
def test_the_callers_random_stream_is_left_alone(name, tiny_model, synth, cr_splits, surrogate,
                                                 stats):
    """Issue 11: SCAR reseeded the caller's global generator (torch.manual_seed(data.seed))."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_method(name, **fast(name)).unlearn(tiny_model, make_data(synth, cr_splits, surrogate,
                                                                   stats))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", METHODS.names())
def test_missing_required_data_is_a_clear_error(name, tiny_model, synth, cr_splits, surrogate,
                                                stats):
    method = build_method(name, **fast(name))
    needed = sorted(method.required_data())
    assert needed, f"{name} declares no required data"
    for kind in needed:
        given = {"surrogate": surrogate, "stats": stats, kind: None}
        data = make_data(synth, cr_splits, **given)
        with pytest.raises(MissingRequirementError, match=kind):
            method.unlearn(tiny_model, data)


@pytest.mark.parametrize("name", METHODS.names())
def test_bad_hyperparameters_are_refused(name):
    with pytest.raises(ConfigError, match="no hyperparameter 'not_a_param'"):
        build_method(name, not_a_param=1)
    cls = METHODS.get(name)
    numeric = [f for f in ("epochs", "lr", "batch_size") if hasattr(cls, f)]
    assert numeric, f"{name} has none of epochs/lr/batch_size to validate"
    with pytest.raises(ConfigError, match=numeric[0]):
        build_method(name, **{numeric[0]: -1})


@pytest.mark.parametrize("name", METHODS.names())
def test_non_finite_numbers_are_refused(name):
    """NaN passes every comparison and inf every lower bound: each numeric setting of each
    method refuses both (a `--set lambda_1=nan` once ran and saved NaN weights)."""
    import dataclasses

    cls = METHODS.get(name)
    numeric = [f.name for f in dataclasses.fields(cls)
               if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)
               or "float" in str(f.type)]
    assert numeric
    for field in numeric:
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=field):
                build_method(name, **{field: bad})


@pytest.mark.parametrize("extra", [{}, {"cover_per_class": 8, "cover_steps": 5}],
                         ids=["plain", "cover"])
def test_stored_statistics_read_no_retain_image(extra, tiny_model, synth, cr_splits, surrogate,
                                                stats):
    data = make_data(synth, cr_splits, surrogate, stats, retain=exploding(cr_splits.train_retain))
    method = build_method("scar", **fast("scar"), stats="stored", **extra)
    method.unlearn(tiny_model, data)
    assert method.access_.get("retain", 0) == 0
    assert method.access_["forget"] > 0 and method.access_["surrogate"] > 0
    assert "retain-free: yes" in access_profile(method, method.access_)
    assert method.cover_images_ == extra.get("cover_per_class", 0) * (synth.info.num_classes - 1)


def test_retain_statistics_are_reported_as_retain_access(tiny_model, synth, cr_splits,
                                                         surrogate, stats):
    method = build_method("scar", **fast("scar"), stats="retain")
    method.unlearn(tiny_model, make_data(synth, cr_splits, surrogate, None))
    assert method.access_["retain"] == len(cr_splits.train_retain)
    assert "retain-free: no" in access_profile(method, method.access_)


def test_hr_scenario_runs_for_scar(tiny_model, synth, hr_splits, surrogate, stats):
    method = build_method("scar", **fast("scar"))
    data = make_data(synth, hr_splits, surrogate, stats, scenario="HR")
    new = method.unlearn(tiny_model, data)
    assert new is not tiny_model and method.history_


@pytest.mark.parametrize("slack", [0.0, 0.3])
def test_scar_auto_stop_checks_after_the_step_that_nears_the_target(
        slack, tiny_model, synth, cr_splits, surrogate, stats, monkeypatch):
    """stop_check=auto runs a full forget-set evaluation right after any step whose own batch
    accuracy is within stop_slack of the target (not only at forget-batch ends), and only then."""
    from scar.methods.scar_method import SCAR

    calls: list[int] = []
    confirm = SCAR.confirm_stop

    def spy(self, *args):
        calls.append(len(self.history_))  # the step just recorded
        return confirm(self, *args)

    monkeypatch.setattr(SCAR, "confirm_stop", spy)
    method = build_method("scar", epochs=8, batch_size=64, surrogate_steps=4, stop_slack=slack,
                          lr=5e-4)
    method.unlearn(tiny_model, make_data(synth, cr_splits, surrogate, stats))
    near = [r["step"] for r in method.history_ if r["batch_forget_acc"] < 0.01 + slack]
    assert near, "the run never neared the target; the test needs a stronger push"
    assert calls == near  # a check after every such step, and after no other
    if method.stop_reason_ != "max epochs":
        assert calls[-1] == method.steps_


def test_pooled_accuracy_counts_images_over_the_window():
    from scar.methods.scar_method import PooledAccuracy

    pooled = PooledAccuracy(2)
    steps = [[1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0]]
    got = [pooled.add(torch.tensor(s, dtype=torch.bool)) for s in steps]
    assert got == [0.5, 8 / 10, 6 / 8]  # images pooled, not batch means; the oldest step drops
    single = PooledAccuracy(1)
    assert [single.add(torch.tensor(s, dtype=torch.bool)) for s in steps] == [0.5, 1.0, 0.0]


@pytest.mark.parametrize("window", [1, 3])
def test_scar_hr_checks_follow_the_pooled_batch_accuracy(window, tiny_model, synth, hr_splits,
                                                         surrogate, stats, monkeypatch):
    """In HR a stopping check follows the forget-batch accuracy pooled over the last
    stop_window forget batches (default 1: the step's own batch)."""
    from scar.methods.scar_method import SCAR

    calls: list[int] = []
    confirm = SCAR.confirm_stop

    def spy(self, *args):
        calls.append(len(self.history_))
        return confirm(self, *args)

    monkeypatch.setattr(SCAR, "confirm_stop", spy)
    method = build_method("scar", epochs=12, batch_size=8, surrogate_steps=1, lr=1e-2,
                          lambda_1=10.0, stop_window=window)
    data = make_data(synth, hr_splits, surrogate, stats, scenario="HR")
    method.unlearn(tiny_model, data)
    hist = method.history_
    assert all(0 <= r["window_forget_acc"] <= 1 for r in hist)
    target = data.original_test_acc
    assert calls == [r["step"] for r in hist if r["window_forget_acc"] < target]
    assert calls, "no step came under the target; the test needs a stronger push"


def test_self_forget_refuses_hr_and_retain_stats(tiny_model, synth, hr_splits, surrogate,
                                                 stats):
    with pytest.raises(ConfigError, match="stats"):
        build_method("scar_self_forget", stats="retain")
    method = build_method("scar_self_forget", **fast("scar_self_forget"))
    with pytest.raises(ConfigError, match="scenarios"):
        method.unlearn(tiny_model, make_data(synth, hr_splits, surrogate, stats, scenario="HR"))


def test_select_proxies_fills_up_with_the_most_probable_images():
    from scar.methods.self_forget import select_proxies

    preds = torch.tensor([1, 0, 2, 1, 0, 0])
    best = torch.tensor([1, 1, 1, 1, 1, 1])
    prob = torch.tensor([0.9, 0.4, 0.1, 0.8, 0.6, 0.2])
    hit, labels, rest = select_proxies(preds, best, prob, (1,), min_proxies=0)
    assert hit.tolist() == [0, 3] and rest.tolist() == [1, 2, 4, 5]  # the reference: argmax
    hit, labels, rest = select_proxies(preds, best, prob, (1,), min_proxies=4)
    assert sorted(hit.tolist()) == [0, 1, 3, 4] and labels.tolist() == [1, 1, 1, 1]
    assert rest.tolist() == [2, 5]
    hit, labels, rest = select_proxies(preds, best, prob, (1,), min_proxies=0, max_proxies=1)
    assert hit.tolist() == [0] and rest.tolist() == [1, 2, 3, 4, 5]  # the most probable one


@pytest.mark.parametrize("target", ["mean", "sample"])
def test_proxy_synthesis_moves_proxies_to_the_removed_class(target, tiny_model, synth,
                                                            cr_splits, tiny_surrogate, stats):
    noise = TensorImages(tiny_surrogate.images, torch.full((len(tiny_surrogate),), -1))
    data = make_data(synth, cr_splits, noise, stats)
    teacher = FeatureModel(tiny_model.eval())

    def removed_rate(forget):
        x = next(iter(data.loader(forget, 1024, shuffle=False))).x
        with torch.no_grad():
            return float((teacher.logits(x).argmax(1) == 1).float().mean())

    plain = build_method("scar_self_forget", min_proxies=128, max_proxies=None, synth_steps=0,
                         replay_steps=0)
    forget, rest, _ = plain.prepare(teacher, data)
    assert len(forget) == 128 and len(rest) == len(noise) - 128
    assert plain.access_note() is None  # the reference reads no removed-class statistics
    synth_ = build_method("scar_self_forget", min_proxies=128, max_proxies=None, synth_steps=40,
                          synth_target=target)
    moved, _, _ = synth_.prepare(teacher, data)
    assert moved.images.dtype == torch.uint8 and moved.labels.tolist() == [1] * 128
    assert removed_rate(moved) > max(0.8, removed_rate(forget))
    assert synth_.proxy_stats_ and "removed classes" in access_profile(synth_)


def test_sampled_synthesis_points_spread_like_the_class(tiny_model, synth, cr_splits, stats):
    from scar.methods.synthesis import sample_points

    head = build_method("scar").build_head(stats.subset([1]), torch.device("cpu"))
    labels = torch.ones(2000, dtype=torch.long)
    a = sample_points(stats, labels, head, torch.Generator().manual_seed(0))
    b = sample_points(stats, labels, head, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=1), torch.ones(2000))
    # As far from the class-mean direction, on average, as the class's real embedded features.
    data = make_data(synth, cr_splits, None, stats)  # cr_splits removes class 1
    x = next(iter(data.loader("forget", 1024, shuffle=False))).x
    with torch.no_grad():
        real = head.embed(FeatureModel(tiny_model.eval())(x)[0])
    mean_dir = head.means[0]
    spread_real = (1 - real @ mean_dir).mean()
    spread_sampled = (1 - a @ mean_dir).mean()
    assert 0.5 < float(spread_sampled / spread_real) < 2.0


def test_head_replay_forgets_the_removed_region_and_keeps_the_others():
    """Known answer in 2-D (δ = 1, so Tukey space is feature space): three well-separated
    Gaussians and a teacher head that classifies them. After the replay fit the head assigns
    the removed class's region to another class and still agrees with the teacher elsewhere."""
    from scar.methods.mahalanobis import ClassStats
    from scar.methods.self_forget import fit_head_on_replay

    means = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]], dtype=torch.float64)
    covs = torch.eye(2, dtype=torch.float64).expand(3, 2, 2).clone() * 0.25
    stats = ClassStats(means, covs, torch.full((3,), 100), torch.arange(3), delta=1.0)
    teacher = torch.nn.Linear(2, 3)
    with torch.no_grad():
        teacher.weight.copy_(means.float())
        teacher.bias.copy_(-0.5 * (means ** 2).sum(1).float())
    head = torch.nn.Linear(2, 3)
    head.load_state_dict(teacher.state_dict())
    still = fit_head_on_replay(head, teacher, stats, (1,), steps=200, per_class=64, lr=0.05,
                               g=torch.Generator().manual_seed(0))
    assert still == 0.0
    g = torch.Generator().manual_seed(1)
    kept = means[[0, 2]].float().repeat_interleave(200, 0) + 0.5 * torch.randn(400, 2, generator=g)
    with torch.no_grad():
        assert (head(kept).argmax(1) == teacher(kept).argmax(1)).float().mean() > 0.97
        assert not torch.equal(head.weight, teacher.weight)


def test_self_forget_replay_changes_only_the_head(tiny_model, synth, cr_splits, surrogate,
                                                  stats):
    """With head replay the proxies are forgotten before the loop starts, so no loop step
    runs and only the head differs from the original; the real removed-class images (never
    read by the method) are no longer predicted as it, while without replay the loop runs."""
    data = make_data(synth, cr_splits, surrogate, stats)
    off = build_method("scar_self_forget", **fast("scar_self_forget"), replay_steps=0)
    on = build_method("scar_self_forget", **fast("scar_self_forget"), replay_steps=100)
    off.unlearn(tiny_model, data)
    b = on.unlearn(tiny_model, data)
    head = FeatureModel(tiny_model).head_name
    orig = tiny_model.state_dict()
    differ = {k for k, v in b.state_dict().items() if not torch.equal(v, orig[k])}
    assert on.steps_ == 0 and off.steps_ > 0
    assert differ and all(k.startswith(head + ".") for k in differ)
    assert on.replay_still_ == 0.0 and off.replay_still_ is None
    assert "head replay" in access_profile(on) and "head replay" not in access_profile(off)
    x = next(iter(data.loader(cr_splits.train_forget, 1024, shuffle=False))).x
    with torch.no_grad():
        before = float((tiny_model.eval()(x).argmax(1) == 1).float().mean())
        after = float((b.eval()(x).argmax(1) == 1).float().mean())
    assert before > 0.9 and after <= 0.05


def test_surrogate_statistics_group_by_prediction(tiny_model, synth, cr_splits, surrogate):
    method = build_method("scar", **fast("scar"), stats="surrogate")
    data = make_data(synth, cr_splits, surrogate, None, retain=None)
    stats = method.class_stats(FeatureModel(tiny_model), data)
    assert 1 not in stats.classes.tolist()  # the removed class is never a target
    assert stats.classes.numel() >= 1
    method.unlearn(tiny_model, data)
    assert method.access_.get("retain", 0) == 0


def test_self_forget_reads_no_forget_and_no_retain_image(tiny_model, synth, cr_splits, surrogate,
                                                         stats):
    data = make_data(synth, cr_splits, surrogate, stats, forget=exploding(cr_splits.train_forget),
                     retain=exploding(cr_splits.train_retain))
    method = build_method("scar_self_forget", **fast("scar_self_forget"))
    method.unlearn(tiny_model, data)
    assert method.access_["forget"] == 0 and method.access_["retain"] == 0


def test_surrogate_cover_adds_images_of_every_kept_class(tiny_model, synth, cr_splits,
                                                         tiny_surrogate, stats):
    from scar.methods.synthesis import most_probable_per_class, predicted_as_label

    noise = TensorImages(tiny_surrogate.images, torch.full((len(tiny_surrogate),), -1))
    data = make_data(synth, cr_splits, noise, stats)
    teacher = FeatureModel(tiny_model.eval())
    method = build_method("scar", cover_per_class=16, cover_steps=30)
    head = method.build_head(method.class_stats(teacher, data), data.device)
    kept = head.class_ids.tolist()
    assert 1 not in kept  # cr_splits removes class 1: it gets no cover
    covered = method.cover(teacher, head, noise, data)
    assert len(covered) == len(noise) + 16 * len(kept) == len(noise) + method.cover_images_
    extra = covered.subset(torch.arange(len(noise), len(covered))).materialize()
    assert extra.labels.tolist() == [c for c in kept for _ in range(16)]
    assert torch.equal(covered.load(torch.arange(3)), noise.images[:3])
    # Against the seeds (the noise images most probable for each class): predicted as their
    # class, with features closer to it under the Mahalanobis head.
    sidx, slabels = most_probable_per_class(teacher, data, noise, kept, 16, 1024)
    seeds = noise.subset(sidx, slabels).materialize()

    def distance(images):
        x = next(iter(data.loader(images, 1024, shuffle=False))).x
        with torch.no_grad():
            return float(head.distance_to(teacher(x)[0], images.labels).mean())

    assert predicted_as_label(teacher, extra, data.input_spec, data.device).float().mean() > 0.8
    assert distance(extra) < 0.8 * distance(seeds)


def test_uncovered_kept_classes_are_named_in_a_warning_when_lopsided(synth, cr_splits, stats,
                                                                      caplog):
    from scar.methods.scar_method import warn_uncovered

    data = make_data(synth, cr_splits, None, stats)  # class 1 removed
    c = synth.info.num_classes
    lopsided = torch.tensor([0] * 500 + [1] * 400 + list(range(2, c)) * 2)  # classes ≥ 2 thin
    with caplog.at_level("INFO", logger="scar.methods.scar_method"):
        low = warn_uncovered(lopsided, data, cover_per_class=0)
    assert low == list(range(2, c))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "cover_per_class" in caplog.text and str(low) in caplog.text
    caplog.clear()
    # One thin class among several well-covered ones: named, but only as information.
    spread = torch.tensor([k for k in range(c) if k != 2 for _ in range(100)] + [2])
    with caplog.at_level("INFO", logger="scar.methods.scar_method"):
        assert warn_uncovered(spread, data, cover_per_class=0) == [2]
    assert [r.levelname for r in caplog.records] == ["INFO"]
    caplog.clear()
    with caplog.at_level("INFO", logger="scar.methods.scar_method"):
        assert warn_uncovered(lopsided, data, cover_per_class=16) == low
    assert caplog.text == ""


@pytest.mark.parametrize("key,value", [("cover_per_class", -1), ("cover_steps", -1),
                                       ("cover_lr", 0)])
def test_bad_cover_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        build_method("scar", **{key: value})


@pytest.mark.parametrize("name,lr", [("scar", 1e30), ("negative_gradient", 1e30)])
def test_a_diverged_run_is_an_error_not_a_result(name, lr, tiny_model, synth, cr_splits,
                                                 surrogate, stats):
    from scar.errors import DivergedError

    data = make_data(synth, cr_splits, surrogate, stats)
    method = build_method(name, **fast(name), lr=lr)
    with pytest.raises(DivergedError, match=f"{name} diverged.*NaN or inf"):
        method.unlearn(tiny_model, data)


# ------------------------------------------------------------------ the reference preset's loop
def _reference_scar(**override):
    from scar.methods.presets import with_preset

    # The reference's values with small batches: the loop's structure is what is pinned.
    return build_method("scar", **with_preset("scar", {"batch_size": 64, **override},
                                              "reference"))


def test_reference_preset_takes_six_steps_per_forget_batch(tiny_model, synth, cr_splits,
                                                           surrogate, stats):
    import math

    method = _reference_scar(epochs=2)  # stops only from epoch index 2: never, here
    data = make_data(synth, cr_splits, surrogate, stats)
    method.unlearn(tiny_model, data)
    batches = math.ceil(len(cr_splits.train_forget) / 64)
    assert method.surrogate_steps == 6
    assert method.steps_ == 2 * batches * 6
    assert [r["epoch"] for r in method.history_] == [0] * batches * 6 + [1] * batches * 6


def test_reference_preset_checks_every_step_from_epoch_index_2(tiny_model, synth, cr_splits,
                                                               surrogate, stats, monkeypatch):
    from scar.methods.scar_method import SCAR

    calls: list[tuple[int, int]] = []
    confirm = SCAR.confirm_stop

    def spy(self, *args):
        calls.append((self.history_[-1]["epoch"], self.history_[-1]["step"]))
        return confirm(self, *args)

    monkeypatch.setattr(SCAR, "confirm_stop", spy)
    method = _reference_scar(epochs=3)
    method.unlearn(tiny_model, make_data(synth, cr_splits, surrogate, stats))
    in_epoch_2 = [r["step"] for r in method.history_ if r["epoch"] >= 2]
    assert in_epoch_2, "the run ended before epoch index 2"
    assert calls == [(2, s) for s in in_epoch_2]  # every step from epoch 2, none before


def test_reference_preset_hr_target_is_test_accuracy_minus_0_015(synth, hr_splits, surrogate,
                                                                 stats):
    from scar.methods.base import stop_target

    method = _reference_scar()
    data = make_data(synth, hr_splits, surrogate, stats, scenario="HR", original_test_acc=0.9)
    assert method.hr_margin == 0.015
    assert stop_target(data, method.hr_margin) == pytest.approx(0.885)


def test_reference_preset_augments_retain_statistics_with_the_training_augmentation(
        tiny_model, synth, cr_splits, surrogate, stats, caplog):
    from scar.data.base import Augment
    from scar.models.adapter import FeatureModel as FM

    aug = Augment(crop_padding=2, hflip=True)
    method = _reference_scar()
    data = make_data(synth, cr_splits, surrogate, None, train_augment=aug)
    got = method.class_stats(FM(tiny_model), data)
    kw = dict(num_classes=synth.info.num_classes, delta=method.delta, batch_size=1024)
    want = class_statistics(tiny_model, cr_splits.train_retain, synth.info.input_spec,
                            augment=aug, seed=data.seed + 5, **kw)
    plain = class_statistics(tiny_model, cr_splits.train_retain, synth.info.input_spec, **kw)
    kept = got.classes.tolist()
    assert torch.allclose(got.means, want.subset(kept).means, atol=1e-5)
    assert not torch.allclose(got.means, plain.subset(kept).means, atol=1e-3)
    # No recorded recipe: a warning, and the images as they are.
    data = make_data(synth, cr_splits, surrogate, None)
    with caplog.at_level("WARNING"):
        got = method.class_stats(FM(tiny_model), data)
    assert "training augmentation is unknown" in caplog.text
    assert torch.allclose(got.means, plain.subset(kept).means, atol=1e-5)


def test_reference_preset_runs_the_teacher_on_each_augmented_surrogate_batch(
        tiny_model, synth, cr_splits, surrogate, stats):
    from scar.data.base import Augment, normalize
    from scar.methods.scar_method import mask_teacher_cr

    data = make_data(synth, cr_splits, surrogate, stats,
                     train_augment=Augment(crop_padding=2, hflip=True))
    removed = torch.tensor(data.removed_classes)
    batches, target = _reference_scar().surrogate_source(tiny_model, data, surrogate)
    batch = next(batches)
    unaugmented = normalize(surrogate.load(batch.idx), synth.info.input_spec)
    assert not torch.allclose(batch.x, unaugmented)  # the batch itself is augmented
    logits, keep = target(batch)
    with torch.no_grad():
        want, want_keep = mask_teacher_cr(tiny_model(batch.x), removed, "kept")
    assert torch.equal(keep, want_keep) and torch.allclose(logits, want)
    # The default: unaugmented batches, the logits of the unaugmented images.
    batches, target = build_method("scar").surrogate_source(tiny_model, data, surrogate)
    batch = next(batches)
    assert torch.allclose(batch.x, normalize(surrogate.load(batch.idx), synth.info.input_spec))


def test_reference_preset_takes_targets_from_the_student_at_each_forget_batch(
        tiny_model, synth, cr_splits, surrogate, stats, monkeypatch):
    import math

    from scar.methods.mahalanobis import MahalanobisHead
    from scar.methods.scar_method import SCAR

    calls: list[int] = []
    nearest = MahalanobisHead.nearest_wrong_class

    def spy(self, features, labels):
        calls.append(len(labels))
        assert features.requires_grad  # the student's step features, not a teacher pass
        return nearest(self, features, labels)

    monkeypatch.setattr(MahalanobisHead, "nearest_wrong_class", spy)
    monkeypatch.setattr(SCAR, "assign_targets", lambda *a: pytest.fail("teacher targets"))
    method = _reference_scar(epochs=2)
    method.unlearn(tiny_model, make_data(synth, cr_splits, surrogate, stats))
    n = len(cr_splits.train_forget)
    batches = math.ceil(n / 64)
    assert method.steps_ == 2 * batches * 6
    # Once per forget batch (its first surrogate step), in both epochs: every image twice.
    assert len(calls) == 2 * batches and sum(calls) == 2 * n


def test_reference_preset_gates_hr_on_a_full_eval_pass_after_every_step(
        tiny_model, synth, hr_splits, surrogate, stats):
    import copy

    from scar.methods.scar_method import TargetCache

    method = _reference_scar(epochs=1)
    data = make_data(synth, hr_splits, surrogate, stats, scenario="HR")
    method.unlearn(tiny_model, data)
    assert method.full_checks_ == method.steps_ > 0  # one pass per step (none stops: epoch 0)
    # The pass itself: eval mode whatever the model's mode, every image observed, modes and
    # BatchNorm buffers left as they were.
    model = copy.deepcopy(tiny_model).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    loader = data.loader("forget", 16, shuffle=False)
    targets = TargetCache(len(hr_splits.train_forget), data.device)
    acc = method.gate_pass(model, data, loader, targets)
    model.eval()
    with torch.no_grad():
        want = torch.cat([model(b.x).argmax(1) == b.y for b in loader])
    assert torch.equal(targets.correct, want) and bool(targets.known.all())
    assert acc == pytest.approx(float(want.float().mean()))
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert build_method("scar").gate_pass(model, data, loader, targets) is None


def _reference_self_forget(**override):
    from scar.methods.presets import with_preset

    return build_method("scar_self_forget", **with_preset(
        "scar_self_forget", {"batch_size": 4, **override}, "reference"))


def test_reference_self_forget_splits_proxies_inside_each_batch_and_skips_batches_without(
        tiny_model, synth, cr_splits, surrogate, stats, monkeypatch):
    from scar.methods.mahalanobis import MahalanobisHead

    calls: list[int] = []
    nearest = MahalanobisHead.nearest_wrong_class

    def spy(self, features, labels):
        calls.append(len(labels))
        assert features.requires_grad  # the student's features of this step
        return nearest(self, features, labels)

    monkeypatch.setattr(MahalanobisHead, "nearest_wrong_class", spy)
    method = _reference_self_forget(epochs=2)  # the stop applies from epoch index 2: never here
    data = make_data(synth, cr_splits, surrogate, stats)
    method.unlearn(tiny_model, data)
    # The same batches, and the teacher's proxies in each, counted independently.
    loader = data.loader("surrogate", 4, shuffle=True, seed_offset=1)
    with_proxy, proxies = 0, []
    for _ in range(2):
        for b in loader:
            with torch.no_grad():
                hit = tiny_model(b.x).argmax(1) == 1
            if bool(hit.any()):
                with_proxy += 1
                proxies.append(int(hit.sum()))
    assert 0 < with_proxy < 2 * len(loader)  # some batches have no proxy
    assert method.steps_ == with_proxy and method.skipped_batches_ == 2 * len(loader) - with_proxy
    assert calls == proxies  # targets of this step's proxies, at every step
    assert [r["proxies"] for r in method.history_] == proxies
    assert data.touched()["forget"] == 0 and data.touched()["retain"] > 0  # retain statistics


def test_reference_self_forget_stops_on_the_real_forget_set_and_says_so(
        tiny_model, synth, cr_splits, surrogate, stats, monkeypatch):
    from scar.methods.scar_method import SCAR

    checked: list[int] = []
    confirm = SCAR.confirm_stop

    def spy(self, model, data, forget, *args):
        checked.append(len(forget))
        return confirm(self, model, data, forget, *args)

    monkeypatch.setattr(SCAR, "confirm_stop", spy)
    method = _reference_self_forget(epochs=3, batch_size=32)
    assert method.required_data() == {"surrogate", "retain", "forget"}
    assert "not forget-free" in access_profile(method)
    data = make_data(synth, cr_splits, surrogate, stats)
    method.unlearn(tiny_model, data)
    in_epoch_2 = [r for r in method.history_ if r["epoch"] == 2]
    assert in_epoch_2 and len(checked) == len(in_epoch_2)  # every step from epoch index 2
    assert set(checked) == {len(cr_splits.train_forget)} and data.touched()["forget"] > 0
    with pytest.raises(ConfigError, match="needs proxies='per_batch'"):
        build_method("scar_self_forget", stop_on="forget")
    with pytest.raises(MissingRequirementError):
        method.unlearn(tiny_model, make_data(synth, cr_splits, surrogate, stats, forget=None))
