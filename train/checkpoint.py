"""Checkpoints: atomic writes, a content digest, safe loading, and the one resume file.

Layout in `<run>/checkpoints/`: `last.pt` (the resume contract: the trainer writes it and
always looks for it), `prev.pt` (the `last.pt` before it, kept so that a damaged `last.pt`
never costs the run) and `best.pt` (best test accuracy so far). A write goes to a temporary
file, is fsync'ed and renamed over the target, so a reader never sees half a file and a
crash or full disk leaves the previous file whole. Every file carries a SHA-256 digest of
its contents, so a silent bit flip is found on loading instead of being trained on.

`Writer` writes either in the caller's thread or, for GPU training, on a thread of its own: the
trainer hands over a CPU copy of its state and goes on (writing VGG16's 1 GB of weights and
momentum took longer than one of its CIFAR-10 epochs on an H200).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from train import faults
from train.errors import UserError

LAST, PREV, BEST = "last.pt", "prev.pt", "best.pt"
FORMAT = 1  # bumped when the layout of the dict changes


class CheckpointError(UserError):
    pass


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


def _feed(h, obj) -> None:
    """Hash a nested checkpoint structure in a fixed order: tensors by their bytes, the rest by repr."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())  # the tensor's own bytes, not a copy of them
    elif isinstance(obj, dict):
        h.update(b"D")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L" if isinstance(obj, list) else b"U")
        for v in obj:
            _feed(h, v)
    else:
        h.update(repr(obj).encode())


def digest(payload: dict) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | None = None, payload: dict | None = None) -> None:
    """Write bytes (or torch.save a payload) to `path` atomically; on any failure remove the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if payload is not None and faults.armed("ckpt_write"):
                buf = io.BytesIO()
                torch.save(payload, buf)
                half = buf.tell() // 2
                f.write(buf.getvalue()[:half])
                f.flush()
                faults.point("ckpt_write", f"({tmp} holds {half} of {buf.tell()} bytes)")
                f.write(buf.getvalue()[half:])
            elif payload is not None:
                _save_reporting_os_errors(payload, f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if payload is not None:
            faults.point("ckpt_rename", f"({tmp} complete, {path.name} not replaced)")
        os.replace(tmp, path)
        if payload is not None:
            faults.point("ckpt_renamed", f"({path} replaced)")
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_reporting_os_errors(payload: dict, f) -> None:
    """torch.save into `f`; a failed write (no space, file too large) raises its OSError, not torch's
    "unexpected pos" RuntimeError, so that the message can say what happened."""
    failures: list[OSError] = []

    class Recorder:
        def write(self, chunk):
            try:
                return f.write(chunk)
            except OSError as e:
                failures.append(e)
                raise

        def flush(self):
            f.flush()

    try:
        torch.save(payload, Recorder())
    except RuntimeError:
        if failures:
            raise failures[0] from None
        raise


def remove_temporary(folder: Path) -> None:
    """Delete temporary files that a killed writer left behind (they are never read)."""
    for stale in list(folder.glob(".*.tmp.*")) + list(folder.glob(".*.link.*")):
        stale.unlink(missing_ok=True)


def save(folder: Path, payload: dict, is_best: bool) -> Path:
    """Write `payload` as last.pt (keeping the previous last.pt as prev.pt) and as best.pt when `is_best`."""
    payload = dict(payload, format=FORMAT, versions=versions())
    payload["digest"] = digest(payload)
    last = folder / LAST
    try:
        if last.exists():
            # prev.pt becomes the current last.pt by a hard link (no copy): last.pt always exists
            _link_atomic(last, folder / PREV)
        write_atomic(last, payload=payload)
        if is_best:
            _link_atomic(last, folder / BEST)
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint in {folder} ({e.strerror or e}); the previous {LAST} is untouched. "
            f"Free space there (or fix permissions) and rerun the same command to resume"
        ) from None
    return last


def snapshot(obj):
    """A copy of a checkpoint payload that training can no longer change: every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj  # numbers, strings, None: immutable


class Writer:
    """Writes checkpoints one at a time, in the caller's thread or (`background=True`) on a thread of its own.

    In the background, `save` takes a CPU snapshot and returns while the file is written; the next
    `save` and `wait` first let that write finish, and `wait` (or `check`, once it has finished)
    raises its error in the caller's thread.
    """

    def __init__(self, background: bool):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, folder: Path, payload: dict, is_best: bool) -> None:
        self.wait()
        if not self.background:
            save(folder, payload, is_best)
            return
        frozen = snapshot(payload)

        def write():
            try:
                save(folder, frozen, is_best)
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def check(self) -> None:
        """Raise the error of a background write that has ended; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self, raise_error: bool = True) -> None:
        """Until the write in flight is on disk; then raise its error (unless `raise_error` is False)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def _link_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.link.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a filesystem without hard links: copy the bytes instead
        write_atomic(tmp, data=src.read_bytes())
    os.replace(tmp, dst)


def load(path: Path, map_location="cpu", verify: bool = True) -> dict:
    """Load a checkpoint with weights_only=True (no code runs from the file) and check its digest."""
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
    if not isinstance(payload, dict) or "model" not in payload or "digest" not in payload:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' and 'digest' entries)")
    if verify:
        check_digest(payload, path)
    return payload


def check_digest(payload: dict, path: Path) -> None:
    """Raise CheckpointError when a loaded checkpoint's contents do not match the digest written with it."""
    if digest(payload) != payload["digest"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the digest written with it")


def find_resumable(folder: Path, check) -> tuple[Path | None, list[str]]:
    """The newest good checkpoint among last.pt and prev.pt, and one line per file that was rejected.

    `check(payload)` raises CheckpointError when a loadable file still does not fit this run
    (another architecture, say).
    """
    problems = []
    for name in (LAST, PREV):
        path = folder / name
        if not path.exists():
            continue
        try:
            check(load(path))
            return path, problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems
