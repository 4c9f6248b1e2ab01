"""The HTML pages in a real headless browser: Debian's chromium (installed by scripts/install.sh),
driven by Playwright (the dev extra) through ``executable_path`` — never Playwright's own browser
download. Without chromium these tests FAIL (CI installs it), they do not skip.

Each page must load from ``file://`` with no console error, no page error, no failed request and
no request other than the page itself and its inline ``data:`` images; every image must decode
(naturalWidth > 0) and render at a non-zero size; and the tables must hold the numbers of the
results (the RequestResult of the audit page, the rows of results.jsonl for the grid report).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import yaml

from scar.data.datasets import load_dataset
from scar.data.forget import ForgetSpec
from scar.evaluation.audit import SPLIT_NAMES
from scar.experiments.demo import audit_checkpoints
from scar.experiments.grid import load_grid
from scar.experiments.html_report import accuracy_text, write_request_page
from scar.experiments.report import build_report
from scar.experiments.request import UnlearnRequest, run_request
from scar.experiments.runner import run_grid
from scar.experiments.store import ResultsStore, ok_rows
from scar.models.pretrained import sha256
from scar.training.workflow import TrainJob, run_train_job

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TINY_GRID = Path(__file__).parent / "tiny_grid.yaml"


def chromium_path() -> str:
    found = os.environ.get("SCAR_CHROMIUM") or next(
        (p for p in map(shutil.which, BROWSERS) if p), None)
    if not found:
        pytest.fail("no chromium found (looked for " + ", ".join(BROWSERS) + " on PATH and "
                    "$SCAR_CHROMIUM): the HTML reports' browser test needs Debian's chromium; "
                    "`bash scripts/install.sh` installs it (apt-get install chromium).",
                    pytrace=False)
    return found


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: it is in the dev extra "
                    "(pip install -e '.[dev]'; scripts/install.sh does it).", pytrace=False)
    path = chromium_path()
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        b = pw.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def load(browser, page_path: Path) -> dict:
    """Open ``page_path`` and return what the browser saw: problems, images, tables."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} {r.failure}"))
    uri = page_path.resolve().as_uri()
    page.on("request", lambda r: None if r.url == uri or r.url.startswith("data:") else
            problems.append(f"outside request: {r.url}"))
    response = page.goto(uri, wait_until="load")
    assert response is None or response.ok
    images = page.evaluate("""() => [...document.images].map(i => {
        i.scrollIntoView();
        const r = i.getBoundingClientRect();
        return {alt: i.alt, complete: i.complete, natural: i.naturalWidth,
                width: r.width, height: r.height, src: i.src.slice(0, 22)};
    })""")
    tables = page.evaluate("""() => [...document.querySelectorAll('table')].map(t =>
        [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim())))""")
    page.close()
    return {"problems": problems, "images": images, "tables": tables}


def check_page(seen: dict, min_images: int) -> None:
    assert seen["problems"] == [], seen["problems"]
    assert len(seen["images"]) >= min_images, seen["images"]
    for img in seen["images"]:
        assert img["src"].startswith("data:image/png;base64"), img
        assert img["complete"] and img["natural"] > 0, img
        assert img["width"] > 0 and img["height"] > 0, img


def table_with(tables: list, first_header: str, column: str) -> tuple[list[str], list[list[str]]]:
    for t in tables:
        if t and t[0] and t[0][0] == first_header and any(column in c for c in t[0]):
            return t[0], t[1:]
    raise AssertionError(f"no table with header {first_header!r} and column {column!r}")


# ---------------------------------------------------------------- the audit page
@pytest.fixture(scope="module")
def audit_page(tmp_path_factory):
    """A tiny real deletion request (synthetic data, fastcnn, SCAR, with oracle and MIA)."""
    folder = tmp_path_factory.mktemp("audit")
    options = {"num_classes": 4, "n_train": 256}
    bundle = load_dataset("synthetic", **options)
    original = run_train_job(TrainJob(dataset="synthetic", dataset_options=options,
                                      recipe_overrides={"epochs": 1}), folder / "orig",
                             bundle=bundle, device="cpu")
    oracle = run_train_job(TrainJob(dataset="synthetic", dataset_options=options,
                                    forget=ForgetSpec.for_classes([1]),
                                    recipe_overrides={"epochs": 1}), folder / "oracle",
                           bundle=bundle, device="cpu")
    from scar.checkpoint import load_checkpoint

    ck, oracle_ck = load_checkpoint(original), load_checkpoint(oracle)
    request = UnlearnRequest(forget=ForgetSpec.for_classes([1]), method="scar",
                             hparams={"epochs": 1, "batch_size": 64, "surrogate_steps": 1},
                             surrogate="gaussian-noise", surrogate_n=128, mia=True)
    result = run_request(ck, bundle, request,
                         references={"original": ck.model, "retrain": oracle_ck.model},
                         out=folder / "unlearned.safetensors", keep_outputs=True)
    page = write_request_page(folder / "audit.html", result, bundle, retrain=oracle_ck)
    return page, result


def check_audit_page(browser, page: Path, result) -> str:
    """Load the audit page of ``result`` (a RequestResult with an oracle and the MIA): the
    browser checks, then its tables hold the result's numbers; returns the page's text."""
    seen = load(browser, page)
    check_page(seen, min_images=2)  # per-class accuracy and the feature projection
    header, rows = table_with(seen["tables"], "model", "train_forget")
    by_model = {row[0]: row for row in rows}
    sizes = {s: len(getattr(result.splits, s)) for s in SPLIT_NAMES}
    results = result.results()
    assert set(by_model) == set(results) == {"original", "retrain", "unlearned"}
    for name, metrics in results.items():
        for split in SPLIT_NAMES:
            col = next(i for i, h in enumerate(header) if h.startswith(f"{split} "))
            assert by_model[name][col] == accuracy_text(metrics[f"acc/{split}"], sizes[split])
            shown = float(by_model[name][col].split()[0])
            assert math.isclose(shown, 100 * metrics[f"acc/{split}"], abs_tol=0.005)
        assert by_model[name][-1] == f"{metrics['aus']:.3f}"
    _, mia_rows = table_with(seen["tables"], "model", "MIA AUC")
    for row in mia_rows:
        m = results[row[0]]
        assert row[2] == f"{m['mia/auc']:.3f} ± {m['mia/auc_std']:.3f}"
    text = page.read_text()
    assert "Verdict:" in text and result.method.name in text
    assert sha256(result.saved) in text and sha256(result.checkpoint.path) in text
    return text


def test_audit_page_in_a_browser(browser, audit_page):
    check_audit_page(browser, *audit_page)


def test_demo_audit_page_in_a_browser(browser, tiny_demo, demo_audit):
    """The page ``scar demo`` writes of its SCAR request, by the demo's own code (run_demo on
    the tiny grid, then its page step again for the RequestResult to compare with)."""
    _, _, written = tiny_demo
    page, result = demo_audit
    assert page == written["audit"]
    text = check_audit_page(browser, page, result)
    run_dir, grid, _ = tiny_demo
    oracle = audit_checkpoints(run_dir, grid)["oracle"]
    assert result.method.name == "scar" and sha256(oracle) in text


# ---------------------------------------------------------------- the grid report
@pytest.fixture(scope="module")
def grid_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    raw = {**yaml.safe_load(TINY_GRID.read_text()), "device": "cpu"}
    run_grid(load_grid(raw), folder / "run", progress=False)
    written = build_report(folder / "run")[1]
    return folder / "run", written["html"]


def test_grid_report_html_in_a_browser(browser, grid_report):
    run_dir, page = grid_report
    seen = load(browser, page)
    check_page(seen, min_images=3)  # AUS vs time, forget vs retain, per class (+ features)
    header, rows = table_with(seen["tables"], "method", "retain-test acc (%)")
    good = ok_rows(ResultsStore(run_dir).read()[0])
    methods = {r["method"] for r in good}
    assert {row[0] for row in rows} == methods
    columns = {"retain-test acc (%)": "acc/test_retain", "forget-test acc (%)": "acc/test_forget",
               "train-forget acc (%)": "acc/train_forget"}
    for row in rows:
        mine = [r for r in good if r["method"] == row[0]]
        assert row[header.index("n")] == str(len(mine))
        for title, key in columns.items():
            values = [100 * r["metrics"][key] for r in mine]
            mean = math.fsum(values) / len(values)
            assert row[header.index(title)].split(" ± ")[0] == f"{mean:.2f}", (row[0], title)
        time = row[header.index("time (s)")]
        if row[0] == "original":
            assert time == "—"
        else:
            times = [r["metrics"]["time/unlearn_s"] for r in mine]
            assert time.split(" ± ")[0] == f"{math.fsum(times) / len(times):.2f}"


def test_the_browser_check_sees_broken_pages(browser, tmp_path):
    """The harness itself: a console error, a missing image and an outside request are caught."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>x</title></head>'
                    '<body><img src="missing.png" alt="gone"><img src="http://127.0.0.1:9/x.png"'
                    ' alt="far"><script>console.error("boom")</script></body></html>')
    seen = load(browser, page)
    text = "\n".join(seen["problems"])
    assert "console error: boom" in text and "missing.png" in text and "127.0.0.1" in text
    with pytest.raises(AssertionError):
        check_page(seen, min_images=1)
