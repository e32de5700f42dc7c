"""What `best.pt` as a file of its own costs: a second torch.save against copying `last.pt`.

    python bench/checkpoint_copy.py [--folder DIR] [--rounds 5]

A VGG16-sized checkpoint (its weights and as much again for SGD momentum, 1.1 GB) is written
with torch.save and fsync, then copied with os.copy_file_range (inside the kernel, what
train/atomic.py's copy_atomic does) and with shutil.copyfile, each fsync'ed. Medians over rounds.
Run it on the disk your run folders live on: the numbers are the disk's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(payload: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def copy_file_range(src: Path, dst: Path) -> None:
    with open(src, "rb") as a, open(dst, "wb") as b:
        size, done = os.fstat(a.fileno()).st_size, 0
        while done < size:
            done += os.copy_file_range(a.fileno(), b.fileno(), size - done, done, done)
        b.flush()
        os.fsync(b.fileno())


def copyfile(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fsync(dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("."), help="where to write (default: here)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    state = torchvision.models.vgg16().state_dict()
    payload = {"model": state, "optimizer": {k: v.clone() for k, v in state.items()}}
    times: dict[str, list[float]] = {"torch.save": [], "os.copy_file_range": [], "shutil.copyfile": []}
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        last, best = Path(tmp) / "last.pt", Path(tmp) / "best.pt"
        for _ in range(args.rounds):
            for name, write in (
                ("torch.save", lambda: save(payload, last)),
                ("os.copy_file_range", lambda: copy_file_range(last, best)),
                ("shutil.copyfile", lambda: copyfile(last, best)),
            ):
                best.unlink(missing_ok=True)
                start = time.perf_counter()
                write()
                times[name].append(time.perf_counter() - start)
        size = last.stat().st_size
    print(f"checkpoint {size / 1e9:.2f} GB, {args.rounds} rounds, medians:")
    for name, values in times.items():
        print(f"  {name:20s} {statistics.median(values):.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
