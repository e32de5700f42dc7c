"""The training loop: `Trainer.fit` -> `train_one_epoch` -> `evaluate` -> save, and exact resume.

Hot-loop rules: no host syncs outside log intervals (the loss of each step goes into a device
buffer that is read every `log.every_steps` steps), whole-batch preprocessing on the device,
and one step path for every precision and compile setting.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train import checkpoint, config, data, distributed, faults, models
from train.config import Config
from train.distributed import Dist
from train.errors import UserError
from train.logger import Logger

EXIT_OK = 0
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after saving; rerun the same command to continue


class NonFiniteLoss(UserError):
    exit_code = 3


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches done in the current epoch
    best_acc: float = -1.0
    sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # this epoch so far: loss x n, correct, n (all ranks)
    seconds: float = 0.0  # training time of this epoch so far


def lr_factor(cfg: config.OptimConfig, epochs: int, steps_per_epoch: int):
    """The schedule as a function of the optimizer step: warm-up, then none / step / cosine / onecycle."""
    total = max(1, epochs * steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.schedule == "onecycle":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "step":
            return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
        return 1.0

    return factor


def make_optimizer(cfg: config.OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "auto":
        # bf16 on CUDA; on CPUs without bf16 units autocast was measured ~11x slower than float32
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[setting]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, preprocess: data.Preprocess, dist: Dist, num_classes: int, dtype: torch.dtype | None = None
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
        confusion += torch.bincount(y * num_classes + out.argmax(1), minlength=num_classes * num_classes)
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


class Trainer:
    """Owns the model, optimizer and data of one run; `fit` trains to `train.epochs` and returns an exit code."""

    def __init__(self, cfg: Config, dist: Dist, stop):
        self.cfg, self.dist, self.stop = cfg, dist, stop
        self.device = device = dist.device
        self.checkpoints = cfg.run_dir / "checkpoints"
        world = dist.world_size
        if cfg.train.batch_size % world:
            raise UserError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the {world} ranks; "
                f"use a multiple of {world} (it is the global batch, split evenly across ranks)"
            )
        self.batch = cfg.train.batch_size // world

        self.data = data.load(cfg.data, dist)
        if device.type == "cuda":
            # the whole uint8 dataset lives on the GPU: a batch is one index, no host-to-device copy per step
            self.data.train.images, self.data.train.labels = self.data.train.images.to(device), self.data.train.labels.to(device)
        self.steps_per_epoch = data.steps_per_epoch(len(self.data.train), self.batch, world)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"train.batch_size={cfg.train.batch_size} is larger than the {len(self.data.train)} training images "
                f"(per rank: {len(self.data.train) // world}); lower train.batch_size"
            )
        self.num_classes = len(self.data.classes)

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = models.build(cfg.model, self.num_classes).to(device)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)  # the unwrapped model: what checkpoints hold
        self.optimizer = make_optimizer(cfg.optim, [p for p in model.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.optim, cfg.train.epochs, self.steps_per_epoch)
        )
        self.amp = amp_dtype(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.preprocess = data.Preprocess(cfg.data.augment, device, cfg.model.channels_last)
        # each rank its own augmentation and dropout stream, all fixed by train.seed
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(cfg.train.seed * 1_000_003 + 7919 * dist.rank + 1)
        torch.manual_seed(cfg.train.seed * 1_000_003 + 7919 * dist.rank + 2)

        background = cfg.train.save_in_background == "always" or (
            cfg.train.save_in_background == "auto" and device.type == "cuda"
        )
        self.writer = checkpoint.Writer(background=background and dist.is_main)
        self.progress = Progress()
        self.resumed_from = self._resume()
        self.logger = Logger(cfg, dist.is_main, self.progress.epoch)

        net = model
        if dist.active:
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if cfg.model.compile:
            net = torch.compile(net)
        self.net = net
        # the loss of every step until the next log line, kept on the device (no sync per step)
        self.losses = torch.zeros(cfg.log.every_steps, device=device)
        self.correct = torch.zeros(cfg.log.every_steps, dtype=torch.int64, device=device)
        self.window = 0  # steps in the buffers since the last log line
        self.folded = 0  # of those, steps already added to self.sums
        # this epoch's running sums; a checkpoint holds their all-rank total, which rank 0 carries on with
        sums = self.progress.sums if dist.is_main else [0.0, 0.0, 0.0]
        self.sums = torch.tensor(sums, dtype=torch.float64, device=device)

    # ------------------------------------------------------------------ resume and save

    def _fits(self, payload: dict) -> None:
        """Raise CheckpointError when a loadable checkpoint does not belong to this run."""
        state = payload["model"]
        expected = self.model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            theirs = payload.get("config", {}).get("model", {}).get("name", "unknown")
            raise checkpoint.CheckpointError(f"checkpoint holds another model (model.name={theirs}, different layers)")
        try:
            old = config.from_dict(payload["config"])
        except UserError as e:
            raise checkpoint.CheckpointError(f"checkpoint config is not readable ({e})") from None
        changed = {
            k: v for k, v in config.differences(old, self.cfg).items() if k not in config.RESUMABLE_CHANGES and k != "log.run_dir"
        }
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:3])
            raise checkpoint.CheckpointError(f"checkpoint was written with a different config ({diff})")

    def _resume(self):
        path, problems = None, []
        if self.dist.is_main and self.checkpoints.is_dir():
            checkpoint.remove_temporary(self.checkpoints)  # left by a process killed while saving
            path, problems = checkpoint.find_resumable(self.checkpoints, self._fits)
        path, problems = self.dist.broadcast((path, problems))
        if path is None:
            if problems:
                raise UserError(
                    f"cannot resume from {self.checkpoints}: {'; '.join(dict.fromkeys(problems))}. "
                    f"Rerun with the run's own config, choose another log.run_dir, or move {self.checkpoints} away to start over"
                )
            return None
        payload = checkpoint.load(path, map_location=self.device, verify=False)  # rank 0 verified this file
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.progress = Progress(**payload["progress"])
        states = payload["rng"]
        if len(states) == self.dist.world_size:
            self._set_rng(states[self.dist.rank])
        if self.dist.is_main:
            for line in problems:
                print(f"warning: {line}; resuming from {path.name} instead", flush=True)
            if path.name != checkpoint.LAST and (self.checkpoints / checkpoint.LAST).exists():
                # keep the rejected file for inspection, out of the rotation (it must never become prev.pt)
                os.replace(self.checkpoints / checkpoint.LAST, self.checkpoints / "last.pt.rejected")
            if len(states) != self.dist.world_size:
                print(
                    f"warning: {path} was written by {len(states)} rank(s), this run has {self.dist.world_size}: "
                    f"weights and schedule continue exactly, random augmentation streams start afresh",
                    flush=True,
                )
        return path

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "augment": self.gen.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng(self, state: dict) -> None:
        torch.set_rng_state(state["torch"].cpu())
        self.gen.set_state(state["augment"].cpu())
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)

    def save(self, is_best: bool = False) -> None:
        """Every rank hands its random state to rank 0, which writes last.pt (and best.pt)."""
        self._check_finite()
        states = self.dist.gather({k: v.cpu() for k, v in self._rng_state().items()})
        self._fold()
        sums = self.dist.all_reduce_sum(self.sums.clone()).tolist()
        if not self.dist.is_main:
            return
        self.progress.sums = sums
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "rng": states,
            "config": config.to_dict(self.cfg),
            "classes": list(self.data.classes),
            "preprocess": {
                "image_size": self.data.train.images.shape[-1],
                "mean": list(data.CIFAR10_MEAN),
                "std": list(data.CIFAR10_STD),
            },
        }
        self.writer.save(self.checkpoints, payload, is_best)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to `train.epochs`; the last checkpoint is on disk when this returns or raises."""
        try:
            code = self._fit()
        except BaseException:
            self.writer.wait(raise_error=False)  # a write in flight holds a good state: let it land
            raise
        self.writer.wait()
        return code

    def _fit(self) -> int:
        cfg, p = self.cfg, self.progress
        if self.dist.is_main:
            (cfg.run_dir).mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(cfg.run_dir / "config.yaml", data=config.dump(cfg).encode())
        if self.resumed_from is not None:
            self.logger.info(f"resumed from {self.resumed_from} at epoch {p.epoch} step {p.step}")
        if p.epoch >= cfg.train.epochs and p.batch == 0:
            self.logger.info(
                f"{cfg.run_dir} already finished {p.epoch} epochs (best test_acc {max(p.best_acc, 0):.4f}); "
                f"nothing to do. Raise train.epochs to train on, or choose another log.run_dir"
            )
            return EXIT_OK
        self.logger.info(
            f"training {cfg.model.name} on {cfg.data.name} ({len(self.data.train)} train / {len(self.data.test)} test images) "
            f"on {self.dist.world_size} x {self.device} for {cfg.train.epochs} epochs of {self.steps_per_epoch} steps; "
            f"run folder {cfg.run_dir}"
        )
        if self.dist.world_size > self.dist.launch.local_world_size:  # several nodes: say where each rank talks
            where = self.dist.gather(f"{socket.gethostname()} {self.dist.interface} {distributed.ipv4_of(self.dist.interface)}")
            self.logger.info("network: " + ", ".join(f"rank {r} {w}" for r, w in enumerate(where or [])))
        while p.epoch < cfg.train.epochs:
            if self.train_one_epoch():
                self.save()
                self.writer.wait()
                self.logger.info(
                    f"stopped by signal at epoch {p.epoch} step {p.step}; saved {self.checkpoints / checkpoint.LAST}. "
                    f"Rerun the same command to continue"
                )
                return EXIT_STOPPED
            test = evaluate(
                self.model,
                data.eval_loader(self.data.test, 2 * self.batch, self.dist.rank, self.dist.world_size),
                self.preprocess,
                self.dist,
                self.num_classes,
                self.amp,
            )
            loss_sum, correct, n = self.dist.all_reduce_sum(self.sums.clone()).tolist()
            p.epoch += 1
            metrics = {
                "epoch": p.epoch,
                "step": p.step,
                "train_loss": loss_sum / n,
                "train_acc": correct / n,
                "test_loss": test["loss"],
                "test_acc": test["acc"],
                "test_count": test["count"],
                "lr": self.scheduler.get_last_lr()[0],
                "images_per_s": n / max(p.seconds, 1e-9),
            }
            is_best = test["acc"] > p.best_acc
            p.best_acc = max(p.best_acc, test["acc"])
            p.batch, p.seconds = 0, 0.0
            self.sums.zero_()
            self.logger.epoch(metrics)
            self.save(is_best)
            if self.dist.any(self.stop.requested):
                self.writer.wait()
                self.logger.info(f"stopped by signal after epoch {p.epoch}; rerun the same command to continue")
                return EXIT_STOPPED
        self.writer.wait()
        self.logger.hparams(
            config.flatten(cfg), {"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"], "best_test_acc": p.best_acc}
        )
        self.logger.info(
            f"done: test_acc {metrics['test_acc']:.4f} (best {p.best_acc:.4f}); "
            f"checkpoints in {self.checkpoints}, TensorBoard: tensorboard --logdir {cfg.run_dir / 'tb'}"
        )
        return EXIT_OK

    def train_one_epoch(self) -> bool:
        """Train to the end of the epoch; True when a stop signal ended it early (at a step boundary)."""
        p, cfg = self.progress, self.cfg
        loader = data.train_loader(
            self.data.train,
            self.batch,
            self.dist.rank,
            self.dist.world_size,
            cfg.train.seed,
            p.epoch,
            start_batch=p.batch,
            workers=cfg.data.workers,
        )
        self.net.train()
        start = self._tick = time.perf_counter()
        try:
            for images, labels in loader:
                self._run_batch(images, labels)
                p.batch += 1
                p.step += 1
                if self.window == len(self.losses) or p.batch == self.steps_per_epoch:
                    self._log_window()
                periodic = cfg.train.save_every_steps and p.step % cfg.train.save_every_steps == 0
                if periodic and p.batch < self.steps_per_epoch:  # the last batch's save follows evaluation
                    p.seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save()
                self.logger.progress(p.epoch + 1, p.batch, self.steps_per_epoch)
                if self.dist.any(self.stop.requested):
                    return True
        finally:
            p.seconds += time.perf_counter() - start
        return False

    def _run_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        x = self.preprocess.train(images, self.gen)  # (B, 3, H, W) float, normalised, augmented
        y = labels.to(self.device, non_blocking=True)
        if self.progress.step == 0:
            self.logger.images(x, data.CIFAR10_MEAN, data.CIFAR10_STD)
            self.logger.graph(self.model, x)
        with autocast(self.device, self.amp):
            out = self.net(x)
            loss = self.criterion(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler is a pass-through unless train.amp=fp16
        faults.point("step", f"(step {self.progress.step + 1})")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.losses[self.window] = loss.detach()
        self.correct[self.window] = (out.argmax(1) == y).sum()
        self.window += 1

    def _fold(self) -> None:
        """Add the steps since the last fold to this epoch's sums (loss, correct, images): no host sync."""
        new = slice(self.folded, self.window)
        if new.start < new.stop:
            self.sums[0] += self.losses[new].double().sum() * self.batch  # every training batch is full
            self.sums[1] += self.correct[new].sum()
            self.sums[2] += (new.stop - new.start) * self.batch
            self.folded = self.window

    def _check_finite(self) -> None:
        """Stop, naming the step, if any rank saw a non-finite loss since the last check (a sync point)."""
        values = self.losses[: self.window]
        bad = ~torch.isfinite(values)
        local = bool(bad.any())
        if not self.dist.any(local):
            return
        p = self.progress
        first = p.step - self.window + 1 + int(bad.nonzero()[0]) if local else p.step
        kind = f"{values[bad][0].item()}" if local else "non-finite"
        self.writer.wait(raise_error=False)  # the checkpoint named below is the last one that reached the disk
        last = self.checkpoints / checkpoint.LAST
        saved = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved"
        raise NonFiniteLoss(
            f"loss became {kind} at step {first} (epoch {p.epoch + 1}); stopped without saving, {saved}. "
            f"Lower optim.lr (now {self.cfg.optim.lr}) or check the data"
        )

    def _log_window(self) -> None:
        self._check_finite()
        self.writer.check()  # a background write that failed stops the run here
        now = time.perf_counter()
        p = self.progress
        mean_loss = self.losses[: self.window].mean().item()
        images = self.window * self.batch * self.dist.world_size
        self.logger.step(
            p.epoch + 1,
            p.batch,
            self.steps_per_epoch,
            p.step,
            mean_loss,
            self.scheduler.get_last_lr()[0],
            images / max(now - self._tick, 1e-9),
        )
        self._tick = now
        self._fold()
        self.window = self.folded = 0
