"""The training loop: for each epoch, `train_one_epoch` -> `evaluate` -> save, and stop cleanly on a signal.

The engine asks and does not know: what a checkpoint holds and how a run resumes is
`train/checkpoint.py`; one optimizer step on a batch (draws, augmentation, forward, backward,
update) is `train/step.py`, which asks `train/randomness.py` for every random draw (keyed per
image, so the same on any number of ranks) and `train/shards.py` how a rank's batch becomes the
gradient (one pass with DDP, or bitwise shards); the step's loss and accuracy bookkeeping is
`train/meter.py`; the data and its placement `train/data.py`, the augmentation
`train/augment.py`; rank and world `train/distributed.py`; every `auto` was decided by
`train/runtime.py` before the engine starts.

Hot-loop rules: no host syncs outside log intervals (the meter keeps each step's loss on the
device until a log line reads it), whole-batch preprocessing on the device, and one step path
for every precision and compile setting.
"""

from __future__ import annotations

import signal
import time

import torch
from torch import nn

from train import augment, checkpoint, data, faults, models, preemption
from train.board import TestExamples
from train.cli import Exit
from train.config import Config
from train.distributed import Dist
from train.logger import Logger, epoch_metrics
from train.meter import Meter, stop_if_diverged
from train.optimizer import make_optimizer, make_scheduler
from train.runfolder import RunFolder
from train.runtime import Runtime
from train.step import Step, autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    preprocess: augment.Preprocess,
    dist: Dist,
    num_classes: int,
    dtype: torch.dtype | None = None,
    observe=None,
) -> dict:
    """Loss, accuracy and confusion matrix over the whole split, summed exactly across ranks.

    `observe(images, labels, logits)`, when given, sees every batch (TensorBoard's examples).
    """
    device = dist.device
    was_training = model.training
    model.eval()
    cells = num_classes * num_classes
    # each image's loss in a slot of its own (zero on the other ranks): summed in index order after the all-reduce,
    # the same float64 sum on any number of ranks
    losses = torch.zeros(len(loader.dataset), dtype=torch.float64, device=device)
    confusion = torch.zeros(cells, dtype=torch.int64, device=device)
    for x, y, index in loader:
        y = y.to(device, non_blocking=True)
        with autocast(device, dtype):
            out = model(preprocess.test(x))
        losses[index.to(device)] = nn.functional.cross_entropy(out.float(), y, reduction="none").double()
        pairs = y * num_classes + out.argmax(1)  # bincount would read its maximum back from a GPU: a sync per batch
        confusion.scatter_add_(0, pairs, torch.ones_like(pairs))
        if observe is not None:
            observe(x, y, out)
        faults.point("eval")
    model.train(was_training)
    # one all-reduce: counts are exact integers, and a loss slot adds only zeros from the other ranks
    packed = dist.all_reduce_sum(torch.cat([confusion.double(), losses]))
    confusion = packed[:cells].round().long().view(num_classes, num_classes).cpu()  # rows: true class, columns: predicted
    count = int(confusion.sum())
    correct = int(confusion.diag().sum())
    return {
        "loss": packed[cells:].sum().item() / max(count, 1),
        "acc": correct / max(count, 1),
        "correct": correct,
        "count": count,
        "confusion": confusion,
    }


def build_state(cfg: Config, runtime: Runtime, dist: Dist, num_classes: int, steps_per_epoch: int) -> checkpoint.TrainState:
    """Model, optimizer, schedule and grad scaler, all fixed by train.seed (the random draws: train/randomness.py)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = models.build(cfg.model, num_classes).to(dist.device)
    model = model.to(memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    optimizer = make_optimizer(cfg.optim, [p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(cfg.optim, optimizer, cfg.train.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=runtime.amp == "fp16")
    return checkpoint.TrainState(model, optimizer, scheduler, scaler)


class Trainer:
    """One run: its model, optimizer and data; `fit` trains to `train.epochs` and returns an exit code."""

    def __init__(self, cfg: Config, runtime: Runtime, dist: Dist, stop):
        self.cfg, self.runtime, self.dist, self.stop = cfg, runtime, dist, stop
        self.device = dist.device
        self.data = data.load(cfg.data, dist)
        self.batch_per_rank = data.batch_per_rank(cfg.train.batch_size, len(self.data.train), dist.world_size)
        self.steps_per_epoch = data.steps_per_epoch(len(self.data.train), self.batch_per_rank, dist.world_size)
        self.state = build_state(cfg, runtime, dist, len(self.data.classes), self.steps_per_epoch)
        self.model = self.state.model  # unwrapped: what checkpoints hold and evaluation calls
        mean, std = data.NORMALISATIONS[cfg.data.normalize]
        self.preprocess = augment.Preprocess(cfg.data.augment, self.device, cfg.model.channels_last, mean, std)
        self.step = Step(cfg, self.state, dist, runtime, self.preprocess, len(self.data.train))
        self.folder = RunFolder(cfg.run_dir)
        self.saver = checkpoint.Saver(self.folder.checkpoints, background=runtime.save_in_background and dist.is_main)
        self.cadence = checkpoint.Cadence(cfg.train, dist)
        self.progress, self.resumed_from, notes = checkpoint.resume(
            self.state, self.saver.folder, cfg, dist, self.data.identity()
        )
        self.logger = Logger(cfg, runtime.progress, dist.is_main, self.progress.epoch, self.progress.step)
        for line in self.data.notes + notes:
            self.logger.warn(line)
        # a window longer than an epoch never fills (an epoch's end closes it): no buffer for log.every_steps=10**18
        window, whole = min(cfg.log.every_steps, self.steps_per_epoch), self.step.passes.sharded
        self.meter = Meter(window, self.batch_per_rank, dist, self.progress.sums, whole=whole)
        if self.progress.step == 0:  # a new run: TensorBoard shows its first batch and the model's graph
            self.step.first_batch = lambda x: self.logger.first_batch(self.model, x, self.preprocess.mean, self.preprocess.std)
        self.last_metrics: dict = {}
        self.grace = preemption.grace(dist.launch) if dist.is_main else None  # (seconds, who kills) after a stop signal

    # ------------------------------------------------------------------ the story of a run

    def fit(self) -> int:
        """Train to train.epochs; the last checkpoint is on disk when this returns or raises."""
        try:
            return self._fit()  # every return waits for the checkpoint in flight and raises its error
        finally:
            self.saver.flush_best()  # after an error elsewhere, a write in flight and a held best.pt are still good states

    def _fit(self) -> int:
        p, epochs, dist = self.progress, self.cfg.train.epochs, self.dist
        if dist.is_main:
            self.folder.write_settings(self.cfg, self.runtime)
        self.logger.start(self.runtime.line(), self.resumed_from, p.where(self.steps_per_epoch))
        if p.epoch >= epochs:
            self.logger.nothing_to_do(p)
            return Exit.OK
        self.logger.training(len(self.data.train), len(self.data.test), dist.world_size, self.device, self.steps_per_epoch)
        if dist.spans_nodes:
            self.logger.info(dist.network_line())
        while p.epoch < epochs:
            if self.train_one_epoch():  # a stop signal, at a step boundary: save that step
                self.save()
                return self._stopped(f"saved {self.saver.folder / checkpoint.LAST}. Rerun the same command to continue")
            saved = self._end_epoch(self._evaluate())
            # a stop during the last epoch's evaluation finishes the run: nothing is left to continue
            if p.epoch < epochs and self.dist.any(self.stop.requested):
                if not saved:  # the cadence skipped this epoch's save
                    self.save()
                return self._stopped("after the epoch's evaluation and save; rerun the same command to continue")
        self.saver.wait()
        self.logger.done(self.last_metrics, p.best_acc, self.saver.folder)
        return Exit.OK

    def train_one_epoch(self) -> bool:
        """Train to the end of the epoch; True when a stop signal ended it early (at a step boundary)."""
        p, rank, world = self.progress, self.dist.rank, self.dist.world_size
        seed, workers = self.cfg.train.seed, self.runtime.workers
        loader = data.train_loader(self.data.train, self.batch_per_rank, rank, world, seed, p.epoch, p.step_in_epoch, workers)
        self.step.start_epoch(p.epoch)
        self.meter.start_window()
        start = time.perf_counter()
        try:
            for images, labels, indices in loader:
                self._run_batch(images, labels, indices)
                p.step_in_epoch += 1
                p.step += 1
                if logged := self.meter.full or p.step_in_epoch == self.steps_per_epoch:
                    self._log_window()
                # the save cadence (train.save_every_*); the epoch's last step is saved after its evaluation instead
                if p.step_in_epoch < self.steps_per_epoch and self.cadence.in_epoch(p.step, logged):
                    p.seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save()
                self.logger.progress(p.epoch + 1, p.step_in_epoch, self.steps_per_epoch)
                if self.dist.any(self.stop.requested):
                    return True
        finally:
            p.seconds += time.perf_counter() - start
        return False

    def _run_batch(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.meter.add(*self.step(images, labels, indices, self.progress.step))
        self.state.scheduler.step()  # outside the step: a CUDA graph replays the step with the rate of this moment

    def _evaluate(self) -> dict:
        # batches of the same images on any number of ranks in bitwise mode: twice a shard; else twice the rank's batch
        size = 2 * (self.cfg.train.batch_size // self.cfg.train.shards if self.step.passes.sharded else self.batch_per_rank)
        loader = data.eval_loader(self.data.test, size, self.dist.rank, self.dist.world_size)
        examples = TestExamples() if self.cfg.log.tensorboard else None  # every rank: TensorBoard's PR curves need all
        observe = examples.add if examples else None
        test = evaluate(self.model, loader, self.preprocess, self.dist, len(self.data.classes), self.runtime.dtype, observe)
        test["examples"] = examples.gather(self.dist) if examples else None
        return test

    def _end_epoch(self, test: dict) -> bool:
        """The epoch's metrics to the logs, then last.pt (and best.pt) when the cadence asks; True when it saved."""
        p = self.progress
        p.epoch += 1
        self.last_metrics = epoch_metrics(p, self.meter.totals(), test, self.state.scheduler.get_last_lr()[0])
        is_best = test["acc"] > p.best_acc
        p.best_acc = max(p.best_acc, test["acc"])
        p.step_in_epoch, p.seconds = 0, 0.0
        self.meter.reset()
        self.logger.epoch(self.last_metrics, test, self.data.classes)
        saving = p.epoch >= self.cfg.train.epochs or self.cadence.epoch_end(p.epoch, p.step)
        if saving or is_best:
            self.save(is_best, hold=not saving)
        return saving

    def save(self, is_best: bool = False, hold: bool = False) -> None:
        """Rank 0 writes last.pt (and best.pt), or holds a new best; every rank takes part in the checks and sums."""
        stop_if_diverged(self.meter, self.progress, self.steps_per_epoch, self.saver, self.cfg.optim.lr)
        self.progress.sums = self.meter.totals()
        if not hold:
            self.cadence.saved()
        if self.dist.is_main:
            recipe, identity = self.preprocess.recipe(self.data.image_size), self.data.identity()
            payload = checkpoint.build(self.state, self.progress, self.cfg, self.data.classes, recipe, identity)
            self.saver.save(payload, is_best, hold)
            if warning := preemption.save_outlasts(self.grace, self.saver.last_write_s):
                self.logger.warn(warning)
                self.grace = None  # said once

    # ------------------------------------------------------------------ logs and checks

    def _log_window(self) -> None:
        stop_if_diverged(self.meter, self.progress, self.steps_per_epoch, self.saver, self.cfg.optim.lr)
        self.saver.check()  # a background write that failed stops the run here
        loss, images_per_s = self.meter.take_window()
        self.logger.step(self.progress, self.steps_per_epoch, loss, self.state.scheduler.get_last_lr()[0], images_per_s)

    def _stopped(self, what: str) -> int:
        self.saver.wait()
        seen = self.dist.gather(sorted(signal.Signals(s).name for s in set(self.stop.received)))  # each rank's own
        if seen is not None:  # rank 0: say whether the signal reached every rank, or only some (the others followed)
            self.logger.info(f"stopped by signal at {self.progress.where(self.steps_per_epoch)}, {preemption.seen(seen)}; {what}")
        return Exit.STOPPED
