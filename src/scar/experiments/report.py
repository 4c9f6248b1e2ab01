"""Reports built only from stored result rows: tables (Markdown, CSV, LaTeX), notes and plots.

A run directory holds ``results.jsonl``: one JSON object per finished run (``status`` "ok" or
"failed"). Nothing here touches a model or a dataset; every number comes from those rows, so a
report can be rebuilt at any time and, from the same rows, is byte-identical (Markdown, CSV and
LaTeX carry no timestamps and everything is sorted deterministically).

Aggregation: ok rows are grouped per table by (dataset, model, scenario) and per row by method
over the forget requests (classes in CR, seeds in HR). Every metric is shown as mean ± sample std
(ddof=1; 0 for a single run). AUS is reported both ways, labelled (protocol.md):

- :data:`~scar.evaluation.aus.AUS_ON_MEANS_LABEL`: :func:`~scar.evaluation.aus.aus_on_means`
  over per-run (A_or, A_t, A_f), A_or taken from the *original* row of the same forget request;
- :data:`~scar.evaluation.aus.AUS_PER_RUN_LABEL`: mean ± std of the rows' own ``aus``.

If one method appears with several hyper-parameter settings in a table, each setting becomes its
own row, labelled with the keys that differ (``scar [lambda_2=5]``), rather than being averaged
together silently. A run made with a preset says so in its label (``scar [preset=reference]``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scar.errors import MissingDataError, ScarError
from scar.evaluation.audit import AUS_KEYS, audit_note
from scar.evaluation.aus import (
    AUS_ON_MEANS_LABEL,
    AUS_ON_MEANS_STD_LABEL,
    AUS_PER_RUN_LABEL,
    aus_on_means,
)
from scar.evaluation.metrics import DEST_TOP_CLASS, DEST_TOP_SHARE
from scar.evaluation.mia import MIAResult, attack_separates
from scar.experiments.labels import (  # noqa: F401 - public names of the report (older imports)
    DASH,
    ORIGINAL,
    RETRAIN,
    class_names_of,
    method_labels,
    method_order,
    natural_key,
    table_key,
)
from scar.experiments.store import (  # noqa: F401 - latest_rows, failed_rows: as above
    RESULTS_FILE,
    ResultsStore,
    failed_rows,
    latest_rows,
    ok_rows,
)
from scar.utils import atomic_write_text

log = logging.getLogger(__name__)

#: Keys of a results row (store.ROW_KEYS) that the report cannot do without.
REPORT_KEYS = ("run_id", "status", "dataset", "model", "scenario", "method", "metrics")
DEFAULT_OUT_SUBDIR = "report"
PLOTS_SUBDIR = "plots"
#: Original vs retrain MIA gap (accuracy or AUC) below which the attack "does not separate".
MIA_MARGIN = 0.05

#: Metric keys in the order used for CSV columns; other numeric keys follow, sorted.
KNOWN_METRICS: tuple[str, ...] = (
    "acc/train_forget",
    "acc/train_retain",
    "acc/test",
    "acc/test_forget",
    "acc/test_retain",
    "mia/acc",
    "mia/f1",
    "mia/auc",
    "mia/chance_dist",
    "aus",
    "time/unlearn_s",
    "js/train_forget",
    "js/test_forget",
    "js/test",
    DEST_TOP_SHARE,
    "relearn/steps",
    "relearn/censored",
)
#: Numeric metric keys that are labels, not quantities: never averaged over runs.
NOT_AVERAGED: frozenset[str] = frozenset({DEST_TOP_CLASS})


@dataclass(frozen=True)
class Column:
    """One table column: a header and how to render a group's value."""

    header: str
    key: str  # a metric key, or one of the special keys below
    kind: str  # "pct" (accuracy → %), "score" (3 decimals), "time" (seconds), "count", "text"
    optional: bool = False  # shown only when some row of the table has the metric


_AUS_MEANS = "__aus_on_means"
_AUS_MEANS_STD = "__aus_on_means_std"
_AUS_RUNS = "__aus_per_run"
_RETAIN_FREE = "__retain_free"
_N = "__n"

_HEAD_COLUMNS: tuple[Column, ...] = (
    Column("retain-free", _RETAIN_FREE, "text"),
    Column("n", _N, "text"),
)
_TAIL_COLUMNS: tuple[Column, ...] = (
    # Beside the accuracies (evaluation/metrics.py, evaluation/relearn.py; notes under the table).
    Column("JS to oracle, train-forget", "js/train_forget", "score", optional=True),
    Column("JS to oracle, forget-test", "js/test_forget", "score", optional=True),
    Column("JS to oracle, test", "js/test", "score", optional=True),
    Column("forget top-class share", DEST_TOP_SHARE, "score", optional=True),
    Column("relearn steps", "relearn/steps", "count", optional=True),
    Column("MIA acc", "mia/acc", "score"),
    Column("MIA AUC", "mia/auc", "score"),
    # The likelihood-ratio membership audit (grid key 'audit'; evaluation/lr_attack.py).
    Column("audit AUC", "audit/auc", "score", optional=True),
    Column("audit TPR@1%FPR", "audit/tpr@1%", "score", optional=True),
    Column("audit TPR@0.1%FPR", "audit/tpr@0.1%", "score", optional=True),
    Column(AUS_ON_MEANS_LABEL, _AUS_MEANS, "score"),
    Column(AUS_ON_MEANS_STD_LABEL, _AUS_MEANS_STD, "score"),
    Column(AUS_PER_RUN_LABEL, _AUS_RUNS, "score"),
    Column("time (s)", "time/unlearn_s", "time"),
)
TABLE_COLUMNS: dict[str, tuple[Column, ...]] = {
    "CR": _HEAD_COLUMNS
    + (
        Column("retain-test acc (%)", "acc/test_retain", "pct"),
        Column("forget-test acc (%)", "acc/test_forget", "pct"),
        Column("train-forget acc (%)", "acc/train_forget", "pct"),
    )
    + _TAIL_COLUMNS,
    "HR": _HEAD_COLUMNS
    + (
        Column("test acc (%)", "acc/test", "pct"),
        Column("train-forget acc (%)", "acc/train_forget", "pct"),
        Column("retain acc (%)", "acc/train_retain", "pct"),
    )
    + _TAIL_COLUMNS,
}


@dataclass(frozen=True)
class Stat:
    """Mean and spread of one quantity over ``n`` runs (spread: sample std, or SE where noted)."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class GroupSummary:
    """One table row: a method (label) on one (dataset, model, scenario), over forget requests."""

    dataset: str
    model: str
    scenario: str
    method: str  # the row label: the method name, plus differing hparams if it was swept
    n: int
    forget_ids: tuple[str, ...]
    stats: dict[str, Stat] = field(default_factory=dict)
    aus_on_means: Stat | None = None  # std = propagated standard error
    aus_on_means_std: Stat | None = None  # std = propagated sample std (the reference's bar)
    aus_per_run: Stat | None = None
    retain_free: str = DASH
    access_profile: str | None = None
    devices: tuple[str, ...] = ()
    mia_variant: str | None = None
    audit_attack: str | None = None  # the membership audit's attack (rmia / lira), if any

    @property
    def table_key(self) -> tuple[str, str, str]:
        return (self.dataset, self.model, self.scenario)

    def mean(self, key: str) -> float | None:
        stat = self.stats.get(key)
        return stat.mean if stat is not None else None


# ---------------------------------------------------------------- loading
def read_rows(run_dir: str | Path) -> tuple[list[dict], int]:
    """(rows in file order, number of unreadable lines skipped) of ``run_dir/results.jsonl``."""
    store = ResultsStore(Path(run_dir) / RESULTS_FILE)
    path = store.path
    if not path.is_file():
        raise MissingDataError(
            f"no {RESULTS_FILE} in {Path(run_dir)}; a run directory holds the rows written by "
            "`scar run` (one JSON object per line)."
        )
    rows, skipped = store.read()
    for number, row in enumerate(rows, start=1):
        missing = [k for k in REPORT_KEYS if k not in row]
        if missing:
            raise ScarError(
                f"{path}: row {number} (run {row.get('run_id')!r}) lacks {missing}, which the "
                "report needs; every row written by `scar run` has them. Was the file edited, "
                "or written by another tool? Fix or delete that row."
            )
    return rows, skipped


def load_rows(run_dir: str | Path) -> list[dict]:
    """The result rows of ``run_dir`` in file order; a truncated last line is skipped (warning)."""
    return read_rows(run_dir)[0]


# ---------------------------------------------------------------- small helpers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: Sequence[float]) -> Stat:
    """Mean and sample std (ddof=1; 0 for one value)."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, std, n)


def _row_sort_key(row: Mapping[str, Any]) -> tuple:
    return (natural_key(row.get("forget_id")), natural_key(row.get("seed")), str(row.get("run_id")))


# ---------------------------------------------------------------- AUS inputs
def _originals(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, Mapping[str, Any]]:
    """Original rows' metrics by (table key, forget_id, seed) and by (table key, forget_id)."""
    index: dict[tuple, Mapping[str, Any]] = {}
    for row in sorted((r for r in rows if r.get("method") == ORIGINAL), key=_row_sort_key):
        metrics = row.get("metrics") or {}
        index.setdefault((*table_key(row), row.get("forget_id"), row.get("seed")), metrics)
        index.setdefault((*table_key(row), row.get("forget_id")), metrics)
    return index


def aus_inputs(
    row: Mapping[str, Any], originals: Mapping[tuple, Mapping[str, Any]]
) -> dict[str, float] | None:
    """(a_or, a_t, a_f) of one run, A_or from the original row of the same forget request."""
    scenario = table_key(row)[2]
    if scenario not in AUS_KEYS:
        return None
    keys = AUS_KEYS[scenario]
    base = (*table_key(row), row.get("forget_id"))
    original = originals.get((*base, row.get("seed"))) or originals.get(base)
    metrics = row.get("metrics") or {}
    values = {
        "a_or": (original or {}).get(keys["a_t"]),
        "a_t": metrics.get(keys["a_t"]),
        "a_f": metrics.get(keys["a_f"]),
    }
    if not all(_is_number(v) for v in values.values()):
        return None
    return {k: float(v) for k, v in values.items()}


def _aus_on_means(
    runs: Sequence[Mapping[str, Any]], originals: Mapping[tuple, Any], scenario: str, label: str
) -> tuple[Stat | None, Stat | None]:
    """AUS on means with the propagated standard error, and with the propagated std."""
    inputs = [aus_inputs(r, originals) for r in runs]
    usable = [x for x in inputs if x is not None]
    if len(usable) < len(inputs):
        log.warning(
            "%s (%s): %d of %d runs lack A_or/A_t/A_f (no original row for the same "
            "forget request?); AUS on means uses the other %d",
            label,
            scenario,
            len(inputs) - len(usable),
            len(inputs),
            len(usable),
        )
    if not usable:
        return None, None
    return tuple(  # type: ignore[return-value]
        Stat(float(v.nominal_value), float(v.std_dev), len(usable))
        for v in (aus_on_means(usable, scenario, spread) for spread in ("sem", "std")))


# ---------------------------------------------------------------- access / devices
def retain_free(runs: Sequence[Mapping[str, Any]], method: str) -> str:
    """ "yes"/"no" from the rows' data-access profiles ("no" if any run read the retain set)."""
    answers = set()
    for row in runs:
        access = row.get("access") or {}
        match = re.search(r"retain-free:\s*(yes|no)", str(access.get("profile", "")))
        if match:
            answers.add(match.group(1))
        elif isinstance(access.get("images_loaded"), Mapping):
            answers.add("no" if access["images_loaded"].get("retain", 0) else "yes")
    if answers:
        return "no" if "no" in answers else "yes"
    if method == RETRAIN:
        return "no"  # the oracle is trained on the retain set by definition
    return DASH


def _first_profile(runs: Sequence[Mapping[str, Any]]) -> str | None:
    for row in runs:
        profile = (row.get("access") or {}).get("profile")
        if profile:
            return str(profile)
    return None


def device_label(row: Mapping[str, Any]) -> str:
    name = row.get("device_name") or row.get("device") or "unknown device"
    device = row.get("device")
    return f"{name} ({device})" if device and not str(name).startswith(str(device)) else str(name)


def _metric_stats(runs: Sequence[Mapping[str, Any]]) -> dict[str, Stat]:
    values: dict[str, list[float]] = {}
    for row in runs:
        for key, value in (row.get("metrics") or {}).items():
            if _is_number(value) and key not in NOT_AVERAGED:
                values.setdefault(key, []).append(float(value))
    return {k: mean_std(v) for k, v in sorted(values.items())}


def _variant(runs: Sequence[Mapping[str, Any]], key: str = "mia/variant") -> str | None:
    variants = sorted(
        {str(m[key]) for r in runs if key in (m := r.get("metrics") or {})}
    )
    return "/".join(variants) or None


# ---------------------------------------------------------------- summarize
def _summarize_group(
    key: tuple[str, str, str], label: str, runs: list[dict], originals: Mapping[tuple, Any]
) -> GroupSummary:
    runs = sorted(runs, key=_row_sort_key)
    stats = _metric_stats(runs)
    method = str(runs[0].get("method"))
    on_means, on_means_std = _aus_on_means(runs, originals, key[2], label)
    return GroupSummary(
        dataset=key[0],
        model=key[1],
        scenario=key[2],
        method=label,
        n=len(runs),
        forget_ids=tuple(sorted({str(r.get("forget_id")) for r in runs}, key=natural_key)),
        stats=stats,
        aus_on_means=on_means,
        aus_on_means_std=on_means_std,
        aus_per_run=stats.get("aus"),
        retain_free=retain_free(runs, method),
        access_profile=_first_profile(runs),
        devices=tuple(sorted({device_label(r) for r in runs})),
        mia_variant=_variant(runs),
        audit_attack=_variant(runs, "audit/attack"),
    )


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[GroupSummary]:
    """Ok rows grouped by (dataset, model, scenario, method): tables sorted by key, rows ordered
    original, retrain, then the retain-free methods, then the others (those that read retain
    data, or whose rows do not say), each group in order of first appearance."""
    good = ok_rows(rows)
    labels = method_labels(good)
    originals = _originals(good)
    groups: dict[tuple[str, str, str], dict[str, list[dict]]] = {}
    for row, label in zip(good, labels):
        groups.setdefault(table_key(row), {}).setdefault(label, []).append(row)
    out: list[GroupSummary] = []
    for key in sorted(groups):
        by_label = groups[key]
        table = [_summarize_group(key, label, by_label[label], originals)
                 for label in method_order(list(by_label))]
        out += sorted(table, key=_access_rank)  # stable: first appearance within a group
    return out


def _access_rank(group: GroupSummary) -> int:
    """0 original / retrain, 1 retain-free methods, 2 the rest."""
    if group.method in (ORIGINAL, RETRAIN):
        return 0
    return 1 if group.retain_free == "yes" else 2


def split_tables(groups: Sequence[GroupSummary]) -> dict[tuple[str, str, str], list[GroupSummary]]:
    tables: dict[tuple[str, str, str], list[GroupSummary]] = {}
    for g in groups:
        tables.setdefault(g.table_key, []).append(g)
    return dict(sorted(tables.items()))


# ---------------------------------------------------------------- cells
def format_stat(stat: Stat | None, kind: str) -> str:
    """ "72.93 ± 1.20" for accuracies (as %), 3 decimals for scores, 2 for seconds."""
    if stat is None:
        return DASH
    scale, digits = _FORMATS.get(kind, (1.0, 3))
    return f"{scale * stat.mean:.{digits}f} ± {scale * stat.std:.{digits}f}"


#: Column kind → (scale, decimals) of its cells; other kinds: 3 decimals.
_FORMATS: dict[str, tuple[float, int]] = {"pct": (100.0, 2), "time": (1.0, 2), "count": (1.0, 1)}


def cell(group: GroupSummary, column: Column) -> str:
    if column.key == "time/unlearn_s" and group.method == ORIGINAL:
        return DASH  # nothing was unlearned: no time, rather than "0.00 ± 0.00"
    if column.key == _RETAIN_FREE:
        return group.retain_free
    if column.key == _N:
        return str(group.n)
    if column.key == _AUS_MEANS:
        return format_stat(group.aus_on_means, column.kind)
    if column.key == _AUS_MEANS_STD:
        return format_stat(group.aus_on_means_std, column.kind)
    if column.key == _AUS_RUNS:
        return format_stat(group.aus_per_run, column.kind)
    return format_stat(group.stats.get(column.key), column.kind)


def _columns_for(groups: Sequence[GroupSummary]) -> tuple[Column, ...]:
    scenarios = sorted({g.scenario for g in groups})
    if len(scenarios) != 1 or scenarios[0] not in TABLE_COLUMNS:
        raise ValueError(
            f"one table holds one scenario of {sorted(TABLE_COLUMNS)}; got {scenarios}"
        )
    return tuple(c for c in TABLE_COLUMNS[scenarios[0]]
                 if not c.optional or any(c.key in g.stats for g in groups))


def table_cells(groups: Sequence[GroupSummary]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of cells) of one table; dataset/model columns only if they vary."""
    columns = _columns_for(groups)
    lead = [
        name
        for name, attr in (("dataset", "dataset"), ("model", "model"))
        if len({getattr(g, attr) for g in groups}) > 1
    ]
    header = lead + ["method"] + [c.header for c in columns]
    body = [
        [getattr(g, name) for name in lead] + [g.method] + [cell(g, c) for c in columns]
        for g in groups
    ]
    return header, body


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def format_markdown_table(groups: Sequence[GroupSummary]) -> str:
    """A GitHub-flavoured Markdown table of one scenario's groups (pure)."""
    if not groups:
        return ""
    header, body = table_cells(groups)
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# ---------------------------------------------------------------- notes
def _mia_from_group(g: GroupSummary) -> MIAResult | None:
    acc, auc = g.stats.get("mia/acc"), g.stats.get("mia/auc")
    if acc is None or auc is None:
        return None
    f1 = g.stats.get("mia/f1") or Stat(float("nan"), 0.0, 0)
    chance = g.stats.get("mia/chance_dist") or Stat(abs(acc.mean - 0.5), 0.0, 0)
    return MIAResult(
        accuracy=acc.mean,
        accuracy_std=acc.std,
        f1=f1.mean,
        f1_std=f1.std,
        auc=auc.mean,
        auc_std=auc.std,
        chance_distance=chance.mean,
        n_members=0,
        n_nonmembers=0,
        variant=g.mia_variant or "balanced",
    )


def mia_separation_note(groups: Sequence[GroupSummary], margin: float = MIA_MARGIN) -> str:
    """Whether the MIA tells the original model from the oracle (means over forget requests)."""
    by_method = {g.method: g for g in groups}
    original, retrain = by_method.get(ORIGINAL), by_method.get(RETRAIN)
    if original is None or retrain is None:
        return (
            "MIA separation: unknown — the table lacks the original or the retrain row, so "
            "whether the attack can measure forgetting at all cannot be judged."
        )
    a, b = _mia_from_group(original), _mia_from_group(retrain)
    if a is None or b is None:
        return "MIA separation: unknown — no MIA numbers for the original or the retrain model."
    if a.variant != b.variant:
        return (
            f"MIA separation: unknown — original ({a.variant}) and retrain ({b.variant}) "
            "were attacked with different MIA variants."
        )
    values = (
        f"mean AUC {a.auc:.3f} (original) vs {b.auc:.3f} (retrain), "
        f"mean accuracy {a.accuracy:.3f} vs {b.accuracy:.3f}"
    )
    if attack_separates(a, b, margin):
        return (
            f"MIA separation: the {a.variant} attack separates the original model from the "
            f"retrained one ({values}; gap > {margin}); a method close to retrain's values "
            "forgot in this sense."
        )
    return (
        f"MIA separation: the {a.variant} attack does not separate the original model from "
        f"the retrained one ({values}; gap <= {margin}) — its numbers cannot show whether "
        "forgetting happened."
    )


def _audited_pair(groups: Sequence[GroupSummary]) -> list[GroupSummary] | None:
    """[original, retrain] of a table when both carry the membership audit, else None."""
    by_method = {g.method: g for g in groups}
    pair = [by_method.get(ORIGINAL), by_method.get(RETRAIN)]
    if any(g is None or "audit/auc" not in g.stats for g in pair):
        return None
    return pair


def audit_separation_note(groups: Sequence[GroupSummary]) -> str | None:
    """Whether the membership audit separates the original model from the retrained one
    (:func:`~scar.evaluation.audit.audit_note` on the means over forget requests, CI bounds
    averaged too); None when the table has no audit numbers for both."""
    pair = _audited_pair(groups)
    if pair is None:
        return None
    means = {name: {**{k: s.mean for k, s in g.stats.items() if k.startswith("audit/")},
                    "audit/attack": g.audit_attack or "likelihood-ratio"}
             for name, g in zip(("original", "retrain"), pair, strict=True)}
    note = audit_note(means)
    n = pair[0].n
    return f"Membership audit: {note}" + (f" (means over {n} forget requests)" if n > 1 else "")


def audit_positions(groups: Sequence[GroupSummary]) -> dict[str, float]:
    """Each method's mean audit AUC on the scale from the oracle's (0) to the original's (1):
    (AUC − AUC_oracle) / (AUC_original − AUC_oracle). Below 0: the forget images look less like
    members than to the oracle; above 1: more than to the original. Empty without audit numbers
    for both, or when they are equal."""
    pair = _audited_pair(groups)
    if pair is None:
        return {}
    top, zero = (g.stats["audit/auc"].mean for g in pair)
    if top == zero:
        return {}
    return {g.method: (g.stats["audit/auc"].mean - zero) / (top - zero) for g in groups
            if g.method not in (ORIGINAL, RETRAIN) and "audit/auc" in g.stats}


def audit_position_note(groups: Sequence[GroupSummary]) -> str | None:
    """Where each method's audit AUC lies between the oracle (0) and the original (1)."""
    positions = audit_positions(groups)
    if not positions:
        return None
    cells = ", ".join(f"{m} {v:.2f}" for m, v in sorted(positions.items(), key=lambda kv: kv[1]))
    return ("Audit AUC between the oracle (0) and the original (1), "
            f"(AUC − oracle's) / (original's − oracle's), lowest first: {cells}.")


#: What each metric beside the accuracies means: (a metric key that shows it, the note).
METRIC_NOTES: tuple[tuple[str, str], ...] = (
    ("js/train_forget", "JS to oracle: mean Jensen–Shannon divergence between the model's and "
     "the retrained model's softmax outputs on the same images, in nats (0 = the oracle's "
     "outputs, at most ln 2 ≈ 0.693)."),
    (DEST_TOP_SHARE, "Forget top-class share: the share of the train-forget images predicted as "
     "the single class most of them go to (1 = all to one class; the per-class shares are in "
     "each row's dest/shares)."),
    ("relearn/steps", "Relearn steps: steps of fine-tuning a copy on the forget set alone until "
     "its forget accuracy is back to the target (each row's relearn/target; by default half the "
     "original model's; evaluation/relearn.py); compare with the retrain row."),
)


def metric_notes(groups: Sequence[GroupSummary]) -> list[str]:
    """The notes of the metrics beside the accuracies that the table shows, and how many
    relearn runs hit their step limit (censored: their steps are a lower bound)."""
    notes = [text for key, text in METRIC_NOTES if any(key in g.stats for g in groups)]
    censored = [(g.method, round(g.stats["relearn/censored"].mean * g.stats["relearn/censored"].n),
                 g.stats["relearn/censored"].n) for g in groups if "relearn/censored" in g.stats]
    hit = [f"{method} {k}/{n}" for method, k, n in censored if k]
    if hit:
        notes.append("Relearn censored at max_steps (steps are a lower bound): "
                     + ", ".join(hit) + ".")
    return notes


def oracle_note(groups: Sequence[GroupSummary]) -> str | None:
    """Which forget requests have an oracle (``retrain`` row), when not all of them do (grid key
    ``oracles``); None when every request has one or the table has no original rows."""
    by_method = {g.method: g for g in groups}
    original, retrain = by_method.get(ORIGINAL), by_method.get(RETRAIN)
    if original is None:
        return None
    if retrain is None:
        return (
            "Oracle: no retrain rows (grid key 'oracles'); methods compare with the original "
            "model only (AUS takes A_or from it as always)."
        )
    covered = [f for f in original.forget_ids if f in retrain.forget_ids]
    if len(covered) == len(original.forget_ids):
        return None
    return (
        f"Oracle: retrain rows for {len(covered)} of {len(original.forget_ids)} forget requests "
        f"({', '.join(covered) or DASH}; grid key 'oracles'); the retrain row averages over "
        "those only."
    )


def device_note(groups: Sequence[GroupSummary]) -> str:
    """Which device(s) measured the times, and for which methods."""
    where: dict[str, list[str]] = {}
    for g in groups:
        for d in g.devices:
            where.setdefault(d, []).append(g.method)
    if not where:
        return "Device: not recorded."
    parts = [f"{d} ({', '.join(methods)})" for d, methods in sorted(where.items())]
    return "Device: " + "; ".join(parts) + "."


def access_notes(groups: Sequence[GroupSummary]) -> list[str]:
    return [f"{g.method}: {g.access_profile}" for g in groups if g.access_profile]


def error_line(text: Any) -> str:
    """The telling line of a stored error: the first, or a traceback's last (the exception)."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not lines:
        return "(no error recorded)"
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def failed_summary(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (table, method, first error line): count, forget ids, the error."""
    groups: dict[tuple, list[str]] = {}
    for row in failed_rows(rows):
        key = (*table_key(row), str(row.get("method")), error_line(row.get("error")))
        groups.setdefault(key, []).append(str(row.get("forget_id")))
    lines = []
    for (dataset, model, scenario, method, error), ids in sorted(groups.items()):
        ids = sorted(ids, key=natural_key)
        lines.append(
            f"{dataset} / {model} / {scenario} / {method}: {len(ids)} failed "
            f"({', '.join(ids)}): {error}"
        )
    return lines


# ---------------------------------------------------------------- files
def table_slug(key: tuple[str, str, str]) -> str:
    """File-name-safe stem of a table key."""
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", part).strip("-") or "x" for part in key)


def table_title(key: tuple[str, str, str]) -> str:
    return f"{key[0]} / {key[1]} / {key[2]}"


def _csv_metric_keys(groups: Sequence[GroupSummary]) -> list[str]:
    present = set().union(*(g.stats for g in groups)) if groups else set()
    return [k for k in KNOWN_METRICS if k in present] + sorted(present - set(KNOWN_METRICS))


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def format_csv(groups: Sequence[GroupSummary]) -> str:
    """One line per group with raw (unrounded) means and stds."""
    keys = _csv_metric_keys(groups)
    header = [
        "dataset",
        "model",
        "scenario",
        "method",
        "n",
        "forget_ids",
        "retain_free",
        "aus_on_means",
        "aus_on_means_se",
        "aus_on_means_std",
        "aus_per_run_mean",
        "aus_per_run_std",
    ]
    for k in keys:
        header += [f"{k}_mean", f"{k}_std"]
    header += ["devices"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for g in groups:
        line = [
            g.dataset,
            g.model,
            g.scenario,
            g.method,
            g.n,
            ";".join(g.forget_ids),
            g.retain_free,
        ]
        for stat in (g.aus_on_means, g.aus_per_run):
            line += [_num(stat.mean if stat else None), _num(stat.std if stat else None)]
            if stat is g.aus_on_means:
                std = g.aus_on_means_std
                line.append(_num(std.std if std else None))
        for k in keys:
            stat = g.stats.get(k)
            line += [_num(stat.mean if stat else None), _num(stat.std if stat else None)]
        line.append("; ".join(g.devices))
        writer.writerow(line)
    return buf.getvalue()


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    out = "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace(DASH, "--")


def format_latex_table(groups: Sequence[GroupSummary]) -> str:
    """A booktabs ``tabular`` of one table (needs ``\\usepackage{booktabs}``)."""
    header, body = table_cells(groups)
    lines = [
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def format_latex(groups: Sequence[GroupSummary]) -> str:
    parts = ["% SCAR report tables, built from results.jsonl; needs \\usepackage{booktabs}."]
    for key, table in split_tables(groups).items():
        parts += ["", f"% {tex_escape(table_title(key))}", format_latex_table(table)]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- markdown
def _md_table_section(
    key: tuple[str, str, str], table: Sequence[GroupSummary], plots: Mapping[str, str]
) -> list[str]:
    lines = [f"## {table_title(key)}", "", format_markdown_table(table), ""]
    lines += [f"- {note}" for note in table_notes(key, table)]
    access = access_notes(table)
    if access:
        lines += ["", "Data access per method (first run):", ""]
        lines += [f"- {_md_escape(a)}" for a in access]
    if plots:
        lines.append("")
        lines += [f"![{title}]({rel})" for title, rel in plots.items()]
    return lines + [""]


def format_markdown(
    title: str,
    groups: Sequence[GroupSummary],
    rows: Sequence[Mapping],
    skipped_lines: int = 0,
    plots: Mapping[tuple, Mapping[str, str]] | None = None,
    extra_plots: Mapping[str, str] | None = None,
) -> str:
    """The whole report.md (pure: same inputs → same text)."""
    bad = failed_rows(rows)
    lines = [f"# {title}", "", *_intro(rows, skipped_lines), ""]
    for key, table in split_tables(groups).items():
        lines += _md_table_section(key, table, (plots or {}).get(key, {}))
    if extra_plots:
        lines += ["## Feature projections", ""]
        lines += [f"![{title}]({rel})" for title, rel in extra_plots.items()] + [""]
    failures = failed_summary(rows)
    lines += [f"## Failed runs ({len(bad)})", ""]
    lines += [f"- {_md_escape(f)}" for f in failures] if failures else ["None."]
    return "\n".join(lines).rstrip("\n") + "\n"


def _intro(rows: Sequence[Mapping], skipped_lines: int) -> list[str]:
    good, bad = ok_rows(rows), failed_rows(rows)
    return [
        f"Built from {len(good) + len(bad)} result rows: {len(good)} ok, {len(bad)} failed"
        + (f"; {skipped_lines} unreadable line(s) skipped." if skipped_lines else "."),
        f"{AUS_ON_MEANS_LABEL}: AUS of the across-run mean accuracies (A_or from the "
        f"original model of each forget request), ± propagated standard error. "
        f"{AUS_ON_MEANS_STD_LABEL}: the same AUS ± the propagated sample std of the runs "
        "(the reference code's error bar). "
        f"{AUS_PER_RUN_LABEL}: each run's AUS, then mean ± sample std.",
    ]


def table_notes(key: tuple[str, str, str], table: Sequence[GroupSummary]) -> list[str]:
    """The notes under a table (MIA and membership-audit separation, oracles, device,
    units)."""
    notes = [mia_separation_note(table)]
    notes += [n for n in (audit_separation_note(table), audit_position_note(table)) if n]
    notes += metric_notes(table)
    oracles = oracle_note(table)
    if oracles:
        notes.append(oracles)
    notes.append(device_note(table))
    notes.append(
        f"Accuracies in %, mean ± sample std over the forget requests "
        f"({'classes' if key[2] == 'CR' else 'seeds'}); n = runs."
    )
    return notes


def format_html(
    title: str,
    groups: Sequence[GroupSummary],
    rows: Sequence[Mapping],
    skipped_lines: int = 0,
    plots: Mapping[tuple, Mapping[str, Path]] | None = None,
    extra_plots: Mapping[str, Path] | None = None,
) -> str:
    """report.html: the Markdown report's tables (the same cells), notes and plots (the written
    PNGs, inlined) as one self-contained page."""
    from scar.experiments.html_report import ReportTable, report_page

    tables = []
    for key, table in split_tables(groups).items():
        header, body = table_cells(table)
        images = {name: path.read_bytes() for name, path in (plots or {}).get(key, {}).items()}
        notes = table_notes(key, table) + [f"Data access (first run): {a}"
                                           for a in access_notes(table)]
        tables.append(ReportTable(table_title(key), header, body, notes, images))
    extra = {name: path.read_bytes() for name, path in (extra_plots or {}).items()}
    return report_page(title, _intro(rows, skipped_lines), tables, extra, failed_summary(rows))


def _table_plots(
    key: tuple[str, str, str],
    table: Sequence[GroupSummary],
    rows: Sequence[Mapping[str, Any]],
    plot_dir: Path,
) -> dict[str, Path]:
    from scar.experiments import plots

    slug = table_slug(key)
    made: dict[str, Path] = {}
    # One colour per method in every plot of the table.
    colours = plots.method_colours([g.method for g in table])
    jobs = [
        (
            "AUS vs time",
            f"{slug}_aus_vs_time.png",
            lambda p: plots.plot_aus_vs_time(table, p, colours),
        ),
        (
            "forget vs retain accuracy",
            f"{slug}_forget_vs_retain.png",
            lambda p: plots.plot_forget_vs_retain(table, p, colours),
        ),
    ]
    if key[2] == "CR":
        table_rows = [r for r in ok_rows(rows) if table_key(r) == key]
        jobs.append(
            (
                "per removed class",
                f"{slug}_per_class.png",
                lambda p: plots.plot_per_class(table_rows, p, colours),
            )
        )
    for title, name, fn in jobs:
        path = fn(plot_dir / name)
        if path is not None:
            made[f"{table_title(key)}: {title}"] = Path(path)
    return made


def _feature_plots(run_dir: Path, plot_dir: Path,
                   class_names: Sequence[str] | None = None) -> dict[str, Path]:
    from scar.errors import ConfigError
    from scar.experiments import plots

    made: dict[str, Path] = {}
    for npz in sorted((run_dir / plots.FEATURES_SUBDIR).glob("*.npz")):
        try:
            path = plots.plot_feature_projection(npz, plot_dir / f"features_{npz.stem}.png",
                                                 class_names)
        except ConfigError as exc:
            log.warning("skipping feature snapshot %s: %s", npz, exc)
            continue
        if path is not None:
            made[f"features: {npz.stem}"] = Path(path)
    return made


def _relative(paths: Mapping[str, Path], base: Path) -> dict[str, str]:
    return {title: p.relative_to(base).as_posix() for title, p in paths.items()}


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, results.csv, report.tex and PNG plots (all atomically) from the rows of
    ``run_dir``; default ``out_dir`` is ``run_dir/report``. Returns name → path."""
    return build_report(run_dir, out_dir)[1]


def build_report(
    run_dir: str | Path, out_dir: str | Path | None = None
) -> tuple[list[GroupSummary], dict[str, Path]]:
    """:func:`write_report`, also returning the group summaries (for the CLI's printout)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_OUT_SUBDIR
    rows, skipped = read_rows(run_dir)
    groups = summarize(rows)
    plot_dir = out / PLOTS_SUBDIR
    written: dict[str, Path] = {}
    plot_links: dict[tuple, dict[str, str]] = {}
    table_plots: dict[tuple, dict[str, Path]] = {}
    for key, table in split_tables(groups).items():
        made = table_plots[key] = _table_plots(key, table, rows, plot_dir)
        plot_links[key] = _relative(made, out)
        written.update({f"plot:{p.stem}": p for p in made.values()})
    datasets = {str(r.get("dataset")) for r in ok_rows(rows)}
    names = class_names_of(datasets.pop()) if len(datasets) == 1 else None
    features = _feature_plots(run_dir, plot_dir, names)
    written.update({f"plot:{p.stem}": p for p in features.values()})
    title = f"SCAR report: {run_dir.resolve().name}"
    texts = {
        "markdown": (
            out / "report.md",
            format_markdown(title, groups, rows, skipped, plot_links, _relative(features, out)),
        ),
        "csv": (out / "results.csv", format_csv(groups)),
        "latex": (out / "report.tex", format_latex(groups)),
        "html": (out / "report.html",
                 format_html(title, groups, rows, skipped, table_plots, features)),
    }
    for name, (path, text) in texts.items():
        atomic_write_text(path, text)
        written[name] = path
    log.info("report of %d rows written to %s", len(rows), out)
    return groups, dict(sorted(written.items()))
