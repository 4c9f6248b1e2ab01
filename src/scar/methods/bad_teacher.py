"""Bad Teacher (Chundawat, Tarun, Mandal, Kankanhalli, "Can Bad Teaching Induce Forgetting?
Unlearning in Deep Networks Using an Incompetent Teacher", AAAI 2023).

Two teachers distil into a student that starts as the original model:

- the *competent* teacher (the original, frozen) on retain images;
- the *incompetent* teacher (the same architecture, randomly initialised, frozen) on forget
  images.

The student sees a shuffled mix of the whole forget set and a random ``retain_fraction`` of the
retain set, and minimises KL(p_teacher ‖ p_student) at temperature ``kd_t``, where p_teacher is
the incompetent teacher's output for a forget image and the competent teacher's for a retain
image (paper Eq. 1–2).

Defaults are the official code's (github.com/vikram2000b/bad-teaching-unlearning,
``unlearn.py`` ``blindspot_unlearner`` as its CIFAR-Super20 notebook calls it; the paper's
class- and sub-class-removal setting with ResNet-18): Adam lr 1e-4, 1 epoch, batch 256,
temperature 1, a 30 % random subset of the retain data. A fixed budget, as in the paper: every
batch of the one epoch runs (no forget-accuracy target).

Where we deviate, and why:

- The KL is averaged over the batch (``batchmean``); the official code calls ``F.kl_div`` with
  its default elementwise mean, i.e. our loss divided by the number of classes. Adam's step is
  invariant to a constant scale of the loss (up to its ε), so the trajectory is the same; the
  recorded loss is the true KL.
- The incompetent teacher is this model's own copy with every submodule's
  ``reset_parameters()`` called (PyTorch's default initialisation, BatchNorm running statistics
  reset), drawn from the run's seed. The official code builds a fresh model of the same class.
  Parameters no submodule re-initialises (a bare ``nn.Parameter``) keep their trained values;
  their share is recorded as ``teacher_kept_share``.
- The paper reports class, sub-class and sample removal; random removal (HR) runs the same
  loss.

Measured on the tiny synthetic fixtures (tests/methods/test_bad_teacher.py, class removal,
lr 1e-3, batches of 32): one epoch takes the forget accuracy 1.00 → 0.00 with retain kept at
1.00; three epochs end at 0.44. The method drives forget outputs towards the random teacher's
near-uniform ones, not towards a wrong class, so the argmax on forget images drifts and the
forget accuracy is not monotone in the epochs. With the defaults the tiny sets make a single
batch, and one Adam step at 1e-4 changes no prediction.

Reads forget and retain data: not retain-free (a subset of retain, all of forget).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from scar.data.base import BatchLoader, ConcatImages
from scar.errors import check_range
from scar.methods import _loops
from scar.methods.base import Method, UnlearnData, register, seeded

log = logging.getLogger(__name__)


def random_teacher(model: nn.Module) -> tuple[nn.Module, float]:
    """A frozen eval-mode copy of ``model`` with every submodule's parameters re-initialised
    (``reset_parameters``, drawn from torch's global generator). Returns (teacher, share of the
    parameter elements no submodule re-initialised)."""
    teacher = copy.deepcopy(model)
    reset: set[int] = set()
    for module in teacher.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
            reset.update(id(p) for p in module.parameters(recurse=False))
    total = sum(p.numel() for p in teacher.parameters())
    kept = sum(p.numel() for p in teacher.parameters() if id(p) not in reset)
    if kept:
        log.warning("bad_teacher: %d of %d parameter values are not re-initialised by any "
                    "reset_parameters(); the incompetent teacher keeps them.", kept, total)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), kept / max(total, 1)


def bad_teacher_loss(student_logits: Tensor, competent_logits: Tensor,
                     incompetent_logits: Tensor, is_forget: Tensor,
                     temperature: float) -> Tensor:
    """KL(p_teacher ‖ p_student) averaged over the batch, with p_teacher the incompetent
    teacher's softmax on forget rows and the competent teacher's on the others."""
    p_good = F.softmax(competent_logits / temperature, dim=1)
    p_bad = F.softmax(incompetent_logits / temperature, dim=1)
    target = torch.where(is_forget[:, None], p_bad, p_good)
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, target, reduction="batchmean")


@register
@dataclass(kw_only=True)
class BadTeacher(Method):
    """Bad Teacher: distil a random teacher on forget and the original on a retain subset."""

    name = "bad_teacher"
    requires = frozenset({"forget", "retain"})

    lr: float = 1e-4
    epochs: int = 1  # fixed budget
    batch_size: int = 256
    kd_t: float = 1.0  # KL temperature
    retain_fraction: float = 0.3  # share of the retain set mixed in (random, without replacement)

    def validate(self) -> None:
        check_range("lr", self.lr, 0, low_inclusive=False)
        _loops.check_count("epochs", self.epochs)
        _loops.check_count("batch_size", self.batch_size)
        check_range("kd_t", self.kd_t, 0, low_inclusive=False)
        check_range("retain_fraction", self.retain_fraction, 0, 1)

    def access_note(self) -> str | None:
        return f"a random {self.retain_fraction:.0%} of the retain set"

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData) -> nn.Module:
        with seeded(data) as gen:
            bad, self.teacher_kept_share_ = random_teacher(model)
            n_forget = len(data.forget)
            k = math.floor(self.retain_fraction * len(data.retain))
            pick = torch.randperm(len(data.retain), generator=gen)[:k].sort().values
            self.retain_used_ = k
            parts = [data.forget] + ([data.retain.subset(pick)] if k else [])
            mixed = BatchLoader(ConcatImages(parts), data.input_spec, batch_size=self.batch_size,
                                shuffle=True, device=data.device, seed=data.seed + 1)
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
            bar = tqdm(total=self.epochs * len(mixed), desc=self.name,
                       disable=not data.progress, dynamic_ncols=True, leave=False)
            model.train()
            for epoch in range(1, self.epochs + 1):
                for batch in mixed:
                    is_forget = batch.idx.to(data.device) < n_forget
                    with torch.no_grad():
                        good_logits, bad_logits = original(batch.x), bad(batch.x)
                    logits = model(batch.x)
                    loss = bad_teacher_loss(logits, good_logits, bad_logits, is_forget,
                                            self.kd_t)
                    if not torch.isfinite(loss):
                        log.warning("bad_teacher: non-finite loss; stopping with the last "
                                    "finite model.")
                        bar.close()
                        return model
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    hit = logits.detach().argmax(1) == batch.y
                    row = {"epoch": epoch, "step": len(self.history_) + 1,
                           "loss": float(loss.detach()), "forget_in_batch": int(is_forget.sum())}
                    if bool(is_forget.any()):
                        row["forget_acc_batch"] = float(hit[is_forget].float().mean())
                    self.record(**row)
                    bar.update(1)
            bar.close()
        return model
