"""The training loss and accuracy of an epoch, counted on the device and summed exactly over ranks.

Each step adds its loss and its number of correct predictions to device buffers, and its loss
to the epoch's float64 sum: no host sync in the step. A log line (`take_window`) reads the
buffers once, every `log.every_steps` steps, and folds the counts into the epoch's sums; a save
or the end of the epoch asks for the all-rank `totals`. Sums, not means: N ranks count exactly
what one process counts. A non-finite loss on any rank stops the run (`stop_if_diverged`).
"""

from __future__ import annotations

import time

import torch

from train import checkpoint
from train.cli import Exit, UserError
from train.distributed import Dist


class NonFiniteLoss(UserError):
    exit_code = Exit.NONFINITE


class Meter:
    def __init__(self, window: int, batch_per_rank: int, dist: Dist, sums: list[float] | None = None, whole: bool = False):
        """`sums`: a resumed epoch's [loss x images, correct, images] so far (all ranks); rank 0 carries them on.

        `whole`: each step's loss and correct count are the whole global batch's, the same on every
        rank (train.reproducible=bitwise): rank 0 counts them, the others count nothing, so the
        all-rank sums add exact zeros and come out bit for bit as in one process.
        """
        self.dist, self.batch = dist, batch_per_rank
        device = dist.device
        # the images one step's loss and correct count stand for on this rank
        self.images = (batch_per_rank * dist.world_size if dist.is_main else 0) if whole else batch_per_rank
        self.losses = torch.zeros(window, device=device)  # the loss of each step since the last window
        self.correct = torch.zeros(window, dtype=torch.int64, device=device)
        self.steps = 0  # steps in the buffers
        self.folded = 0  # of those, steps already added to the sums
        self.sums = torch.tensor(sums if sums and dist.is_main else [0.0, 0.0, 0.0], dtype=torch.float64, device=device)
        self.started = time.perf_counter()  # when the current window began

    def add(self, loss: torch.Tensor, correct: torch.Tensor) -> None:
        """One training step: its mean loss and number of correct predictions (no host sync)."""
        self.losses[self.steps] = loss.detach()
        self.correct[self.steps] = correct
        if self.images:
            # added step by step, not per window: the same float64 sum however a resume cuts the windows
            self.sums[0] += self.losses[self.steps].double() * self.images
        self.steps += 1

    @property
    def full(self) -> bool:
        return self.steps == len(self.losses)

    def start_window(self) -> None:
        self.started = time.perf_counter()

    def nonfinite(self) -> tuple[int, str] | None:
        """The first non-finite loss in the buffers on any rank, as (steps before the latest, its value); None when
        every loss is finite. A collective: every rank calls it at the same step."""
        values = self.losses[: self.steps]
        bad = ~torch.isfinite(values)
        local = bool(bad.any())
        if not self.dist.any(local):
            return None
        if not local:  # another rank saw it: name the latest step
            return 0, "non-finite"
        first = int(bad.nonzero()[0])
        return self.steps - 1 - first, f"{values[first].item()}"

    def take_window(self) -> tuple[float, float]:
        """The mean loss of this rank's steps since the last window, and all ranks' images per second; empties the buffers."""
        now = time.perf_counter()
        mean = self.losses[: self.steps].mean().item()
        images = self.steps * self.batch * self.dist.world_size
        self._fold()
        self.steps = self.folded = 0
        rate = images / max(now - self.started, 1e-9)
        self.started = now
        return mean, rate

    def totals(self) -> list[float]:
        """This epoch so far, summed over ranks: [loss x images, correct, images]. A collective."""
        self._fold()
        return self.dist.all_reduce_sum(self.sums.clone()).tolist()

    def reset(self) -> None:
        """A new epoch."""
        self.sums.zero_()

    def _fold(self) -> None:
        """Add the steps not yet counted to the epoch's sums, on the device."""
        new = slice(self.folded, self.steps)
        if new.start < new.stop and self.images:
            self.sums[1] += self.correct[new].sum()
            self.sums[2] += (new.stop - new.start) * self.images  # every training batch is full
        self.folded = self.steps


def stop_if_diverged(meter: Meter, p: checkpoint.Progress, steps_per_epoch: int, saver: checkpoint.Saver, lr: float) -> None:
    """Raise NonFiniteLoss, naming the step, if any rank saw a non-finite loss since the last check (a collective)."""
    bad = meter.nonfinite()
    if bad is None:
        return
    back, value = bad
    saver.flush_best()  # the checkpoints named below are on disk: the write in flight, a held best.pt
    last, best = saver.folder / checkpoint.LAST, saver.folder / checkpoint.BEST
    saved = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved"
    if best.exists() and not last.exists():
        saved = f"the best model so far is in {best}"
    raise NonFiniteLoss(
        f"loss became {value} at {p.where(steps_per_epoch, back)}; stopped without saving, "
        f"{saved}. Lower optim.lr (now {lr}) or check the data"
    )
