"""What `best.pt` as a file of its own costs: a second torch.save against copying `last.pt`.

    python bench/checkpoint_copy.py [--folder DIR] [--rounds 5]

A VGG16-sized checkpoint (its weights and as much again for SGD momentum, 1.1 GB) is written
the way the trainer writes last.pt (train/atomic.py's write_atomic: torch.save, fsync, rename),
then copied the way it writes best.pt (copy_atomic: os.copy_file_range inside the kernel, fsync,
rename) and, for comparison, with shutil.copyfile and fsync. Medians over rounds.
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

import torchvision

from train import atomic


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                ("torch.save", lambda: atomic.write_atomic(last, payload=payload)),
                ("os.copy_file_range", lambda: atomic.copy_atomic(last, best)),
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
