"""The ``scar`` command: thin wrappers over the library.

Results go to stdout, logs and progress bars to stderr. Any :class:`~scar.errors.ScarError`
becomes a one-line ``error:`` message and exit code 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scar import __version__, cli_report, cli_run
from scar.errors import ConfigError, ScarError

log = logging.getLogger("scar")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------- shared argument groups
def parse_sets(pairs: Sequence[str] | None, flag: str = "--set") -> dict[str, str]:
    """``--set key=value`` pairs → dict (values stay strings; consumers coerce and validate)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{flag} expects key=value; got {pair!r}.")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def parse_dataset_options(dataset: str, pairs: Sequence[str] | None) -> dict[str, Any]:
    """``--dataset-option key=value`` pairs → options of ``dataset``'s loader, each value coerced
    to the type of the option's default (``channels=3`` → 3); unknown keys → ConfigError."""
    from scar.data.datasets import full_options, option_defaults
    from scar.training.recipes import coerce

    raw = parse_sets(pairs, flag="--dataset-option")
    full_options(dataset, raw)  # unknown options → ConfigError naming the allowed ones
    defaults = option_defaults(dataset)
    return {k: coerce(f"--dataset-option {k}", v, defaults[k]) for k, v in raw.items()}


def add_data_args(p: argparse.ArgumentParser, dataset_default: str | None = "fashion-mnist"):
    p.add_argument("--dataset", default=dataset_default,
                   help="dataset name (see `scar list datasets`); imagefolder:<path> for your own")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE",
                   help="dataset loader option, e.g. channels=3 (grey images as RGB, for "
                        "tv:<model>); repeatable. A checkpoint records its options: commands "
                        "that read one reuse them")
    p.add_argument("--data-dir", default=None,
                   help="where the dataset lives (else $SCAR_DATA_DIR, then system locations)")
    p.add_argument("--download", action="store_true",
                   help="allow downloading the dataset if it is not found locally")


def add_forget_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--forget-class", type=int, nargs="+", metavar="K",
                   help="class removal (CR): remove these class ids")
    g.add_argument("--forget-indices", metavar="FILE",
                   help="random removal (HR): train-set indices file from `scar forget-set sample`")
    g.add_argument("--forget-fraction", type=float, metavar="F",
                   help="random removal (HR): sample this fraction of the training set")
    g.add_argument("--forget-count", type=int, metavar="N",
                   help="random removal (HR): sample this many training images")
    p.add_argument("--forget-seed", type=int, default=0, help="seed for sampled forget sets")


def forget_spec_from_args(args: argparse.Namespace):
    from scar.data.forget import ForgetSpec

    if args.forget_class:
        return ForgetSpec.for_classes(args.forget_class)
    if args.forget_indices:
        return ForgetSpec.from_file(args.forget_indices)
    if args.forget_fraction is not None:
        return ForgetSpec.random(fraction=args.forget_fraction, seed=args.forget_seed)
    if args.forget_count is not None:
        return ForgetSpec.random(count=args.forget_count, seed=args.forget_seed)
    return None


def add_own_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="architecture of a plain state dict (a .pt/.pth saved with "
                        "torch.save(model.state_dict()) or a safetensors file without SCAR "
                        "metadata), e.g. tv:resnet18; needs --dataset")
    p.add_argument("--head", default=None,
                   help="classifier head module of a plain state dict (default: found)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")


# ---------------------------------------------------------------- commands
@command("list")
def cmd_list(args: argparse.Namespace) -> int:
    registries = _registries()
    for kind in [args.what] if args.what else sorted(registries):
        reg = registries[kind]
        print(f"{kind}:")
        for name in reg.names():
            extra = reg.help(name)
            print(f"  {name:<22} {extra}".rstrip())
            for line in reg.details(name):
                print(line)
    return 0


def _registries() -> dict:
    from scar.data.datasets import DATASETS
    from scar.data.surrogates import SURROGATES
    from scar.evaluation.lr_attack import ATTACKS
    from scar.models import MODELS
    from scar.training.recipes import RECIPES

    regs = {"datasets": DATASETS, "models": MODELS, "surrogates": SURROGATES, "recipes": RECIPES,
            "audits": ATTACKS}
    try:
        from scar.methods import METHODS
        from scar.methods.presets import PRESETS

        regs["methods"] = METHODS
        regs["presets"] = PRESETS
    except ImportError:  # methods package not present yet
        pass
    return regs


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from scar.checkpoint import check_output, load_checkpoint, sidecar_path
    from scar.training.workflow import TrainJob, run_train_job

    forget = forget_spec_from_args(args)
    overrides = parse_sets(args.set)
    if args.preset:
        from scar.methods.presets import PRESETS

        overrides = {**PRESETS.get(args.preset).recipe_values(args.dataset), **overrides}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    options = parse_dataset_options(args.dataset, args.dataset_option)
    if args.pretrained is not None:
        from scar.models.pretrained import check_request

        check_request(args.model, args.pretrained)  # before the dataset is loaded
    job = TrainJob(dataset=args.dataset, dataset_options=options, model=args.model,
                   forget=forget, recipe_overrides=overrides, seed=args.seed, head=args.head,
                   pretrained=args.pretrained)
    out = Path(args.out) if args.out else Path("checkpoints") / default_name(job)
    weights = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
    inputs = [Path(args.pretrained)] if isinstance(args.pretrained, str) else []
    check_output([weights, sidecar_path(weights), weights.with_suffix(".stats.safetensors")],
                 inputs)
    path = run_train_job(job, out, device=args.device, data_dir=args.data_dir,
                         download=args.download, amp=not args.no_amp, progress=not args.quiet)
    ck = load_checkpoint(path)
    acc = ck.meta.get("test_acc")
    split = ck.meta.get("test_acc_split", "test")
    print(f"{job.role} checkpoint: {path}")
    recipe = f" (training recipe of preset {args.preset})" if args.preset else ""
    origin = ck.meta.get("pretrained")
    start = ""
    if origin:
        start = f", fine-tuned from pretrained weights ({origin.get('repo') or origin['file']})"
    print(f"model {ck.model_spec.name}{recipe} on {args.dataset}{start}: {split} accuracy "
          f"{100 * acc:.2f}% after {ck.meta['train_seconds']:.1f}s on {ck.meta['device_name']}")
    return 0


def forget_tag(spec) -> str:
    """Short file-name tag of a forget spec: cr3, cr3-5, hr0.1-s0, idx-<file stem>."""
    if spec.kind == "class":
        return "cr" + "-".join(map(str, spec.classes))
    if spec.kind == "random":
        amount = spec.count if spec.count is not None else spec.fraction
        return f"hr{amount}-s{spec.seed}"
    return "idx-" + Path(spec.indices_file).stem


def default_name(job) -> str:
    tag = "original" if job.forget is None else f"oracle-{forget_tag(job.forget)}"
    model = (job.model or "default") + ("-pretrained" if job.pretrained else "")
    dataset = job.dataset.replace(":", "_").replace("/", "_")
    dataset += "".join(f"-{k}{v}" for k, v in sorted((job.dataset_options or {}).items()))
    return f"{dataset}_{model}_{tag}_s{job.seed}.safetensors"


@command("forget-set")
def cmd_forget_set(args: argparse.Namespace) -> int:
    from scar.checkpoint import check_output
    from scar.data.datasets import load_dataset
    from scar.data.forget import sample_forget_indices, save_indices

    check_output([Path(args.out)], [])
    bundle = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download,
                          **parse_dataset_options(args.dataset, args.dataset_option))
    n = len(bundle.train)
    idx = sample_forget_indices(n, count=args.count, fraction=args.fraction, seed=args.seed)
    save_indices(args.out, idx, {"dataset": args.dataset, "seed": args.seed, "num_train": n})
    print(f"wrote {len(idx)} of {n} training indices (seed {args.seed}) to {args.out}")
    return 0


@command("surrogate")
def cmd_surrogate(args: argparse.Namespace) -> int:
    from scar.data.surrogates import build_surrogate_subset

    summary = build_surrogate_subset(Path(args.src), Path(args.out), per_class=args.per_class,
                                     seed=args.seed)
    print(f"wrote {summary['images']} images of {summary['classes']} classes to {args.out}")
    return 0


def same_task(ck, other, flag: str):
    """``other`` (an --original / --oracle checkpoint) must classify the same inputs into the
    same classes as ``ck``; returns it."""
    mine = (ck.model_spec.num_classes, ck.input_spec.channels, ck.input_spec.size)
    theirs = (other.model_spec.num_classes, other.input_spec.channels, other.input_spec.size)
    if mine != theirs or (ck.dataset and other.dataset and ck.dataset != other.dataset):
        raise ConfigError(
            f"{flag} {other.path} is a {theirs[0]}-class model of {theirs[1]}x{theirs[2]}px "
            f"{other.dataset or '?'} images, but the evaluated checkpoint is a {mine[0]}-class "
            f"model of {mine[1]}x{mine[2]}px {ck.dataset or '?'} images; give the "
            f"{flag.lstrip('-')} of this same task."
        )
    return other


def index_files(args: argparse.Namespace) -> list[Path]:
    """The forget-indices file of the command, if any (an input that --out must not hit)."""
    path = getattr(args, "forget_indices", None)
    return [Path(path)] if path else []


def open_checkpoint(args: argparse.Namespace):
    """``--checkpoint`` and its data: a SCAR checkpoint with its recorded dataset and options
    (``--dataset`` / ``--dataset-option`` override them), or a plain state dict with ``--model``,
    ``--dataset`` (and ``--head``)."""
    from scar.experiments.unlearn import open_checkpoint as open_with_data

    def options(dataset: str) -> dict[str, Any] | None:
        return parse_dataset_options(dataset, args.dataset_option) if args.dataset_option \
            else None

    return open_with_data(args.checkpoint, model=args.model, head=args.head,
                          dataset=args.dataset, options=options, data_dir=args.data_dir,
                          download=args.download)


def load_reference(path: str | Path, ck, bundle, flag: str):
    """An ``--original`` / ``--oracle`` (or the recorded parent) of checkpoint ``ck``: a SCAR
    checkpoint, or a plain state dict of ``ck``'s architecture."""
    from scar.checkpoint import check_file, has_metadata, load_checkpoint
    from scar.experiments.unlearn import plain_checkpoint

    if has_metadata(check_file(path)):
        return same_task(ck, load_checkpoint(path), flag)
    spec = ck.model_spec
    return plain_checkpoint(path, bundle, spec.name, head=spec.head, model_kwargs=spec.kwargs)


@command("unlearn")
def cmd_unlearn(args: argparse.Namespace) -> int:
    from scar.checkpoint import check_output, input_files, sidecar_path
    from scar.data.forget import make_splits
    from scar.experiments.request import UnlearnRequest, run_request
    from scar.experiments.unlearn import unlearned_path
    from scar.utils import resolve_device

    ck, bundle = open_checkpoint(args)
    dest = unlearned_path(args.out)
    page = report_path(args.report, dest, ".audit.html")
    oracle_files = [Path(args.oracle), sidecar_path(args.oracle)] if args.oracle else []
    check_output([dest, sidecar_path(dest)] + ([page] if page else []),
                 input_files(ck) + index_files(args) + oracle_files)
    references = {"original": ck.model}
    oracle = None
    if args.oracle:
        oracle = load_reference(args.oracle, ck, bundle, "--oracle")
        references["retrain"] = oracle.model
    request = UnlearnRequest(forget=forget_spec_from_args(args), method=args.method,
                             hparams=parse_sets(args.set), preset=args.preset,
                             surrogate=args.surrogate, surrogate_n=args.surrogate_n,
                             seed=args.seed, mia=args.mia, relearn=relearn_from_args(args))
    device = resolve_device(args.device)
    # run_request draws the same (deterministic) splits again; only --audit needs them here.
    membership = membership_from_args(args, ck, bundle, make_splits(bundle, request.forget),
                                      device) if args.audit else None
    result = run_request(ck, bundle, request, device=device,
                         progress=not args.quiet, data_dir=args.data_dir,
                         references=references, out=Path(args.out), keep_outputs=bool(page),
                         membership=membership)
    preset = f" (preset {args.preset})" if args.preset else ""
    print(f"{result.method.name}{preset} on {result.splits.spec.describe()}: "
          f"{result.seconds:.1f}s on {result.data.device} "
          f"({result.outcome.info.get('stop_reason_', 'done')})")
    print(f"data access: {result.outcome.profile}")
    print(format_summary(result.results(), result.scenario))
    print_notes(result.results())
    print(f"unlearned checkpoint: {result.saved}")
    if page:
        from scar.experiments.html_report import write_request_page

        write_request_page(page, result, bundle, retrain=oracle, device=device)
        print(f"audit page: {page}")
    return 0


def report_path(flag: str | bool | None, beside: Path, suffix: str) -> Path | None:
    """Where ``--report [PATH]`` writes its page: PATH, or ``beside`` with ``suffix`` in place of
    its own (None without the flag)."""
    if not flag:
        return None
    if isinstance(flag, str):
        return Path(flag)
    return beside.with_name(beside.name.split(".")[0] + suffix)


SUMMARY_COLUMNS = {
    "CR": ["acc/train_forget", "acc/test_forget", "acc/test_retain", "js/test_forget",
           "dest/top_share", "relearn/steps", "mia/auc", "audit/auc", "audit/tpr@1%", "aus"],
    "HR": ["acc/train_forget", "acc/train_retain", "acc/test", "js/train_forget",
           "dest/top_share", "relearn/steps", "mia/auc", "audit/auc", "audit/tpr@1%", "aus"],
}


def add_relearn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relearn", action="store_true",
                   help="also measure each model's relearn time: steps of fine-tuning a copy on "
                        "the forget set until its accuracy is back to half the original's")
    p.add_argument("--relearn-set", action="append", metavar="KEY=VALUE",
                   help="a relearn setting (fraction, target, optimizer, lr, batch_size, "
                        "max_steps, eval_images, seed), e.g. --relearn-set max_steps=500")


def relearn_from_args(args: argparse.Namespace):
    """The relearn settings of ``--relearn`` / ``--relearn-set`` (None: off)."""
    from scar.evaluation.relearn import RelearnSettings

    sets = parse_sets(args.relearn_set, "--relearn-set")
    if sets and not args.relearn:
        raise ConfigError("--relearn-set needs --relearn.")
    return RelearnSettings.parse(sets or args.relearn)


def add_audit_args(p: argparse.ArgumentParser, default_dir: str) -> None:
    p.add_argument("--audit", default=None, metavar="ATTACK",
                   help="also run a likelihood-ratio membership audit with reference models "
                        "(see `scar list audits`: rmia, lira); the reference models are "
                        "trained once like the original and cached")
    p.add_argument("--references", type=int, default=4, metavar="K",
                   help="number of reference models of --audit (even; default 4)")
    p.add_argument("--references-dir", default=None, metavar="DIR",
                   help=f"where reference models are cached (default: {default_dir})")


def membership_from_args(args: argparse.Namespace, original, bundle, splits, device):
    """The likelihood-ratio audit of ``--audit`` (None without it): reference models of
    ``original`` (trained on its data, cached under ``--references-dir``, else beside it)."""
    if not args.audit:
        return None
    from scar.experiments.references import prepare_audit

    folder = Path(args.references_dir) if args.references_dir else (
        original.path.parent if original.path is not None else Path("checkpoints"))
    return prepare_audit(original, bundle, splits, args.audit, folder, count=args.references,
                         device=device, data_dir=args.data_dir, progress=not args.quiet)


def print_notes(results: dict) -> None:
    """The MIA and audit notes of ``results`` (whether each separates original and oracle)."""
    from scar.evaluation.audit import audit_note, mia_note

    for note in (mia_note(results), audit_note(results)):
        if note:
            print(note)


def format_summary(results: dict, scenario: str) -> str:
    """A small plain-text table: one row per model, accuracies in percent."""
    cols = [c for c in SUMMARY_COLUMNS[scenario] if any(c in r for r in results.values())]
    head = f"{'model':<18}" + "".join(f"{c:>18}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append(f"{'-':>18}")
            elif c.startswith("acc/"):
                cells.append(f"{100 * v:>17.2f}%")
            else:
                cells.append(f"{v:>18.3f}")
        lines.append(f"{name:<18}" + "".join(cells))
    return "\n".join(lines)


@command("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from scar.checkpoint import check_output, input_files, sidecar_path
    from scar.data.forget import ForgetSpec, make_splits, scenario_of
    from scar.evaluation.audit import audit_models, audit_note, mia_note
    from scar.utils import atomic_write_json, resolve_device

    ck, bundle = open_checkpoint(args)
    page = report_path(args.report, Path(args.checkpoint), ".evaluate.html")
    written = [Path(p) for p in (args.out, page) if p]
    if written:
        inputs = input_files(ck) + index_files(args) + [
            p for ref in (args.original or ck.meta.get("parent"), args.oracle) if ref
            for p in (Path(ref), sidecar_path(ref))]
        check_output(written, inputs)
    spec = forget_spec_from_args(args)
    if spec is None:
        if not ck.meta.get("forget"):
            raise ConfigError(
                "no forget request given and the checkpoint records none: pass --forget-class, "
                "--forget-indices, --forget-fraction or --forget-count."
            )
        spec = ForgetSpec.from_dict(ck.meta["forget"])
    splits = make_splits(bundle, spec)
    references = {}
    original_path = args.original or ck.meta.get("parent")
    if original_path:
        references["original"] = load_reference(original_path, ck, bundle, "--original")
    if args.oracle:
        references["retrain"] = load_reference(args.oracle, ck, bundle, "--oracle")
    models = {"original": references["original"].model if original_path else ck.model}
    if args.oracle:
        models["retrain"] = references["retrain"].model
    models["evaluated"] = ck.model
    scenario = scenario_of(spec)
    device = resolve_device(args.device)
    membership = membership_from_args(args, references.get("original", ck), bundle, splits,
                                      device)
    results, outputs = audit_models(models, splits, ck.input_spec, scenario, device=device,
                                    mia=not args.no_mia, mia_variant=args.mia_variant,
                                    audit=membership, relearn=relearn_from_args(args))
    report = {"checkpoint": str(args.checkpoint), "forget": spec.to_dict(),
              "scenario": scenario, "results": results, "mia_note": mia_note(results),
              "audit_note": audit_note(results),
              "access": ck.meta.get("access"), "unlearn_seconds": ck.meta.get("unlearn_seconds"),
              "device_name": ck.meta.get("device_name")}
    print(format_summary(results, scenario))
    print_notes(results)
    if ck.meta.get("access"):
        print(f"data access: {ck.meta['access']['profile']}")
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(report, indent=2, default=str))
    if page:
        from scar.experiments.html_report import write_checkpoint_page

        write_checkpoint_page(page, ck, bundle, splits, results, outputs,
                              references=references, device=device)
        print(f"audit page: {page}")
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from scar.experiments.demo import AUDIT_METHOD, run_demo
    from scar.experiments.report import format_markdown_table

    start = time.perf_counter()
    summary, groups, written = run_demo(args.out, forget_class=args.forget_class,
                                        device=args.device, data_dir=args.data_dir,
                                        progress=not args.quiet)
    print(format_markdown_table(groups))
    print(f"\n{summary.ok} runs done, {summary.skipped} reused, {summary.failed} failed "
          f"in {time.perf_counter() - start:.0f}s; report: {written.get('markdown', args.out)}")
    if "audit" in written:
        print(f"audit page of the {AUDIT_METHOD} request: {written['audit']}")
    return 0 if summary.failed == 0 else 1


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scar",
        description="SCAR: retain-free machine unlearning for image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="list registered datasets, models, methods, surrogates")
    p.add_argument("what", nargs="?", choices=["datasets", "models", "methods", "presets",
                                                "surrogates", "recipes", "audits"])

    p = sub.add_parser("train", help="train the original model, or the oracle with a forget spec")
    add_data_args(p)
    p.add_argument("--model", default=None,
                   help="architecture (see `scar list models`; default: the dataset recipe's)")
    p.add_argument("--head", default=None, help="name of the classifier head module (override)")
    p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="FILE",
                   help="fine-tune a timm:/tv: model from pretrained weights found locally: "
                        "FILE (safetensors or a weights-only torch state dict), else the "
                        "library's cache (Hugging Face / torch hub); nothing is downloaded "
                        "without --download. The head is re-sized to the dataset's classes")
    add_forget_args(p)
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe field (lr, batch_size, schedule, ...); repeatable")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a named training recipe (see `scar list presets`), e.g. reference: "
                        "the paper code's; --set and --epochs override it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="checkpoint path (.safetensors)")
    add_device_args(p)

    p = sub.add_parser("forget-set", help="forget-set tools")
    fs = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = fs.add_parser("sample", help="sample random training indices to forget (HR) into a file")
    add_data_args(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--count", type=int)
    g.add_argument("--fraction", type=float)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output JSON file")

    p = sub.add_parser("surrogate", help="surrogate (out-of-distribution) image tools")
    ss = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = ss.add_parser("build", help="copy N random images per class from an image tree")
    s.add_argument("--from", dest="src", required=True, help="image tree <class>/<images>")
    s.add_argument("--per-class", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)

    p = sub.add_parser("unlearn", help="unlearn a forget request from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="original (or unlearned) checkpoint")
    p.add_argument("--method", default="scar", help="see `scar list methods` (default scar)")
    add_forget_args(p, required=True)
    p.add_argument("--surrogate", default=None,
                   help="surrogate source (see `scar list surrogates`; default per dataset)")
    p.add_argument("--surrogate-n", type=int, default=None,
                   help=f"number of surrogate images (default {5000})")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="named hyperparameters of the method (see `scar list presets`), e.g. "
                        "reference; --set values override them")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method hyperparameter, e.g. --set lambda_2=5 --set stats=retain")
    p.add_argument("--mia", action="store_true", help="also run the membership-inference attack")
    p.add_argument("--oracle", default=None,
                   help="retrained checkpoint (without the forget set) to audit alongside "
                        "(also gives each model's JS divergence to its outputs)")
    add_audit_args(p, "the checkpoint's folder")
    add_relearn_args(p)
    p.add_argument("--report", nargs="?", const=True, default=None, metavar="PATH",
                   help="also write a self-contained HTML audit page (default: next to the "
                        "unlearned checkpoint, NAME.audit.html)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors) or folder")
    add_data_args(p, dataset_default=None)
    add_own_checkpoint_args(p)
    add_device_args(p)

    p = sub.add_parser("demo", help="the whole workflow on Fashion-MNIST (train, unlearn, report)")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--forget-class", type=int, default=0, help="class to remove (default 0)")
    p.add_argument("--data-dir", default=None)
    add_device_args(p)

    p = sub.add_parser("evaluate", help="audit a checkpoint on a forget request (JSON + table)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--original", default=None,
                   help="original checkpoint (default: the sidecar's parent, else itself)")
    p.add_argument("--oracle", default=None,
                   help="retrained checkpoint to compare with (also gives each model's JS "
                        "divergence to its outputs)")
    add_relearn_args(p)
    add_forget_args(p)
    p.add_argument("--no-mia", action="store_true", help="skip the membership-inference attack")
    p.add_argument("--mia-variant", default="balanced", choices=["balanced", "reference"])
    add_audit_args(p, "the original's folder")
    p.add_argument("--out", default=None, help="write the JSON report here (else stdout)")
    p.add_argument("--report", nargs="?", const=True, default=None, metavar="PATH",
                   help="also write a self-contained HTML audit page (default: next to the "
                        "checkpoint, NAME.evaluate.html)")
    add_data_args(p, dataset_default=None)
    add_own_checkpoint_args(p)
    add_device_args(p)

    for add_parser, _ in EXTENSIONS.values():
        add_parser(sub)
    return parser


#: Sub-commands kept in their own modules (to keep this file short): parser builder, handler.
EXTENSIONS: dict[str, tuple[Callable[[argparse._SubParsersAction], None],
                            Callable[[argparse.Namespace], int]]] = {
    "run": (cli_run.add_run_parser, cli_run.cmd_run),
    "report": (cli_report.add_report_parser, cli_report.cmd_report),
}
COMMANDS.update({name: handler for name, (_, handler) in EXTENSIONS.items()})


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from scar.utils import tune_cpu_allocator

    tune_cpu_allocator()
    if not args.command:
        parser.print_help()
        return 1
    try:
        return COMMANDS[args.command](args)
    except ScarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m scar.cli` runs this file as __main__, a second module object: use the real one
    # (the one every other module and the tests see).
    from scar.cli import main as _main

    sys.exit(_main())
