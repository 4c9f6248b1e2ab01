"""The membership audit in reports: its columns appear only with audit numbers, and the table
says whether the audit separates the original from the oracle."""

from __future__ import annotations

import pytest

from scar.evaluation.lr_attack import AuditResult
from scar.experiments.report import audit_separation_note, format_markdown_table, summarize


def _audit(auc: float, half_width: float) -> dict:
    keys = ("auc", "tpr@1%", "tpr@0.1%")
    return AuditResult("rmia", dict.fromkeys(keys, auc),
                       {k: (auc - half_width, auc + half_width) for k in keys},
                       500, 500, 4, 2000).to_metrics()


def _row(method: str, cls: int, audit: dict | None) -> dict:
    metrics = {"acc/test_retain": 0.9, "acc/test_forget": 0.0, "acc/train_forget": 0.0,
               "aus": 1.0, "time/unlearn_s": 1.0, **(audit or {})}
    return {"run_id": f"{method}-{cls}", "status": "ok", "dataset": "fashion-mnist",
            "model": "fastcnn", "scenario": "CR", "forget_id": f"class{cls}",
            "forget": {"kind": "class", "classes": [cls]}, "method": method, "hparams": {},
            "metrics": metrics}


def test_audit_columns_and_note():
    rows = [_row("original", 0, _audit(0.80, 0.03)), _row("retrain", 0, _audit(0.50, 0.03)),
            _row("scar", 0, _audit(0.55, 0.03))]
    groups = summarize(rows)
    table = format_markdown_table(groups)
    assert "audit AUC" in table and "audit TPR@0.1%FPR" in table and "0.800 ± 0.000" in table
    note = audit_separation_note(groups)
    assert note.startswith("Membership audit: The rmia membership audit separates")
    assert "0.800 [0.770, 0.830] vs 0.500 [0.470, 0.530]" in note


def test_overlapping_cis_do_not_separate():
    rows = [_row("original", 0, _audit(0.62, 0.07)), _row("retrain", 0, _audit(0.50, 0.07))]
    assert "does NOT separate" in audit_separation_note(summarize(rows))


def test_no_audit_no_columns_no_note():
    groups = summarize([_row("original", 0, None), _row("retrain", 0, None)])
    assert "audit" not in format_markdown_table(groups)
    assert audit_separation_note(groups) is None


def test_every_method_is_placed_between_oracle_and_original():
    """0 = the oracle's audit AUC, 1 = the original's; outside [0, 1] is reported as such."""
    from scar.experiments.report import audit_position_note, audit_positions

    rows = [_row("original", 0, _audit(0.80, 0.03)), _row("retrain", 0, _audit(0.50, 0.03)),
            _row("scar", 0, _audit(0.65, 0.03)), _row("finetune", 0, _audit(0.86, 0.03)),
            _row("negative_gradient", 0, _audit(0.47, 0.03))]
    groups = summarize(rows)
    positions = audit_positions(groups)
    assert positions.keys() == {"scar", "finetune", "negative_gradient"}
    assert positions["scar"] == pytest.approx(0.5)
    assert positions["finetune"] == pytest.approx(1.2)
    assert positions["negative_gradient"] == pytest.approx(-0.1)
    note = audit_position_note(groups)
    assert note.endswith("negative_gradient -0.10, scar 0.50, finetune 1.20.")
    assert audit_position_note(summarize(rows[2:])) is None  # no original / oracle: no scale
