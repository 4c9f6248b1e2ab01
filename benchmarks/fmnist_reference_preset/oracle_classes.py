"""Per-class test-accuracy change of oracles against their original (the yardstick for the
``class_change`` of unlearned models in this folder's rows).

    python benchmarks/fmnist_reference_preset/oracle_classes.py ORIGINAL ORACLE_CR0 ORACLE_CR3 ...

Each oracle's sidecar names the class it was trained without; one JSON line per oracle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from probe_scar import cr_metrics, predictions  # noqa: E402

from scar.checkpoint import load_checkpoint  # noqa: E402
from scar.experiments.unlearn import load_dataset_for  # noqa: E402


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    original = load_checkpoint(paths[0])
    bundle = load_dataset_for(original)
    p0, y = predictions(original.model, bundle.test, original.input_spec, "cpu")
    for path in paths[1:]:
        oracle = load_checkpoint(path)
        (cls,) = oracle.meta["forget"]["classes"]
        p, _ = predictions(oracle.model, bundle.test, oracle.input_spec, "cpu")
        m = cr_metrics(p0, p, y, cls, original.model_spec.num_classes)
        kept = [v for i, v in enumerate(m["class_change"]) if i != cls]
        print(json.dumps({"oracle": path, "class": cls, "a_or": m["a_or"],
                          "retain_test": m["retain_test"], "class_change": m["class_change"],
                          "worst_kept": min(kept), "best_kept": max(kept)}))


if __name__ == "__main__":
    main(sys.argv[1:])
