"""What keyed random draws and the bitwise mode cost: the trainer's loop with crop + flip, before and after.

    python bench/augment.py --rounds 5                          # this tree: fast and bitwise mode
    python bench/augment.py --rounds 5 --baseline /tmp/base     # and a checkout of another commit, e.g.
                                                                # git archive 237ab12 | tar -x -C /tmp/base

Each variant runs in a fresh process per round (a different commit cannot share a process), the
variants interleaved round by round so that the machine's drift hits them alike; the table shows
medians over rounds, in images per second:

  limit     forward, backward and optimizer step on a batch already in memory, normalised: the
            model's own limit at the trainer's thread count
  trainer   `Trainer.train_one_epoch` at the defaults (crop + flip, log line every 50 steps, no
            save) on synthetic data held as uint8 tensors: the data path, augmentation and step
  augment   `Preprocess.train` alone on a batch of 128: the augmentation and normalisation

trainer/limit near 1 means the data path and the augmentation cost nothing. The bitwise rows
run train.reproducible=bitwise: with its default of one CPU thread per rank, and with
train.threads set to all cores (bit-identical only between runs with the same threads per rank).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 40  # training steps per measured epoch


def worker(overrides: list[str]) -> dict:
    """One round of one variant, in this process: images/s of the limit, the trainer's epoch, the augmentation."""
    import torch
    from torch import nn

    from train import config, engine, models, runtime
    from train.distributed import Dist, Launch
    from train.optimizer import make_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.from_files_and_overrides(
            None,
            [
                "data.name=synthetic",
                f"data.synthetic_train={128 * STEPS}",
                "data.synthetic_test=128",
                "train.device=cpu",
                "log.tensorboard=false",
                "log.progress=none",
                f"log.run_dir={tmp}/run",
                *overrides,
            ],
        )
        chosen, _ = runtime.resolve(cfg, Launch("single"))
        torch.set_num_threads(chosen.threads)
        device = torch.device("cpu")
        trainer = engine.Trainer(cfg, chosen, Dist(Launch("single"), device, None), stop=_NeverStop())
        trainer.train_one_epoch()  # warm-up
        trainer.progress.epoch, trainer.progress.step_in_epoch = 1, 0
        start = time.perf_counter()
        trainer.train_one_epoch()
        trainer_rate = STEPS * 128 / (time.perf_counter() - start)

        torch.manual_seed(0)
        model = models.build(cfg.model, 10).to(memory_format=torch.channels_last)
        opt = make_optimizer(cfg.optim, model.parameters())
        x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))

        def limit_step():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        limit_rate = 128 * STEPS / _timed(limit_step, STEPS)
        images = trainer.data.train.images[:128]
        preprocess = trainer.preprocess
        if importlib.util.find_spec("train.randomness"):  # keyed draws: the batch's bits from the epoch's table
            draws = trainer.keys.draws(torch.arange(128))
            augment_step = lambda: preprocess.train(images, draws)  # noqa: E731
        else:  # before: a generator per rank
            gen = torch.Generator().manual_seed(0)
            augment_step = lambda: preprocess.train(images, gen)  # noqa: E731
        augment_rate = 128 * 200 / _timed(augment_step, 200)
    return {"limit": limit_rate, "trainer": trainer_rate, "augment": augment_rate, "threads": chosen.threads}


def _timed(fn, n: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


class _NeverStop:
    requested = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit of this project, measured as 'before'")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results_augment.json")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker)), flush=True)
        return
    cores = len(os.sched_getaffinity(0))
    variants = {"fast": (REPO, []), "bitwise": (REPO, ["train.reproducible=bitwise"])}
    variants[f"bitwise, {cores} threads"] = (REPO, ["train.reproducible=bitwise", f"train.threads={cores}"])
    if args.baseline:
        variants = {"before": (args.baseline.resolve(), []), **variants}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (tree, overrides) in variants.items():
            env = dict(os.environ, PYTHONPATH=str(tree))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *overrides]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    table = {}
    print(f"\n{'variant':24} {'threads':>7} {'limit':>8} {'trainer':>8} {'augment':>9} {'trainer/limit':>13}")
    for name, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in ("limit", "trainer", "augment")}
        med["threads"] = rounds[0]["threads"]
        med["trainer/limit"] = med["trainer"] / med["limit"]
        table[name] = med
        print(
            f"{name:24} {med['threads']:>7} {med['limit']:>8.0f} {med['trainer']:>8.0f} {med['augment']:>9.0f} "
            f"{med['trainer/limit']:>13.3f}"
        )
    machine = {"python": platform.python_version(), "cores": cores, "cpu": platform.processor() or platform.machine()}
    args.json.write_text(json.dumps({"machine": machine, "rounds": results, "medians": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
