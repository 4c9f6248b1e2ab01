"""What masking a class's logit alone does to the test metrics: the yardstick for SCAR
self-forget's head replay (README, Known limitations).

For each checkpoint and class, the original model's test predictions are recomputed with that
class's logit set to -inf; printed: the retain-test drop in points (negative = a gain) and the
forget-test accuracy (always 0), with the same metrics as ``probe_scar.py``.

    python benchmarks/logit_mask.py --original fastcnn.safetensors --original r18.safetensors
"""

from __future__ import annotations

import argparse
import sys

import torch
from probe_scar import cr_metrics

from scar.checkpoint import load_checkpoint
from scar.data.base import BatchLoader
from scar.evaluation.outputs import compute_outputs
from scar.experiments.unlearn import load_dataset_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", action="append", required=True, metavar="PATH")
    parser.add_argument("--classes", default=None, help="comma list (default: every class)")
    args = parser.parse_args(argv)
    for path in args.original:
        ck = load_checkpoint(path)
        bundle = load_dataset_for(ck)
        with torch.no_grad():
            out = compute_outputs(ck.model, BatchLoader(bundle.test, ck.input_spec,
                                                        batch_size=512, device="cpu"))
        pred0, y = out.logits.argmax(1), out.labels
        n = ck.model_spec.num_classes
        classes = ([int(c) for c in args.classes.split(",")] if args.classes else range(n))
        drops = []
        for c in classes:
            masked = out.logits.clone()
            masked[:, c] = float("-inf")
            m = cr_metrics(pred0, masked.argmax(1), y, c, n)
            drops.append(f"class {c}: drop {100 * (m['a_or'] - m['retain_test']):+.2f}, "
                         f"forget-test {100 * m['forget_test']:.2f}%")
        print(f"{path}:\n  " + "\n  ".join(drops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
