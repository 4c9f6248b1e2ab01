"""Self-contained HTML pages: the audit page of one deletion request (``scar unlearn --report``,
``scar evaluate --report``) and ``report.html`` of a run folder (``scar report``).

A page needs nothing but itself: no network, no external CSS, scripts or fonts; every image is a
PNG drawn with matplotlib's Agg backend (:mod:`scar.experiments.plots`) inlined as a ``data:``
URI. The builders (``*_html``, :func:`audit_page`, :func:`report_page`) are pure functions from
plain data to an HTML string and escape every string they are given; :func:`collect_audit`
gathers the facts of a request (hashes, versions, per-class accuracies, a feature projection)
and :func:`write_page` writes a page atomically.

The run report's numbers come from :mod:`scar.experiments.report` (which reads the rows through
:class:`~scar.experiments.store.ResultsStore`): this module never reads results files and never
imports the report module (the report imports this one).
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scar.evaluation.audit import AUS_KEYS, SPLIT_NAMES, audit_note, mia_note
from scar.evaluation.lr_attack import AuditResult
from scar.experiments.labels import DASH, ORIGINAL, RETRAIN, removed_names
from scar.utils import atomic_write_text

if TYPE_CHECKING:
    from torch import nn

    from scar.checkpoint import Checkpoint
    from scar.data.base import ImageSet
    from scar.data.datasets import DatasetBundle
    from scar.data.forget import Splits
    from scar.evaluation.outputs import Outputs
    from scar.experiments.request import RequestResult

log = logging.getLogger(__name__)

#: z of the two-sided 95% interval shown next to every accuracy.
Z95 = 1.96
#: At most this many test images per group (forget, retain) in the audit page's projection.
PROJECTION_IMAGES = 1000

_CSS = """
body{font-family:sans-serif;margin:2em auto;padding:0 1em;max-width:72em;color:#222;
line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #bbb;padding:.25em .6em}
th{background:#f0f0f0;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.verdict{font-weight:bold;background:#f6f6e8;padding:.6em;border-left:4px solid #aa8}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555}code{font-size:.95em}ul{padding-left:1.4em}
"""


# ---------------------------------------------------------------- pure builders
def esc(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_html(title: str, png: bytes) -> str:
    """A figure with the PNG inlined and ``title`` as alt text and caption."""
    return (f'<figure><img src="{data_uri(png)}" alt="{esc(title)}">'
            f"<figcaption>{esc(title)}</figcaption></figure>")


def _is_number_text(text: str) -> bool:
    head = text.split(" ", 1)[0].replace("%", "")
    try:
        float(head)
    except ValueError:
        return False
    return True


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]],
               caption: str | None = None) -> str:
    """A table; cells that start with a number are right-aligned (class ``num``)."""
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{esc(caption)}</caption>")
    if any(header):  # a key-value table has none
        parts.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                     + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        cells = []
        for value in row:
            text = str(value)
            cls = ' class="num"' if _is_number_text(text) else ""
            cells.append(f"<td{cls}>{esc(text)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def list_html(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>" if items else ""


def section_html(title: str, *parts: str) -> str:
    """A section: an escaped heading, then ``parts`` (already HTML)."""
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page_html(title: str, sections: Sequence[str], intro: Sequence[str] = ()) -> str:
    """The whole document: inline CSS, escaped title and intro paragraphs, then ``sections``."""
    paragraphs = "".join(f"<p>{esc(p)}</p>" for p in intro)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
            f"<body><h1>{esc(title)}</h1>{paragraphs}{''.join(sections)}</body></html>\n")


# ---------------------------------------------------------------- the run report
@dataclass
class ReportTable:
    """One table of ``report.html``: its cells (from the report's own table builder), notes
    and plots (title → PNG bytes)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)


def report_page(title: str, intro: Sequence[str], tables: Sequence[ReportTable],
                extra_images: Mapping[str, bytes] | None = None,
                failures: Sequence[str] = ()) -> str:
    """``report.html`` of a run folder (pure)."""
    sections = [section_html(t.title, table_html(t.header, t.rows), list_html(t.notes),
                             *(image_html(name, png) for name, png in t.images.items()))
                for t in tables]
    if extra_images:
        sections.append(section_html("Feature projections", *(
            image_html(name, png) for name, png in extra_images.items())))
    sections.append(section_html(f"Failed runs ({len(failures)})",
                                 list_html(failures) if failures else "<p>None.</p>"))
    return page_html(title, sections, intro)


# ---------------------------------------------------------------- the audit page
@dataclass
class AuditFacts:
    """Everything the audit page of one deletion request shows (plain data)."""

    title: str
    scenario: str  # "CR" | "HR"
    #: What was removed: class names, or the forget set's size and the hash of its indices.
    removed: list[tuple[str, str]]
    dataset: list[tuple[str, str]]
    checkpoints: list[tuple[str, str, str]]  # (role, path, sha256)
    method: list[tuple[str, str]]  # method, preset, hyperparameters, run info, time
    access: list[tuple[str, str, str]]  # (data kind, required?, read?)
    access_profile: str | None
    environment: list[tuple[str, str]]  # versions, device, date
    #: Metrics per model (original, the unlearned / evaluated one, retrain if given).
    results: dict[str, dict[str, Any]]
    split_sizes: dict[str, int]
    subject: str = "unlearned"  # the results key of the model this page is about
    images: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy ``p`` measured on ``n`` images."""
    if n <= 0:
        return (math.nan, math.nan)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_text(p: float | None, n: int) -> str:
    """``"87.50 [85.31, 89.43]"``: accuracy in % and its 95% Wilson interval."""
    if p is None or not isinstance(p, (int, float)) or not math.isfinite(p) or n <= 0:
        return DASH
    lo, hi = wilson_interval(float(p), n)
    return f"{100 * p:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"


def accuracy_table(results: Mapping[str, Mapping[str, Any]],
                   sizes: Mapping[str, int]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per model, one column per non-empty split."""
    splits = [s for s in SPLIT_NAMES if sizes.get(s, 0) > 0]
    header = ["model"] + [f"{s} (n={sizes[s]})" for s in splits] + ["AUS"]
    rows = []
    for name, m in results.items():
        aus = m.get("aus")
        rows.append([name] + [accuracy_text(m.get(f"acc/{s}"), sizes[s]) for s in splits]
                    + [f"{aus:.3f}" if isinstance(aus, (int, float)) else DASH])
    return header, rows


def mia_table(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The membership audit per model: mean ± std over the attack's repetitions."""
    header = ["model", "MIA accuracy", "MIA AUC", "MIA F1", "members / non-members", "variant"]
    rows = []
    for name, m in results.items():
        if "mia/acc" not in m:
            continue
        rows.append([
            name,
            f"{m['mia/acc']:.3f} ± {m.get('mia/acc_std', 0.0):.3f}",
            f"{m['mia/auc']:.3f} ± {m.get('mia/auc_std', 0.0):.3f}",
            f"{m['mia/f1']:.3f} ± {m.get('mia/f1_std', 0.0):.3f}",
            f"{int(m.get('mia/n_members', 0))} / {int(m.get('mia/n_nonmembers', 0))}",
            str(m.get("mia/variant", "")),
        ])
    return header, rows


def lr_audit_table(results: Mapping[str, Mapping[str, Any]]
                   ) -> tuple[list[str], list[list[str]]]:
    """The likelihood-ratio membership audit per model (``--audit``): AUC and TPR at low FPR,
    each with its bootstrap 95% CI."""
    header = ["model", "attack", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR",
              "members / non-members", "reference models"]
    rows = []
    for name, m in results.items():
        audit = AuditResult.from_metrics(dict(m))
        if audit is None:
            continue
        cells = [f"{audit.values[k]:.3f} [{audit.ci[k][0]:.3f}, {audit.ci[k][1]:.3f}]"
                 for k in ("auc", "tpr@1%", "tpr@0.1%")]
        rows.append([name, audit.attack, *cells, f"{audit.n_members} / {audit.n_nonmembers}",
                     str(audit.n_references)])
    return header, rows


def verdict(results: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int],
            scenario: str, subject: str = "unlearned") -> str:
    """One line: the subject's forget accuracy against the retrained model's 95% band (or,
    without one, against the original), and its kept accuracy against the original's."""
    keys = AUS_KEYS[scenario]
    forget_split, kept_split = keys["a_f"].split("/", 1)[1], keys["a_t"].split("/", 1)[1]
    me = results.get(subject, {})
    a_f, a_t = me.get(keys["a_f"]), me.get(keys["a_t"])
    if a_f is None or a_t is None:
        return f"No verdict: the {subject} model lacks {keys['a_f']} or {keys['a_t']}."
    parts = []
    oracle = results.get(RETRAIN)
    if oracle is not None and oracle.get(keys["a_f"]) is not None:
        lo, hi = wilson_interval(float(oracle[keys["a_f"]]), sizes.get(forget_split, 0))
        where = ("within" if lo <= a_f <= hi else
                 f"{100 * (a_f - hi):.2f} points above" if a_f > hi else
                 f"{100 * (lo - a_f):.2f} points below")
        parts.append(f"{forget_split} accuracy {100 * a_f:.2f}% is {where} the retrained "
                     f"model's 95% band [{100 * lo:.2f}, {100 * hi:.2f}]%")
    else:
        before = results.get(ORIGINAL, {}).get(keys["a_f"])
        was = f" (original {100 * before:.2f}%)" if before is not None else ""
        parts.append(f"{forget_split} accuracy {100 * a_f:.2f}%{was}; no retrained model was "
                     "given (--oracle), so there is no band to compare with")
    kept = results.get(ORIGINAL, {}).get(keys["a_t"])
    if kept is not None and subject != ORIGINAL:
        parts.append(f"{kept_split} accuracy {100 * a_t:.2f}% vs the original's "
                     f"{100 * kept:.2f}% ({100 * (a_t - kept):+.2f} points)")
    return "Verdict: " + "; ".join(parts) + "."


def lr_audit_html(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The likelihood-ratio audit's table and separation note ("" when it was not run)."""
    header, rows = lr_audit_table(results)
    if not rows:
        return ""
    note = audit_note(results)
    return ("<p>Likelihood-ratio audit with reference models (per-example membership "
            "scores); bootstrap 95% intervals in brackets.</p>" + table_html(header, rows)
            + (f"<p>{esc(note)}</p>" if note else ""))


def audit_page(facts: AuditFacts) -> str:
    """The audit page of one deletion request (pure)."""
    acc_header, acc_rows = accuracy_table(facts.results, facts.split_sizes)
    mia_header, mia_rows = mia_table(facts.results)
    note = mia_note(facts.results)
    access = table_html(["data", "required by the method", "images loaded"], facts.access)
    profile = f"<p>Profile: <code>{esc(facts.access_profile)}</code></p>" \
        if facts.access_profile else ""
    line = verdict(facts.results, facts.split_sizes, facts.scenario, facts.subject)
    sections = [
        section_html("What was removed", table_html(["", ""], facts.removed)),
        section_html("Verdict", f'<p class="verdict">{esc(line)}</p>'),
        section_html("Accuracy on every split",
                     "<p>Accuracy in %, with its 95% Wilson interval over the split's images; "
                     "AUS against the original's accuracy.</p>",
                     table_html(acc_header, acc_rows)),
        section_html("Membership-inference audit",
                     ("<p>Mean ± sample std over the attack's repetitions.</p>"
                      + table_html(mia_header, mia_rows) if mia_rows else
                      "<p>The simple membership-inference attack (MIA) was not run.</p>")
                     + (f"<p>{esc(note)}</p>" if note else "")
                     + lr_audit_html(facts.results)),
        section_html("Checkpoints", table_html(["role", "file", "sha256"], facts.checkpoints)),
        section_html("Method", table_html(["", ""], facts.method)),
        section_html("Data access", access, profile),
        section_html("Dataset", table_html(["", ""], facts.dataset)),
        section_html("Environment", table_html(["", ""], facts.environment)),
    ]
    if facts.images:
        sections.append(section_html("Plots", *(image_html(t, png)
                                                for t, png in facts.images.items())))
    if facts.notes:
        sections.append(section_html("Notes", list_html(facts.notes)))
    return page_html(facts.title, sections)


# ---------------------------------------------------------------- gathering the facts
def indices_sha256(indices: Sequence[int]) -> str:
    """sha256 of the sorted indices written as decimal numbers joined by commas (ASCII)."""
    text = ",".join(str(int(i)) for i in sorted(int(i) for i in indices))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def file_sha256(path: str | Path | None) -> str:
    from scar.models.pretrained import sha256

    if path is None or not Path(path).is_file():
        return DASH
    return sha256(path)


def removed_rows(splits: Splits, class_names: Sequence[str] | None) -> list[tuple[str, str]]:
    """What a forget request removed: class names (CR), or the forget set's size and hash."""
    spec = splits.spec
    rows = [("request", spec.describe())]
    if splits.removed_classes:
        names = removed_names(list(splits.removed_classes), class_names)
        rows.append(("classes", ", ".join(f"{n} (id {c})"
                                          for n, c in zip(names, splits.removed_classes))))
    rows.append(("training images removed", str(len(splits.forget_indices))))
    rows.append(("sha256 of the sorted indices",
                 indices_sha256(splits.forget_indices.tolist())))
    return rows


def access_rows(access: Mapping[str, Any] | None) -> list[tuple[str, str, str]]:
    from scar.methods.base import DATA_KINDS

    if not access:
        return [(kind, DASH, "not recorded") for kind in DATA_KINDS]
    # Stored class statistics are a file, not images: "stats" counts images read to make them.
    required = set(access.get("required") or ())
    loaded = access.get("images_loaded") or {}
    return [(kind, "yes" if kind in required else "no",
             str(int(loaded[kind])) if loaded.get(kind) else "none") for kind in DATA_KINDS]


def environment_rows(versions: Mapping[str, Any], device: str,
                     when: datetime | None = None) -> list[tuple[str, str]]:
    when = when or datetime.now(timezone.utc)
    rows = [(f"{name} version", str(v)) for name, v in versions.items()]
    rows += [("device", device), ("host", platform.node() or DASH),
             ("date (UTC)", when.isoformat(timespec="seconds"))]
    return rows


def dataset_rows(bundle: DatasetBundle) -> list[tuple[str, str]]:
    info = bundle.info
    return [("name", info.name), ("loader options", str(dict(bundle.options) or DASH)),
            ("classes", str(info.num_classes)),
            ("images", f"{len(bundle.train)} train / {len(bundle.test)} test"),
            ("hash", "not computed (SCAR records no dataset hash)")]


def per_class_accuracies(outputs: Mapping[str, Mapping[str, Outputs]], num_classes: int,
                         split: str = "test") -> dict[str, Any]:
    from scar.evaluation.metrics import per_class_accuracy

    return {name: per_class_accuracy(outs[split], num_classes)
            for name, outs in outputs.items() if split in outs and len(outs[split])}


def projection_images(splits: Splits) -> list[ImageSet]:
    """At most :data:`PROJECTION_IMAGES` forget and as many kept images (seeded sample): the
    forget test images (CR) or the forget set (HR), and the retain test images."""
    import torch

    def sample(images: ImageSet) -> ImageSet:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(images), generator=g)[:PROJECTION_IMAGES].sort().values
        return images.subset(idx)

    forget = splits.test_forget if len(splits.test_forget) else splits.train_forget
    return [sample(s) for s in (forget, splits.test_retain) if len(s)]


def collect_plots(ck: Checkpoint, subject: nn.Module, splits: Splits,
                  outputs: Mapping[str, Mapping[str, Outputs]], class_names: Sequence[str],
                  device: Any, subject_name: str = "unlearned"
                  ) -> dict[str, bytes]:
    """The per-class accuracy plot (from the audit's outputs: no extra pass) and the 2-D PCA of
    the penultimate features of forget and retain test images, original vs ``subject``."""
    import numpy as np
    import torch

    from scar.experiments import plots
    from scar.experiments.request import feature_pair

    images: dict[str, bytes] = {}
    per_class = per_class_accuracies(outputs, len(class_names))
    if per_class:
        colours = plots.method_colours(list(per_class))
        fig = plots.class_accuracy_figure(class_names, per_class, splits.removed_classes,
                                          colours)
        images["Test accuracy per class"] = plots.png_bytes(fig)
    parts = projection_images(splits)
    if parts:
        pairs = [feature_pair(ck, subject, part, device) for part in parts]
        before = torch.cat([b for b, _ in pairs]).numpy()
        after = torch.cat([a for _, a in pairs]).numpy()
        labels = torch.cat([part.labels for part in parts]).numpy()
        removed = np.asarray(splits.removed_classes, dtype=np.int64)
        marked = None
        if not len(removed):  # HR: mark the forget set's images (the first part)
            marked = np.arange(len(labels)) < len(parts[0])
        fig = plots.feature_projection_figure(
            before, after, labels, removed,
            f"penultimate features (PCA), original vs {subject_name}: {len(labels)} images",
            class_names, marked)
        if fig is not None:
            images["Feature projection (2-D PCA of the classifier head's inputs)"] = \
                plots.png_bytes(fig)
    return images


def _hparams_text(hparams: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())) or DASH


def _info_text(info: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.rstrip('_')}={v}" for k, v in sorted(info.items())) or DASH


def split_sizes(splits: Splits) -> dict[str, int]:
    return {name: len(getattr(splits, name)) for name in SPLIT_NAMES}


def request_facts(result: RequestResult, bundle: DatasetBundle, *,
                  retrain: Checkpoint | None = None,
                  images: Mapping[str, bytes] | None = None) -> AuditFacts:
    """The audit facts of ``scar unlearn``'s :class:`~scar.experiments.request.RequestResult`
    (``retrain``: the oracle's :class:`~scar.checkpoint.Checkpoint`, when one was given)."""
    from scar.utils import device_name, versions

    ck, request = result.checkpoint, result.request
    checkpoints = [("original", str(ck.path or DASH), file_sha256(ck.path)),
                   ("unlearned", str(result.saved or "not saved"), file_sha256(result.saved))]
    if retrain is not None:
        checkpoints.append((RETRAIN, str(retrain.path), file_sha256(retrain.path)))
    method = [("method", result.method.name), ("preset", request.preset or DASH),
              ("hyperparameters", _hparams_text(result.method.hparams())),
              ("run info", _info_text(result.outcome.info)),
              ("unlearning time", f"{result.seconds:.2f} s"),
              ("surrogate", str(request.surrogate or "the dataset's default") + (
                  f" × {request.surrogate_n}" if request.surrogate_n else "")),
              ("seed", str(request.seed))]
    return AuditFacts(
        title=f"Audit: {result.method.name} on {result.splits.spec.describe()}",
        scenario=result.scenario, removed=removed_rows(result.splits, bundle.info.class_names),
        dataset=dataset_rows(bundle), checkpoints=checkpoints, method=method,
        access=access_rows(result.access), access_profile=result.outcome.profile,
        environment=environment_rows(versions(), f"{device_name(result.data.device)} "
                                                 f"({result.data.device})"),
        results=result.results(), split_sizes=split_sizes(result.splits),
        images=dict(images or {}))


def checkpoint_facts(ck: Checkpoint, bundle: DatasetBundle, splits: Splits,
                     results: Mapping[str, Any], *, references: Mapping[str, Checkpoint],
                     device: str, subject: str = "evaluated",
                     images: Mapping[str, bytes] | None = None) -> AuditFacts:
    """The audit facts of ``scar evaluate``: checkpoint ``ck`` (method, hyperparameters and
    data access from its sidecar) audited against ``references`` (role → Checkpoint)."""
    from scar.utils import versions

    meta = ck.meta
    checkpoints = [(subject, str(ck.path), file_sha256(ck.path))]
    checkpoints += [(role, str(ref.path or DASH), file_sha256(ref.path))
                    for role, ref in references.items()]
    seconds = meta.get("unlearn_seconds")
    method = [("role", str(meta.get("role", DASH))), ("method", str(meta.get("method", DASH))),
              ("preset", str(meta.get("preset") or DASH)),
              ("hyperparameters", _hparams_text(meta.get("hparams") or {})),
              ("run info", _info_text(meta.get("unlearn_info") or {})),
              ("unlearning time", f"{seconds:.2f} s on {meta.get('device_name', DASH)}"
               if isinstance(seconds, (int, float)) else DASH)]
    access = meta.get("access")
    return AuditFacts(
        title=f"Audit: {ck.path.name if ck.path else subject} on {splits.spec.describe()}",
        scenario=_scenario(splits),
        removed=removed_rows(splits, bundle.info.class_names), dataset=dataset_rows(bundle),
        checkpoints=checkpoints, method=method, access=access_rows(access),
        access_profile=(access or {}).get("profile"),
        environment=environment_rows({"recorded in the checkpoint: " + k: v for k, v in
                                      (meta.get("versions") or {}).items()}
                                     | {f"audited with {k}": v for k, v in versions().items()},
                                     device),
        results=dict(results), split_sizes=split_sizes(splits), subject=subject,
        images=dict(images or {}))


def _scenario(splits: Splits) -> str:
    from scar.data.forget import scenario_of

    return scenario_of(splits.spec)


def write_page(path: str | Path, text: str) -> Path:
    """Write a page atomically."""
    path = Path(path)
    atomic_write_text(path, text)
    log.info("wrote %s", path)
    return path


def write_request_page(path: str | Path, result: RequestResult, bundle: DatasetBundle, *,
                       retrain: Checkpoint | None = None, device: Any = "cpu") -> Path:
    """The audit page of a :func:`~scar.experiments.request.run_request` result (run with
    ``keep_outputs=True``), written to ``path``: ``scar unlearn --report``."""
    images = collect_plots(result.checkpoint, result.model, result.splits, result.outputs,
                           bundle.info.class_names, device)
    facts = request_facts(result, bundle, retrain=retrain, images=images)
    return write_page(path, audit_page(facts))


def write_checkpoint_page(path: str | Path, ck: Checkpoint, bundle: DatasetBundle,
                          splits: Splits, results: Mapping[str, Any],
                          outputs: Mapping[str, Mapping[str, Outputs]], *,
                          references: Mapping[str, Checkpoint], device: Any = "cpu") -> Path:
    """The audit page of ``scar evaluate --report``: checkpoint ``ck`` audited (``results``,
    ``outputs`` of :func:`~scar.evaluation.audit.audit_models`, the evaluated model under
    ``"evaluated"``) against ``references`` (role → Checkpoint)."""
    from scar.utils import device_name, resolve_device

    base = references.get(ORIGINAL) or ck
    images = collect_plots(base, ck.model, splits, outputs, bundle.info.class_names, device,
                           subject_name="evaluated")
    dev = resolve_device(device)
    facts = checkpoint_facts(ck, bundle, splits, results, references=references,
                             device=f"{device_name(dev)} ({dev})", images=images)
    return write_page(path, audit_page(facts))
