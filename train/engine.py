"""The training loop: for each epoch, `train_one_epoch` -> `evaluate` -> save, and stop cleanly on a signal.

The engine asks and does not know: what a checkpoint holds and how a run resumes is
`train/checkpoint.py`; the step's loss and accuracy bookkeeping is `train/meter.py`; the data
and its placement `train/data.py`, the augmentation `train/augment.py`; rank and world
`train/distributed.py`; every `auto` was decided by `train/runtime.py` before the engine starts.

Hot-loop rules: no host syncs outside log intervals (the meter keeps each step's loss on the
device until a log line reads it), whole-batch preprocessing on the device, and one step path
for every precision and compile setting.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train import augment, checkpoint, config, data, faults, graphs, models
from train.cli import Exit, UserError
from train.config import Config
from train.distributed import Dist
from train.logger import Logger
from train.meter import Meter
from train.optimizer import make_optimizer, make_scheduler
from train.runfolder import RunFolder
from train.runtime import Runtime


class NonFiniteLoss(UserError):
    exit_code = Exit.NONFINITE


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    # no cast cache: each weight is cast once per step anyway, and a CUDA graph must not capture one (train/graphs.py)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, preprocess: augment.Preprocess, dist: Dist, num_classes: int, dtype: torch.dtype | None = None
) -> dict:
    """Loss, accuracy and confusion matrix over the whole split, summed exactly across ranks."""
    device = dist.device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for x, y in loader:
        y = y.to(device, non_blocking=True)
        with autocast(device, dtype):
            out = model(preprocess.test(x))
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
        cells = y * num_classes + out.argmax(1)  # bincount would read its maximum back from a GPU: a sync per batch
        confusion.scatter_add_(0, cells, torch.ones_like(cells))
        faults.point("eval")
    model.train(was_training)
    # one all-reduce of both sums: counts are exact integers, the loss a float64 sum
    packed = torch.cat([confusion.double(), loss_sum.view(1)])
    dist.all_reduce_sum(packed)
    confusion = packed[:-1].round().long().view(num_classes, num_classes).cpu()  # rows: true class, columns: predicted
    count = int(confusion.sum())
    correct = int(confusion.diag().sum())
    return {
        "loss": packed[-1].item() / max(count, 1),
        "acc": correct / max(count, 1),
        "correct": correct,
        "count": count,
        "confusion": confusion,
    }


def build_state(cfg: Config, runtime: Runtime, dist: Dist, num_classes: int, steps_per_epoch: int) -> checkpoint.TrainState:
    """Model, optimizer, schedule, grad scaler and this rank's random streams, all fixed by train.seed."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = models.build(cfg.model, num_classes).to(dist.device)
    model = model.to(memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    optimizer = make_optimizer(cfg.optim, [p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(cfg.optim, optimizer, cfg.train.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=runtime.amp == "fp16")
    # each rank its own augmentation and dropout stream
    generator = torch.Generator(device=dist.device)
    generator.manual_seed(cfg.train.seed * 1_000_003 + 7919 * dist.rank + 1)
    torch.manual_seed(cfg.train.seed * 1_000_003 + 7919 * dist.rank + 2)
    return checkpoint.TrainState(model, optimizer, scheduler, scaler, generator)


def wrap(model: nn.Module, dist: Dist, compile: bool) -> nn.Module:
    """The model the step calls: DDP across ranks, compiled when asked. Checkpoints keep the plain `model`."""
    if dist.active:
        model = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def epoch_metrics(p: checkpoint.Progress, totals: list[float], test: dict, lr: float) -> dict:
    """One line of metrics.jsonl: the epoch's training sums (all ranks) and its evaluation."""
    loss_sum, correct, n = totals
    return {
        "epoch": p.epoch,
        "step": p.step,
        "train_loss": loss_sum / n,
        "train_acc": correct / n,
        "test_loss": test["loss"],
        "test_acc": test["acc"],
        "test_count": test["count"],
        "lr": lr,
        "images_per_s": n / max(p.seconds, 1e-9),
    }


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


class Trainer:
    """One run: its model, optimizer and data; `fit` trains to `train.epochs` and returns an exit code."""

    def __init__(self, cfg: Config, runtime: Runtime, dist: Dist, stop):
        self.cfg, self.runtime, self.dist, self.stop = cfg, runtime, dist, stop
        self.device = dist.device
        self.data = data.load(cfg.data, dist)
        self.batch_per_rank = data.batch_per_rank(cfg.train.batch_size, len(self.data.train), dist.world_size)
        self.steps_per_epoch = data.steps_per_epoch(len(self.data.train), self.batch_per_rank, dist.world_size)
        self.state = build_state(cfg, runtime, dist, len(self.data.classes), self.steps_per_epoch)
        self.model = self.state.model  # unwrapped: what checkpoints hold; ddp_model is what the step calls
        self.ddp_model = wrap(self.model, dist, cfg.model.compile)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.preprocess = augment.Preprocess(cfg.data.augment, self.device, cfg.model.channels_last)
        self.folder = RunFolder(cfg.run_dir)
        self.saver = checkpoint.Saver(self.folder.checkpoints, background=runtime.save_in_background and dist.is_main)
        self.cadence = checkpoint.Cadence(cfg.train, dist)
        self.progress, self.resumed_from, notes = checkpoint.resume(self.state, self.saver.folder, cfg, dist)
        self.logger = Logger(cfg, runtime.progress, dist.is_main, self.progress.epoch)
        for line in notes:
            self.logger.warn(line)
        self.meter = Meter(cfg.log.every_steps, self.batch_per_rank, dist, self.progress.sums)
        self.last_metrics: dict = {}
        # what runs a step: `_step` itself, or its CUDA graph (train.cuda_graphs)
        self.run_step = graphs.runner(self._step, self.state.optimizer, [self.state.generator], runtime.cuda_graphs)

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
            if self.dist.any(self.stop.requested):
                if not saved:  # the cadence skipped this epoch's save
                    self.save()
                return self._stopped("after the epoch's evaluation and save; rerun the same command to continue")
        self.saver.wait()
        self.logger.done(self.last_metrics, p.best_acc, config.flatten(self.cfg), self.saver.folder)
        return Exit.OK

    def train_one_epoch(self) -> bool:
        """Train to the end of the epoch; True when a stop signal ended it early (at a step boundary)."""
        p, rank, world = self.progress, self.dist.rank, self.dist.world_size
        seed, workers = self.cfg.train.seed, self.runtime.workers
        loader = data.train_loader(self.data.train, self.batch_per_rank, rank, world, seed, p.epoch, p.step_in_epoch, workers)
        self.ddp_model.train()
        self.meter.start_window()
        start = time.perf_counter()
        try:
            for images, labels in loader:
                self._run_batch(images, labels)
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

    def _run_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.meter.add(*self.run_step(images, labels))
        self.state.scheduler.step()  # outside the step: a CUDA graph replays the step with the rate of this moment

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on one batch: (loss, logits, labels) for the meter."""
        x = self.preprocess.train(images, self.state.generator)  # (B, 3, H, W) float, augmented, normalised
        y = labels.to(self.device, non_blocking=True)
        if self.progress.step == 0:
            self.logger.first_batch(self.model, x, self.preprocess.mean, self.preprocess.std)
        with autocast(self.device, self.runtime.dtype):
            out = self.ddp_model(x)
            loss = self.criterion(out, y)
        self.state.optimizer.zero_grad(set_to_none=True)
        self.state.scaler.scale(loss).backward()  # the scaler is a pass-through unless train.amp=fp16
        faults.point("step", f"(step {self.progress.step + 1})")
        self.state.scaler.step(self.state.optimizer)
        self.state.scaler.update()
        return loss, out, y

    def _evaluate(self) -> dict:
        loader = data.eval_loader(self.data.test, 2 * self.batch_per_rank, self.dist.rank, self.dist.world_size)
        return evaluate(self.model, loader, self.preprocess, self.dist, len(self.data.classes), self.runtime.dtype)

    def _end_epoch(self, test: dict) -> bool:
        """The epoch's metrics to the logs, then last.pt (and best.pt) when the cadence asks; True when it saved."""
        p = self.progress
        p.epoch += 1
        self.last_metrics = epoch_metrics(p, self.meter.totals(), test, self.state.scheduler.get_last_lr()[0])
        is_best = test["acc"] > p.best_acc
        p.best_acc = max(p.best_acc, test["acc"])
        p.step_in_epoch, p.seconds = 0, 0.0
        self.meter.reset()
        self.logger.epoch(self.last_metrics)
        saving = p.epoch >= self.cfg.train.epochs or self.cadence.epoch_end(p.epoch, p.step)
        if saving or is_best:
            self.save(is_best, hold=not saving)
        return saving

    def save(self, is_best: bool = False, hold: bool = False) -> None:
        """Every rank hands its random streams to rank 0, which writes last.pt (and best.pt), or holds a new best."""
        stop_if_diverged(self.meter, self.progress, self.steps_per_epoch, self.saver, self.cfg.optim.lr)
        rng = self.dist.gather(self.state.rng())
        self.progress.sums = self.meter.totals()
        if not hold:
            self.cadence.saved()
        if self.dist.is_main:
            preprocess = self.preprocess.recipe(self.data.image_size)
            payload = checkpoint.build(self.state, self.progress, rng, self.cfg, self.data.classes, preprocess)
            self.saver.save(payload, is_best, hold)

    # ------------------------------------------------------------------ logs and checks

    def _log_window(self) -> None:
        stop_if_diverged(self.meter, self.progress, self.steps_per_epoch, self.saver, self.cfg.optim.lr)
        self.saver.check()  # a background write that failed stops the run here
        loss, images_per_s = self.meter.take_window()
        self.logger.step(self.progress, self.steps_per_epoch, loss, self.state.scheduler.get_last_lr()[0], images_per_s)

    def _stopped(self, what: str) -> int:
        self.saver.wait()
        self.logger.info(f"stopped by signal at {self.progress.where(self.steps_per_epoch)}; {what}")
        return Exit.STOPPED
