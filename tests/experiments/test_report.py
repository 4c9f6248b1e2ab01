"""Reports from stored rows: numbers checked by hand, determinism, robustness, plots, CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from scar.errors import ScarError
from scar.evaluation.aus import (
    AUS_ON_MEANS_LABEL,
    AUS_ON_MEANS_STD_LABEL,
    AUS_PER_RUN_LABEL,
    aus_cr,
    mean_with_sem,
)
from scar.experiments import plots
from scar.experiments.report import (
    format_markdown_table,
    load_rows,
    mia_separation_note,
    summarize,
    write_report,
)

CPU = "cpu (x86_64, 2 threads)"
RETAIN_FREE = "requires: forget, surrogate; reads: forget, surrogate; retain-free: yes"
USES_RETAIN = "requires: retain; reads: retain; retain-free: no"

# (method, class) → (acc/test_retain, acc/test_forget, acc/train_forget, aus, time, mia/auc)
NUMBERS = {
    ("original", 0): (0.90, 0.88, 0.95, 0.531, 0.0, 0.80),
    ("original", 1): (0.92, 0.86, 0.97, 0.538, 0.0, 0.80),
    ("retrain", 0): (0.89, 0.00, 0.00, 0.990, 100.0, 0.80),
    ("retrain", 1): (0.91, 0.00, 0.00, 0.990, 120.0, 0.80),
    ("scar", 0): (0.85, 0.02, 0.03, 0.90, 2.0, 0.55),
    ("scar", 1): (0.87, 0.04, 0.05, 0.94, 4.0, 0.57),
}


def make_row(kind: str, cls: int, auc: float | None = None, **extra) -> dict:
    """A CR row with the NUMBERS of (kind, cls); ``extra`` overrides top-level fields."""
    method = kind
    retain, forget, train_forget, aus, seconds, default_auc = NUMBERS[(method, cls)]
    auc = default_auc if auc is None else auc
    profile = {"scar": RETAIN_FREE, "retrain": USES_RETAIN}.get(method)
    row = {
        "run_id": f"{method}-{cls}",
        "status": "ok",
        "error": None,
        "dataset": "synthetic",
        "model": "fastcnn",
        "scenario": "CR",
        "forget": {"kind": "class", "classes": [cls]},
        "forget_id": f"class{cls}",
        "seed": 42,
        "method": method,
        "hparams": {},
        "metrics": {
            "acc/train_forget": train_forget,
            "acc/train_retain": retain + 0.05,
            "acc/test": retain - 0.01,
            "acc/test_forget": forget,
            "acc/test_retain": retain,
            "mia/acc": 0.5 + (auc - 0.5) / 2,
            "mia/f1": 0.6,
            "mia/auc": auc,
            "mia/chance_dist": abs((auc - 0.5) / 2),
            "mia/variant": "balanced",
            "aus": aus,
            "time/unlearn_s": seconds,
        },
        "access": ({"required": [], "images_loaded": {}, "profile": profile} if profile else None),
        "device": "cpu",
        "device_name": CPU,
        "versions": {"scar": "0.1.0"},
        "finished_at": "2025-01-01T00:00:00Z",
    }
    row.update(extra)
    return row


def write_rows(run_dir, rows, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (run_dir / "results.jsonl").write_text(text)


def all_rows(retrain_auc: float | None = None) -> list[dict]:
    # File order scar before retrain on purpose: the table must still put retrain second.
    order = ["original", "scar", "retrain"]
    return [
        make_row(m, c, auc=retrain_auc if m == "retrain" else None) for m in order for c in (0, 1)
    ]


FAILED = {
    "run_id": "neg-0",
    "status": "failed",
    "dataset": "synthetic",
    "model": "fastcnn",
    "scenario": "CR",
    "forget_id": "class0",
    "method": "negative_gradient",
    "error": "ConfigError: lr must be > 0; got -1.\nsecond line",
    "metrics": {},
}


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    write_rows(d, all_rows() + [FAILED], tail='{"run_id": "scar-9", "status": "o')
    return d


def by_method(groups):
    return {g.method: g for g in groups}


def test_table_numbers_by_hand(run_dir):
    groups = summarize(load_rows(run_dir))
    assert [g.method for g in groups] == ["original", "retrain", "scar"]
    scar = by_method(groups)["scar"]
    assert scar.n == 2 and scar.forget_ids == ("class0", "class1")
    # retain-test acc: mean(0.85, 0.87) = 0.86; sample std = sqrt(2 * 0.01² / 1) = 0.014142
    assert scar.stats["acc/test_retain"].mean == pytest.approx(0.86)
    assert scar.stats["acc/test_retain"].std == pytest.approx(0.0141421356)
    # AUS per run: mean(0.90, 0.94) = 0.92, std = 0.028284
    assert scar.aus_per_run.mean == pytest.approx(0.92)
    assert scar.aus_per_run.std == pytest.approx(0.0282842712)
    # AUS on means: A_or = mean(0.90, 0.92) = 0.91 (original retain-test of the same classes),
    # A_t = 0.86, A_f = mean(0.02, 0.04) = 0.03 → (1 − (0.91 − 0.86)) / 1.03 = 0.922330
    assert scar.aus_on_means.mean == pytest.approx(0.95 / 1.03)
    expected = aus_cr(
        mean_with_sem([0.90, 0.92]), mean_with_sem([0.85, 0.87]), mean_with_sem([0.02, 0.04])
    )
    assert scar.aus_on_means.std == pytest.approx(expected.std_dev)
    # The reference's bar: the stds propagated (two runs: sqrt(2) times the SEMs).
    assert scar.aus_on_means_std.mean == pytest.approx(0.95 / 1.03)
    assert scar.aus_on_means_std.std == pytest.approx(2 ** 0.5 * expected.std_dev)
    table = format_markdown_table(groups)
    assert AUS_ON_MEANS_LABEL in table and AUS_PER_RUN_LABEL in table
    assert AUS_ON_MEANS_STD_LABEL in table
    scar_line = next(line for line in table.splitlines() if line.startswith("| scar "))
    cells = [c.strip() for c in scar_line.strip("|").split("|")]
    # method, retain-free, n, retain-test, forget-test, train-forget, MIA acc, AUC, AUS×3, time
    assert cells[:6] == ["scar", "yes", "2", "86.00 ± 1.41", "3.00 ± 1.41", "4.00 ± 1.41"]
    assert cells[7] == "0.560 ± 0.014"
    assert cells[8].startswith("0.922 ± ") and cells[9].startswith("0.922 ± ")
    assert cells[10] == "0.920 ± 0.028"
    assert cells[11] == "3.00 ± 1.41"
    retain_free = {g.method: g.retain_free for g in groups}
    assert retain_free == {"original": "—", "retrain": "no", "scar": "yes"}


def test_report_files_are_deterministic_and_complete(run_dir, tmp_path):
    first = write_report(run_dir)
    snapshot = {k: first[k].read_bytes() for k in ("markdown", "csv", "latex")}
    second = write_report(run_dir)
    assert {k: second[k].read_bytes() for k in snapshot} == snapshot
    md = snapshot["markdown"].decode()
    assert "## synthetic / fastcnn / CR" in md and CPU in md
    assert "## Failed runs (1)" in md
    assert "negative_gradient: 1 failed (class0): ConfigError: lr must be > 0; got -1." in md
    assert "1 unreadable line(s) skipped" in md
    assert "retain-free: yes" in md  # the data-access profile is printed
    csv_lines = snapshot["csv"].decode().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("dataset,model,scenario,method,n")
    assert r"$\pm$" in snapshot["latex"].decode()
    pngs = [p for name, p in first.items() if name.startswith("plot:")]
    assert {p.name for p in pngs} == {
        "synthetic_fastcnn_CR_aus_vs_time.png",
        "synthetic_fastcnn_CR_forget_vs_retain.png",
        "synthetic_fastcnn_CR_per_class.png",
    }
    for p in pngs:
        assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
        assert f"](plots/{p.name})" in md
    out = write_report(run_dir, tmp_path / "elsewhere")
    assert out["markdown"].parent == tmp_path / "elsewhere"


def test_truncated_last_line_is_skipped_with_a_warning(run_dir, caplog):
    with caplog.at_level(logging.WARNING):
        rows = load_rows(run_dir)
    assert len(rows) == 7 and "truncated or unreadable last line" in caplog.text


def test_report_and_run_read_a_bad_middle_line_alike(run_dir, capsys):
    """One reader (store.parse_rows): a garbled line *inside* the file is an error for
    `scar report` exactly as for `scar run`, not silently skipped by one of them."""
    from scar.cli import main
    from scar.experiments.store import ResultsStore

    path = run_dir / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + ["{garbled\n"] + lines[2:]))
    with pytest.raises(ScarError, match="line 3"):
        ResultsStore(run_dir).rows()
    with pytest.raises(ScarError, match="line 3"):
        load_rows(run_dir)
    assert main(["-q", "report", str(run_dir)]) == 2
    assert "line 3" in capsys.readouterr().err


def test_mia_separation_note(tmp_path):
    same = summarize(all_rows())  # original and retrain AUC both 0.80
    assert "does not separate" in mia_separation_note(same)
    differ = summarize(all_rows(retrain_auc=0.5))
    note = mia_separation_note(differ)
    assert "separates" in note and "does not" not in note


def test_rerun_after_failure_replaces_the_failed_row(tmp_path):
    failed = make_row("scar", 0, status="failed", error="boom")
    write_rows(tmp_path, [failed] + all_rows())
    groups = by_method(summarize(load_rows(tmp_path)))
    assert groups["scar"].n == 2
    md = write_report(tmp_path)["markdown"].read_text()
    assert "## Failed runs (0)" in md


def test_swept_hyperparameters_get_their_own_rows(tmp_path):
    rows = all_rows()
    rows += [make_row("scar", c, run_id=f"scar-b-{c}", hparams={"lambda_2": 5}) for c in (0, 1)]
    names = [g.method for g in summarize(rows)]
    assert names == ["original", "retrain", "scar [lambda_2=unset]", "scar [lambda_2=5]"]


def test_retain_free_methods_come_before_those_that_read_retain_data():
    """Within a table: original, retrain, the retain-free methods, then the others (here a
    method whose rows read the retain set, listed first in the file, and one that does not
    say), each group in file order."""
    uses = {"required": [], "images_loaded": {"retain": 10}, "profile": USES_RETAIN}
    rows = [make_row("scar", c, run_id=f"ft-{c}", method="finetune", access=uses)
            for c in (0, 1)]
    rows += [make_row("scar", c, run_id=f"unknown-{c}", method="mystery", access=None)
             for c in (0, 1)]
    rows += all_rows()
    names = [g.method for g in summarize(rows)]
    assert names == ["original", "retrain", "scar", "finetune", "mystery"]


def test_a_preset_is_named_in_the_row_label(tmp_path):
    rows = all_rows()
    rows += [make_row("scar", c, run_id=f"scar-ref-{c}", preset="reference",
                      hparams={"lambda_2": 5}) for c in (0, 1)]
    rows += [make_row("scar", c, run_id=f"scar-ref2-{c}", preset="reference",
                      hparams={"lambda_2": 8}) for c in (0, 1)]
    names = [g.method for g in summarize(rows)]
    assert names == ["original", "retrain", "scar", "scar [preset=reference, lambda_2=5]",
                     "scar [preset=reference, lambda_2=8]"]


def test_one_colour_per_method_in_every_plot(run_dir, tmp_path, monkeypatch):
    """The AUS-vs-time, forget-vs-retain and per-class plots of a table draw each method in the
    colour of plots.method_colours (AUS vs time leaves the original out; the colours must not
    shift), and name the points in a legend, not in text labels that can overlap."""
    drawn: dict[str, dict[str, str]] = {}
    texts: dict[str, int] = {}
    save = plots._save

    def spy(fig, path):
        from matplotlib.colors import to_hex

        ax = fig.axes[0]
        handles, names = ax.get_legend_handles_labels()
        colours = {}
        for handle, name in zip(handles, names):
            artist = handle[0] if isinstance(handle, tuple) else handle
            getter = getattr(artist, "get_color", None) or artist.get_facecolor  # a bar
            colours[name] = to_hex(getter())
        drawn[Path(path).stem] = colours
        texts[Path(path).stem] = len(ax.texts)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    write_report(run_dir, tmp_path / "out")
    groups = summarize(load_rows(run_dir))
    expected = plots.method_colours([g.method for g in groups])
    assert len(set(expected.values())) == len(expected)  # distinct colours
    assert expected["original"] == plots.REFERENCE_COLOURS["original"]
    assert sorted(stem.split("_CR_")[-1] for stem in drawn) == [
        "aus_vs_time", "forget_vs_retain", "per_class"]
    for stem, colours in drawn.items():
        assert colours, stem
        assert all(colours[m] == expected[m] for m in colours), (stem, colours, expected)
        assert texts[stem] == 0, stem  # no annotations: the legend names the points
    per_class = next(c for s, c in drawn.items() if s.endswith("per_class"))
    assert "original" in per_class  # before: the original's bars
    assert "scar" in next(c for s, c in drawn.items() if s.endswith("aus_vs_time"))


def test_method_colours_do_not_depend_on_which_methods_a_plot_draws():
    labels = ["original", "retrain", "scar", "finetune", "negative_gradient"]
    full = plots.method_colours(labels)
    assert full["finetune"] == plots.method_colours(labels)["finetune"]
    assert full["original"] == "#7f7f7f" and full["retrain"] == "#000000"
    # Reference rows keep their colours and the methods keep theirs without the references.
    assert plots.method_colours(labels[2:]) == {m: full[m] for m in labels[2:]}


def test_plots_skip_without_data(tmp_path):
    assert plots.plot_aus_vs_time([], tmp_path / "a.png") is None
    assert plots.plot_forget_vs_retain([], tmp_path / "b.png") is None
    assert plots.plot_per_class([], tmp_path / "c.png") is None
    assert not any(tmp_path.iterdir())


def test_feature_projection_from_a_synthetic_snapshot(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    centres = rng.normal(scale=5.0, size=(3, 8))
    before = centres[labels] + rng.normal(size=(120, 8))
    after = before.copy()
    after[labels == 2] = centres[0] + rng.normal(size=(40, 8))  # class 2 moves into class 0
    npz = plots.save_feature_snapshot(
        plots.feature_snapshot_path(tmp_path, "scar", "class2"),
        before,
        after,
        labels,
        [2],
        title="synthetic",
    )
    assert npz == tmp_path / "features" / "scar_class2.npz"
    snap = plots.load_feature_snapshot(npz)
    assert snap["before"].dtype == np.float32 and snap["title"] == "synthetic"
    png = plots.plot_feature_projection(npz, tmp_path / "proj.png")
    assert png is not None and png.stat().st_size > 1000
    write_rows(tmp_path, all_rows())
    written = write_report(tmp_path)
    assert written["plot:features_scar_class2"].exists()
    assert "features_scar_class2.png" in written["markdown"].read_text()


def test_cli_report(run_dir, capsys):
    import scar.cli_report  # noqa: F401  (registers `scar report`)
    from scar.cli import main

    assert main(["-q", "report", str(run_dir), "--out", str(run_dir / "out")]) == 0
    text = capsys.readouterr().out
    assert "| scar | yes | 2 | 86.00 ± 1.41" in text and "does not separate" in text
    assert str(run_dir / "out" / "report.md") in text
    assert main(["-q", "report", str(run_dir / "missing")]) == 2


def test_hr_table_uses_test_and_train_forget_accuracies():
    def hr(method, seed, test, train_forget):
        row = make_row(
            "scar",
            0,
            run_id=f"{method}-{seed}",
            method=method,
            scenario="HR",
            forget_id=f"seed{seed}",
            seed=seed,
        )
        row["metrics"].update({"acc/test": test, "acc/train_forget": train_forget})
        return row

    rows = [
        hr("original", 0, 0.80, 1.00),
        hr("original", 1, 0.82, 1.00),
        hr("finetune", 0, 0.78, 0.80),
        hr("finetune", 1, 0.80, 0.84),
    ]
    groups = by_method(summarize(rows))
    # A_or = 0.81, A_t = 0.79, A_f = 0.82 → (1 − 0.02) / (1 + |0.82 − 0.79|) = 0.98 / 1.03
    assert groups["finetune"].aus_on_means.mean == pytest.approx(0.98 / 1.03)
    header = format_markdown_table(list(groups.values())).splitlines()[0]
    assert "| test acc (%) | train-forget acc (%) | retain acc (%) |" in header


@pytest.mark.parametrize("oracle_classes", [(), (1,)])
def test_reports_without_an_oracle_for_some_or_all_requests(tmp_path, oracle_classes, capsys):
    """Grid key 'oracles': requests without an oracle have no retrain row; tables, notes, CSV,
    LaTeX and plots are still written, with AUS measured against the original."""
    import scar.cli_report  # noqa: F401  (registers `scar report`)
    from scar.cli import main
    from scar.experiments.report import oracle_note

    rows = [make_row(m, c) for m in ("original", "scar") for c in (0, 1)]
    rows += [make_row("retrain", c) for c in oracle_classes]
    write_rows(tmp_path, rows)
    groups = summarize(load_rows(tmp_path))
    scar = by_method(groups)["scar"]
    assert scar.aus_on_means.mean == pytest.approx(0.95 / 1.03)  # as with every oracle
    written = write_report(tmp_path)
    md = written["markdown"].read_text()
    assert "## synthetic / fastcnn / CR" in md and "| scar | yes | 2 |" in md
    assert {"plot:synthetic_fastcnn_CR_aus_vs_time", "plot:synthetic_fastcnn_CR_per_class",
            "plot:synthetic_fastcnn_CR_forget_vs_retain"} <= set(written)
    if oracle_classes:
        assert "| retrain | no | 1 |" in md
        assert oracle_note(groups) in md and "retrain rows for 1 of 2 forget requests (class1" \
            in oracle_note(groups)
    else:
        assert "| retrain " not in md and "no retrain rows" in md
        assert "MIA separation: unknown" in md
    assert main(["-q", "report", str(tmp_path)]) == 0
    assert "Oracle: " in capsys.readouterr().out
    assert oracle_note(summarize(all_rows())) is None  # every request has its oracle


def test_a_row_without_the_reports_keys_is_a_clear_error(tmp_path, capsys):
    from scar.cli import main

    write_rows(tmp_path, all_rows() + [{"run_id": "x1", "status": "ok"}])
    assert main(["-q", "report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "row 7 (run 'x1') lacks" in err and "scenario" in err
