"""The checkpoint contract: what a checkpoint holds, how it is built from a run, checked, found and restored.

`<run>/checkpoints/` holds `last.pt` (the resume contract: the trainer writes it and always
looks for it first), `prev.pt` (the `last.pt` before it, so that a damaged `last.pt` never costs
the run) and `best.pt` (the best test accuracy so far: a copy, not a link, so that writing over one
never changes another); `Cadence` says when the trainer saves. A checkpoint is one dict, written with
`torch.save` through `train/atomic.py` (never half written, with a digest) and loaded with
`weights_only=True` (no code runs from the file):

    format      FORMAT; a reader refuses a newer format in one line and upgrades an older one
    model       the unwrapped model's state_dict, no `module.` or `_orig_mod.`: the seed's
                `model.load_state_dict(torch.load(path)["model"])` works
    optimizer, scheduler, scaler
                their state_dicts
    progress    `Progress`: epochs done, steps taken, the step within the epoch, best accuracy,
                this epoch's partial sums
    rng         {"scheme": randomness.SCHEME}: every draw is a function of (train.seed, epoch,
                image index), so there is no state to save, on any world size; format 1 (and
                early format 2) held one dict of generator states per rank
    config      the resolved config as plain dicts: resume compares it, inference rebuilds from it
    classes     class names in label order
    data        what it was trained on: classes, train and test sizes, a digest of the labels
                (data.Datasets.identity); a resume on other data is refused (format-1 files lack it)
    preprocess  what inference does to an image before the model: `image_size`, `mean`, `std` (in
                ToTensor()'s [0, 1] units; 0 and 1 for data.normalize=none) and `torchvision`,
                the same as torchvision code: `transforms.Compose([transforms.Resize((32, 32)),
                transforms.ToTensor()])(Image.open(path).convert('RGB'))`, plus a Normalize when
                the run normalised
    versions    python, torch, torchvision and cifar-scaffold that wrote it
    digest      SHA-256 of all of the above

The engine asks this module to build, resume and save; it does not know the layout, and
neither does `infer/` (it reads `contents()`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from train import atomic, config, randomness
from train.cli import UserError
from train.data import CIFAR10_MEAN, NORMALISATIONS
from train.distributed import Dist
from train.optimizer import replan

LAST, PREV, BEST = "last.pt", "prev.pt", "best.pt"
REJECTED = "last.pt.rejected"  # a last.pt that could not be resumed from, kept for inspection
# 2: progress.batch renamed step_in_epoch; rng holds the scheme, not per-rank states. Bump when the layout changes;
# teach _upgrade the old one
FORMAT = 2
PER_RANK_STREAMS = "per-rank generator states"  # the rng scheme of format 1 files


class CheckpointError(UserError):
    pass


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    step_in_epoch: int = 0  # steps done in the current epoch (0: at an epoch boundary)
    best_acc: float = -1.0
    sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # this epoch so far: loss x n, correct, n (all ranks)
    seconds: float = 0.0  # training time of this epoch so far

    def where(self, steps_per_epoch: int, back: int = 0) -> str:
        """How every line names a step, 1-based like the progress lines: `epoch 2 step 4/16 (global step 20)`.

        The step named is the last one done (`back` steps before it); at an epoch boundary, the
        last step of the epoch just finished.
        """
        epoch, in_epoch = self.epoch + 1, self.step_in_epoch
        if in_epoch == 0 and self.epoch:
            epoch, in_epoch = self.epoch, steps_per_epoch
        return f"epoch {epoch} step {in_epoch - back}/{steps_per_epoch} (global step {self.step - back})"


@dataclass
class TrainState:
    """The live objects of a run that a checkpoint saves and restores."""

    model: nn.Module  # unwrapped: what `model` in the checkpoint holds
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def versions() -> dict[str, str]:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": version("torchvision"),
        "cifar-scaffold": version("cifar-scaffold"),
    }


def build(
    state: TrainState, progress: Progress, cfg: config.Config, classes: list[str], preprocess: dict, data: dict | None = None
) -> dict:
    """The checkpoint of a run (rank 0's objects: every rank holds the same); `data` is the training data's identity
    (data.Datasets.identity)."""
    return {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "progress": asdict(progress),
        "rng": {"scheme": randomness.SCHEME},
        "config": config.to_dict(cfg),
        "classes": list(classes),
        "preprocess": dict(preprocess),
        "data": data,
    }


def check_fits(payload: dict, model: nn.Module, cfg: config.Config, data: dict | None = None) -> None:
    """Raise CheckpointError when a loadable checkpoint does not belong to this run (its model, config or `data`)."""
    state = payload["model"]
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        theirs = payload.get("config", {}).get("model", {}).get("name", "unknown")
        raise CheckpointError(f"checkpoint holds another model (model.name={theirs}, different layers)")
    try:
        old = config.from_dict(payload["config"])
    except UserError as e:
        raise CheckpointError(f"checkpoint config is not readable ({e})") from None
    changed = {k: v for k, v in config.differences(old, cfg).items() if k not in config.RESUMABLE_CHANGES and k != "log.run_dir"}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:3])
        raise CheckpointError(f"checkpoint was written with a different config ({diff})")
    saved = payload.get("data")
    if data is not None and saved is not None and saved != data:
        raise CheckpointError(
            f"checkpoint was trained on other data ({_data_difference(saved, data)}); point data.root at its data"
        )


def _data_difference(saved: dict, now: dict) -> str:
    if saved.get("classes") != now["classes"]:
        return f"classes {', '.join(map(str, saved.get('classes', [])[:4]))}, ...; here {', '.join(now['classes'][:4])}, ..."
    if (saved.get("train"), saved.get("test")) != (now["train"], now["test"]):
        return f"{saved.get('train')} train / {saved.get('test')} test images; here {now['train']} / {now['test']}"
    return "the same classes and sizes, but other labels"


def restore(payload: dict, state: TrainState) -> Progress:
    """Load a checkpoint into the live objects: on any world size, all there is to continue exactly."""
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler"):
        state.scaler.load_state_dict(payload["scaler"])
    return Progress(**payload["progress"])


def find_resumable(folder: Path, fits) -> tuple[Path | None, list[str]]:
    """The newest good checkpoint among last.pt and prev.pt, and one line per file that was rejected.

    `fits(payload)` raises CheckpointError when a loadable file still does not fit this run
    (another architecture, say).
    """
    problems = []
    for name in (LAST, PREV):
        path = folder / name
        if not path.exists():
            continue
        try:
            fits(load(path))
            return path, problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems


def resume(
    state: TrainState, folder: Path, cfg: config.Config, dist: Dist, data: dict | None = None
) -> tuple[Progress, Path | None, list[str]]:
    """Restore the newest good checkpoint of `folder` (rank 0 chooses, every rank loads it) trained on `data`.

    Returns the progress, the file resumed from (None: a fresh start) and warning lines for rank 0.
    """
    path, problems = None, []
    if dist.is_main and folder.is_dir():
        atomic.remove_temporary(folder)  # left by a process killed while saving
        path, problems = find_resumable(folder, lambda payload: check_fits(payload, state.model, cfg, data))
    path, problems = dist.broadcast((path, problems))
    if path is None:
        if problems:
            raise UserError(
                f"cannot resume from {folder}: {'; '.join(dict.fromkeys(problems))}. "
                f"Rerun with the run's own config, choose another log.run_dir, or move {folder} away to start over"
            )
        return Progress(), None, []
    payload = load(path, map_location=dist.device, verify=False)  # rank 0 verified this file
    progress = restore(payload, state)
    notes = [f"{line}; resuming from {path.name} instead" for line in problems]
    if payload.get("data") is None:
        notes.append(f"{path} does not record the data it was trained on (an older checkpoint): data.root is not checked")
    old_epochs = payload["config"]["train"]["epochs"]
    notes.append(replan(state.optimizer, state.scheduler, old_epochs, cfg.train.epochs, cfg.optim.schedule, progress.step))
    if dist.is_main and path.name != LAST and (folder / LAST).exists():
        os.replace(folder / LAST, folder / REJECTED)  # out of the rotation: it must never become prev.pt
    scheme = payload["rng"].get("scheme") if isinstance(payload.get("rng"), dict) else None
    if scheme != randomness.SCHEME:
        # the file's text, shown: one line (a crafted newline must not forge an `error:` line), kept short
        scheme = " ".join("".join(c if c.isprintable() else " " for c in str(scheme or "")).split())[:80] or "an unknown scheme"
        notes.append(
            f"{path} was written with random draws from {scheme}, this version keys them per "
            f"image ({randomness.SCHEME}): weights, optimizer, schedule and data order continue exactly; "
            f"the augmentation and dropout drawn from here on differ from what that version would have drawn"
        )
    return progress, path, [line for line in notes if line]


def _stamped(payload: dict) -> dict:
    payload = dict(payload, format=FORMAT, versions=versions())
    payload["digest"] = atomic.digest(payload)
    return payload


def _write_error(folder: Path, e: OSError, kept: str) -> CheckpointError:
    return CheckpointError(
        f"could not write checkpoint in {folder} ({e.strerror or e}); the previous {kept} is untouched. "
        f"Free space there (or fix permissions) and rerun the same command to resume"
    )


def _best_error(folder: Path, e: OSError) -> CheckpointError:
    """last.pt was written and is the best so far: a rerun resumes after it and would not write best.pt again."""
    fix = f"move the folder {folder / BEST} away" if isinstance(e, IsADirectoryError) else "free space (or fix permissions)"
    return CheckpointError(
        f"could not write {folder / BEST} ({e.strerror or e}); {folder / LAST}, the best model so far, was saved. "
        f"To keep it as best.pt, {fix}, copy last.pt to best.pt, and rerun the same command to resume"
    )


def save(folder: Path, payload: dict, is_best: bool) -> Path:
    """Write `payload` as last.pt (keeping the previous last.pt as prev.pt) and as best.pt when `is_best`."""
    payload = _stamped(payload)
    last = folder / LAST
    try:
        if last.exists():
            # prev.pt becomes the current last.pt by a hard link (no copy): last.pt always exists
            atomic.link_atomic(last, folder / PREV)
        atomic.write_atomic(last, payload=payload)
    except OSError as e:
        raise _write_error(folder, e, LAST) from None
    if is_best:  # its own try: a failure here leaves the new last.pt in place, and the message says so
        try:
            atomic.copy_atomic(last, folder / BEST)  # its own file; a kernel copy, 0.3x the time of a second torch.save
        except OSError as e:
            raise _best_error(folder, e) from None
    return last


def save_best(folder: Path, payload: dict) -> None:
    """Write a held best checkpoint (an earlier state than last.pt's) as best.pt."""
    try:
        atomic.write_atomic(folder / BEST, payload=_stamped(payload))
    except OSError as e:
        raise _write_error(folder, e, BEST) from None


class Saver:
    """Saves the checkpoints of one folder one at a time, in the caller's thread or on a thread of its own.

    In the background, `save` takes a snapshot in host memory and returns while the file is
    written; the next `save` and `wait` first let that write finish, and `wait` (or `check`, once
    it has finished) raises its error in the caller's thread.

    A new best that the cadence does not save at once is held (`hold_best`: a copy where the
    model lives; on a GPU, one more model and optimizer state in its memory) and written as
    best.pt by the next save, or by `flush_best` when a run ends without one: best.pt may lag,
    the best model is not lost. Killed before that, a rerun redoes those epochs from last.pt
    exactly and finds the same best again. `blocked` counts the seconds the training thread spent
    on saving: snapshots, waits for a write in flight, writes in its own thread; `last_write_s`
    how long the last finished write took, wherever it ran (what a stop signal's save needs).
    """

    def __init__(self, folder: Path, background: bool):
        self.folder, self.background = folder, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._best: dict | None = None  # a held best, a snapshot
        self.blocked = 0.0
        self.last_write_s: float | None = None

    def save(self, payload: dict, is_best: bool, hold: bool = False) -> None:
        """Write last.pt (and best.pt); with `hold`, keep `payload` as a held best instead."""
        if hold:
            self.hold_best(payload)
            return
        start = time.perf_counter()
        try:
            self._join()
            held, self._best = (None if is_best else self._best), None
            if not self.background:
                self._write(held, payload, is_best)
                return
            frozen = atomic.snapshot(payload)
            self._thread = threading.Thread(target=self._write_reporting, args=(held, frozen, is_best), name="checkpoint-writer")
            self._thread.start()
        finally:
            self.blocked += time.perf_counter() - start

    def _write(self, held: dict | None, payload: dict, is_best: bool) -> None:
        start = time.perf_counter()
        if held is not None:
            save_best(self.folder, held)
        save(self.folder, payload, is_best)
        self.last_write_s = time.perf_counter() - start

    def _write_reporting(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def hold_best(self, payload: dict) -> None:
        start = time.perf_counter()
        self._best = atomic.snapshot(payload, on_device=True)  # the write, later, copies it to host memory
        self.blocked += time.perf_counter() - start

    def flush_best(self) -> None:
        """Write a held best now: the run ends without another save (an error, a non-finite loss). A write
        that fails here goes unreported: the error that ended the run is the one to tell."""
        self.wait(raise_error=False)
        held, self._best = self._best, None
        if held is not None:
            with contextlib.suppress(CheckpointError):
                save_best(self.folder, held)

    def check(self) -> None:
        """Raise the error of a background write that has ended; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self._join()

    def wait(self, raise_error: bool = True) -> None:
        """Until the write in flight is on disk; then raise its error (unless `raise_error` is False)."""
        start = time.perf_counter()
        try:
            self._join(raise_error)
        finally:
            self.blocked += time.perf_counter() - start

    def _join(self, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def load(path: Path, map_location="cpu", verify: bool = True) -> dict:
    """A checkpoint of this project, read with weights_only=True (no code runs from the file), digest and format checked."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickle protocols; the refusal below says it all
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects, not only tensors; refusing to run code from it"
            ) from None
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint ({first[:200]})") from None
    if not is_checkpoint(payload):
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' and 'digest' entries)")
    if verify:
        check_digest(payload, path)
    return _upgrade(payload, path)


def is_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "model" in obj and "digest" in obj


def check_digest(payload: dict, path: Path) -> None:
    """Raise CheckpointError when a loaded checkpoint's contents do not match the digest written with it."""
    if atomic.digest(payload) != payload["digest"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the digest written with it")


def _upgrade(payload: dict, path: Path) -> dict:
    """The payload in this version's layout; a format newer than this code is refused."""
    found = payload.get("format")
    if not isinstance(found, int) or found > FORMAT:
        wrote = payload["versions"].get("cifar-scaffold", "?") if isinstance(payload.get("versions"), dict) else "?"
        raise CheckpointError(
            f"checkpoint {path} has format {found!r}, written by cifar-scaffold {wrote}; this version "
            f"reads formats up to {FORMAT}: update the project to load it"
        )
    data_cfg = payload.get("config", {}).get("data") if isinstance(payload.get("config"), dict) else None
    if isinstance(data_cfg, dict) and "normalize" not in data_cfg:  # written before data.normalize: it says it in preprocess
        mean = tuple(payload.get("preprocess", {}).get("mean", CIFAR10_MEAN))
        name = next((k for k, (m, _) in NORMALISATIONS.items() if tuple(m) == mean), "cifar10")
        payload = dict(payload, config=dict(payload["config"], data=dict(data_cfg, normalize=name)))
    if found == 1 and isinstance(payload.get("progress"), dict):  # 1 -> 2: the position in the epoch was `batch`
        progress = dict(payload["progress"])
        progress["step_in_epoch"] = progress.pop("batch", 0)
        payload = dict(payload, progress=progress, format=FORMAT)
    if isinstance(payload.get("rng"), list):  # format 1 and early format 2: one dict of generator states per rank
        payload = dict(payload, rng={"scheme": PER_RANK_STREAMS})
    return payload


@dataclass(frozen=True)
class Contents:
    """What inference reads from a checkpoint."""

    model: dict  # the state_dict
    config: config.Config
    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    epoch: int  # completed training epochs
    step: int  # optimizer steps taken: TensorBoard's x-axis


def contents(payload: dict, path: Path) -> Contents:
    """The model, config, classes and preprocessing of a loaded checkpoint, checked; CheckpointError otherwise."""
    check_digest(payload, path)
    payload = _upgrade(payload, path)
    try:
        prep = payload["preprocess"]
        return Contents(
            payload["model"],
            config.from_dict(payload["config"]),
            list(payload["classes"]),
            int(prep["image_size"]),
            tuple(prep["mean"]),
            tuple(prep["std"]),
            int(payload.get("progress", {}).get("epoch", 0)),
            int(payload.get("progress", {}).get("step", 0)),
        )
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise CheckpointError(f"checkpoint {path} lacks a config, classes or preprocess this version can read ({e})") from None


class Cadence:
    """When last.pt is written besides the end of a run and a stop signal: `train.save_every_minutes`,
    `save_every_steps` and `save_every_epochs`, whichever comes due first.

    The clock is read only where all ranks are anyway in step (a log line, an epoch's end) and
    agreed on with one collective, so that every rank saves at the same step.
    """

    def __init__(self, cfg: config.TrainConfig, dist: Dist):
        self.minutes, self.steps, self.epochs = cfg.save_every_minutes, cfg.save_every_steps, cfg.save_every_epochs
        self.dist = dist
        self.since = time.monotonic()  # the last save, or the start of this process

    def saved(self) -> None:
        self.since = time.monotonic()

    def _clock(self) -> bool:
        return self.minutes > 0 and self.dist.any(time.monotonic() - self.since >= 60 * self.minutes)

    def in_epoch(self, step: int, logged: bool) -> bool:
        """At a step boundary inside an epoch; `logged`: a log line was just written (on every rank)."""
        return bool(self.steps and step % self.steps == 0) or (logged and self._clock())

    def epoch_end(self, epoch: int, step: int) -> bool:
        """After the evaluation of `epoch` (1-based), `step` steps in all."""
        return bool(self.steps and step % self.steps == 0) or bool(self.epochs and epoch % self.epochs == 0) or self._clock()
