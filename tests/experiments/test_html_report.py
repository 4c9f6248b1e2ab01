"""The HTML builders as pure functions: escaping, inline images, the verdict, the intervals, and
the original's time as a dash in every table (Markdown, LaTeX, HTML)."""

from __future__ import annotations

import hashlib
import math

import pytest

from scar.experiments import html_report as pages
from scar.experiments.report import format_html, format_markdown_table, summarize, table_cells

EVIL = '<script>alert("x")</script>&"\''


def _no_raw(text: str) -> None:
    assert "<script>" not in text and 'alert("x")' not in text


def test_every_user_string_is_escaped():
    text = pages.page_html(EVIL, [pages.section_html(EVIL, pages.table_html([EVIL], [[EVIL]]),
                                                     pages.list_html([EVIL]),
                                                     pages.image_html(EVIL, b"\x89PNG"))],
                           intro=[EVIL])
    _no_raw(text)
    assert text.count("&lt;script&gt;") == 9  # title, h1, intro, h2, th, td, li, alt, caption
    assert 'alt="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;&#x27;"' in text


def test_images_are_inline_png_data_uris_and_nothing_is_fetched():
    text = pages.image_html("plot", b"\x89PNG\r\n")
    assert 'src="data:image/png;base64,iVBORw0K' in text
    page = pages.page_html("t", [text])
    for outside in ("http://", "https://", "<link", "<script", "@import", "url("):
        assert outside not in page


def facts(**results) -> pages.AuditFacts:
    return pages.AuditFacts(
        title=EVIL, scenario="CR", removed=[("classes", EVIL)], dataset=[("name", EVIL)],
        checkpoints=[("original", EVIL, "ab" * 32)], method=[("method", EVIL)],
        access=[("retain", "no", "none")], access_profile=EVIL,
        environment=[("torch version", EVIL)], results=results,
        split_sizes={"train_forget": 100, "train_retain": 900, "test": 200,
                     "test_forget": 20, "test_retain": 180}, images={EVIL: b"png"},
        notes=[EVIL])


def metrics(forget: float, retain: float, **extra) -> dict:
    return {"acc/train_forget": forget, "acc/train_retain": retain, "acc/test": retain,
            "acc/test_forget": forget, "acc/test_retain": retain, **extra}


def test_audit_page_escapes_and_shows_every_model():
    text = pages.audit_page(facts(original=metrics(0.9, 0.9), unlearned=metrics(0.0, 0.88)))
    _no_raw(text)
    assert ">original<" in text and ">unlearned<" in text
    assert pages.accuracy_text(0.88, 180) in text


def test_verdict_against_the_oracles_band_and_without_one():
    sizes = {"test_forget": 1000, "test_retain": 9000}
    results = {"original": metrics(0.9, 0.92), "retrain": metrics(0.0, 0.92),
               "unlearned": metrics(0.002, 0.91)}
    line = pages.verdict(results, sizes, "CR")
    assert "within the retrained model's 95% band [0.00, 0.38]%" in line
    assert "test_retain accuracy 91.00% vs the original's 92.00% (-1.00 points)" in line
    results["unlearned"] = metrics(0.05, 0.91)
    assert "4.62 points above" in pages.verdict(results, sizes, "CR")
    del results["retrain"]
    line = pages.verdict(results, sizes, "CR")
    assert "no retrained model was given" in line and "(original 90.00%)" in line


def test_wilson_interval_and_accuracy_text():
    lo, hi = pages.wilson_interval(0.0, 1000)
    assert lo == 0.0 and hi == pytest.approx(0.00383, abs=1e-5)
    lo, hi = pages.wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert pages.accuracy_text(0.5, 100) == "50.00 [40.38, 59.62]"
    assert pages.accuracy_text(None, 10) == pages.accuracy_text(math.nan, 10) == "—"


def test_indices_hash_is_of_the_sorted_indices():
    expected = hashlib.sha256(b"1,2,10").hexdigest()
    assert pages.indices_sha256([10, 2, 1]) == expected


def test_mia_table_shows_the_spread():
    header, rows = pages.mia_table({"original": {"mia/acc": 0.6, "mia/acc_std": 0.01,
                                                 "mia/auc": 0.7, "mia/auc_std": 0.02,
                                                 "mia/f1": 0.5, "mia/n_members": 10,
                                                 "mia/n_nonmembers": 10},
                                    "unlearned": {"acc/test": 0.9}})
    assert rows == [["original", "0.600 ± 0.010", "0.700 ± 0.020", "0.500 ± 0.000", "10 / 10",
                     ""]]


def test_lr_audit_table_shows_each_value_with_its_interval():
    from scar.evaluation.lr_attack import AuditResult

    def audit(auc):
        return AuditResult("rmia", {"auc": auc, "tpr@1%": 0.1, "tpr@0.1%": 0.0},
                           {"auc": (auc - 0.03, auc + 0.03), "tpr@1%": (0.05, 0.15),
                            "tpr@0.1%": (0.0, 0.01)}, 500, 500, 4).to_metrics()

    results = {"original": audit(0.68), "retrain": audit(0.49), "unlearned": {"acc/test": 0.9}}
    header, rows = pages.lr_audit_table(results)
    assert header[2] == "AUC" and len(rows) == 2  # a model without the audit has no row
    assert rows[0] == ["original", "rmia", "0.680 [0.650, 0.710]", "0.100 [0.050, 0.150]",
                       "0.000 [0.000, 0.010]", "500 / 500", "4"]
    html_text = pages.lr_audit_html(results)
    assert "0.490 [0.460, 0.520]" in html_text and "separates" in html_text
    assert pages.lr_audit_html({"unlearned": {"acc/test": 0.9}}) == ""


def _rows() -> list[dict]:
    def row(method, cls, time):
        return {"run_id": f"{method}{cls}", "status": "ok", "dataset": "fashion-mnist",
                "model": "m", "scenario": "CR", "method": method, "forget_id": f"class{cls}",
                "forget": {"kind": "class", "classes": [cls]}, "hparams": {},
                "metrics": {"acc/test_retain": 0.9, "acc/test_forget": 0.5 if method ==
                            "original" else 0.0, "acc/train_forget": 0.5,
                            "time/unlearn_s": time, "aus": 0.9}}

    return [row("original", c, 0.0) for c in (0, 1)] + [row("scar", c, 2.0) for c in (0, 1)]


def test_the_originals_time_is_a_dash_in_every_table():
    groups = summarize(_rows())
    header, body = table_cells(groups)
    col = header.index("time (s)")
    assert body[0][header.index("method")] == "original" and body[0][col] == "—"
    assert body[1][col] == "2.00 ± 0.00"
    markdown = format_markdown_table(groups).splitlines()[2]
    assert markdown.startswith("| original") and markdown.endswith("| — |")
    assert "0.00 ± 0.00 |" not in markdown.split("|")[-2]
    html = format_html("t", groups, _rows())
    assert "<td>—</td></tr>" in html


def test_class_names_label_the_removed_classes():
    from scar.experiments.labels import forget_label

    row = {"dataset": "fashion-mnist", "forget": {"kind": "class", "classes": [0, 9]},
           "forget_id": "class0-9"}
    assert forget_label(row) == "T-shirt/top + Ankle boot"
    assert forget_label({**row, "forget_names": ["a", "b"]}) == "a + b"
    assert forget_label({**row, "dataset": "synthetic"}) == "class 0 + class 9"
    assert forget_label({"forget": {"kind": "random"}, "forget_id": "seed0"}) == "seed0"
