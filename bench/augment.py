"""What keyed random draws and the bitwise mode cost: the trainer's loop with crop + flip, before and after.

    python bench/augment.py --rounds 5                          # this tree: fast and bitwise mode
    python bench/augment.py --rounds 5 --baseline /tmp/base     # and a checkout of another commit, e.g.
                                                                # git archive 237ab12 | tar -x -C /tmp/base

Each variant runs in a fresh process per round (a different commit cannot share a process), the
variants interleaved round by round so that the machine's drift hits them alike; the tables show
medians over rounds, in images per second of wall time and per second of this process's CPU
time. Every variant runs with `--threads` CPU threads (default 1: on a machine shared with other
jobs, one thread per process and CPU-time rates are what stays comparable; OpenMP threads that
wait for a core spin and distort both). The measurements:

  limit     forward, backward and optimizer step on a batch already in memory, normalised: the
            model's own limit at the trainer's thread count
  trainer   `Trainer.train_one_epoch` at the defaults (crop + flip, log line every 50 steps, no
            save) on synthetic data held as uint8 tensors: the data path, augmentation and step
  augment   `Preprocess.train` alone on a batch of 128: the augmentation and normalisation

trainer/limit near 1 means the data path and the augmentation cost nothing; bitwise/fast is
what train.reproducible=bitwise costs (one CPU thread per rank is its default on the CPU).
"""

from __future__ import annotations

import argparse
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
        trainer_rate = _rates(trainer.train_one_epoch, 1, STEPS * 128)

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

        limit_step()  # warm-up
        limit_rate = _rates(limit_step, STEPS, 128 * STEPS)
        images = trainer.data.train.images[:128]
        preprocess = trainer.preprocess
        # keyed draws: the batch's bits from the epoch's table. Asked of the trainer, not of the import system: the
        # project's editable install finds train.randomness in its own checkout for an older tree too
        keys = getattr(getattr(trainer, "step", None), "keys", None) or getattr(trainer, "keys", None)
        if keys is not None:
            draws = keys.draws(torch.arange(128))
            augment_step = lambda: preprocess.train(images, draws)  # noqa: E731
        else:  # before: a generator per rank
            gen = torch.Generator().manual_seed(0)
            augment_step = lambda: preprocess.train(images, gen)  # noqa: E731
        augment_step()
        augment_rate = _rates(augment_step, 200, 128 * 200)
    rates = {"limit": limit_rate, "trainer": trainer_rate, "augment": augment_rate}
    return {f"{name} {clock}": rate[i] for name, rate in rates.items() for i, clock in enumerate(("wall", "cpu"))}


def _rates(fn, n: int, images: int) -> tuple[float, float]:
    """Images per second of wall time and of this process's CPU time, over `n` calls of `fn`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


class _NeverStop:
    requested = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit of this project, measured as 'before'")
    parser.add_argument("--threads", type=int, default=1, help="train.threads of every variant (default 1)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results_augment.json")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker)), flush=True)
        return
    threads = f"train.threads={args.threads}"
    variants = {"fast": (REPO, [threads]), "bitwise": (REPO, [threads, "train.reproducible=bitwise"])}
    if args.baseline:
        variants = {"before": (args.baseline.resolve(), [threads]), **variants}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (tree, overrides) in variants.items():
            env = dict(os.environ, PYTHONPATH=str(tree))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *overrides]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    table: dict[str, dict] = {}
    for clock in ("wall", "cpu"):
        print(f"\nimages per second of {clock} time, {args.threads} thread(s), medians of {args.rounds} rounds")
        print(f"{'variant':10} {'limit':>8} {'trainer':>8} {'augment':>9} {'trainer/limit':>13} {'trainer/fast':>12}")
        for name, rounds in results.items():
            med = {k: statistics.median(r[f"{k} {clock}"] for r in rounds) for k in ("limit", "trainer", "augment")}
            fast = statistics.median(r[f"trainer {clock}"] for r in results["fast"])
            med |= {"trainer/limit": med["trainer"] / med["limit"], "trainer/fast": med["trainer"] / fast}
            table.setdefault(name, {})[clock] = med
            print(
                f"{name:10} {med['limit']:>8.0f} {med['trainer']:>8.0f} {med['augment']:>9.0f} "
                f"{med['trainer/limit']:>13.3f} {med['trainer/fast']:>12.3f}"
            )
    machine = {"python": platform.python_version(), "cores": len(os.sched_getaffinity(0)), "threads": args.threads}
    machine["load average at the end"] = os.getloadavg()
    args.json.write_text(json.dumps({"machine": machine, "rounds": results, "medians": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
