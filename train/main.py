"""Train an image classifier: one process, torchrun, srun, or the launcher's job, one code path.

    python train/main.py [--config FILE] [section.key=value ...]
    torchrun --nproc_per_node=4 train/main.py --config configs/cifar10_cnn.yaml
    srun python train/main.py --config configs/cifar10_cnn.yaml

Rerunning the same command resumes from <run>/checkpoints/last.pt. Exit codes: 0 done,
2 bad input (one line on stderr), 3 the loss became non-finite, 75 stopped by a signal
after saving (rerun to continue).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Iterable

# Only the config is imported up front: a typo is reported in a fraction of a second, before
# torch loads (about 2 s); run() imports the rest.
from train import config
from train.errors import UserError


class StopFlag:
    """Set by the configured signals; the loop reads it at step boundaries and all ranks agree on it."""

    def __init__(self, names: Iterable[str] = ()):
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self.listen(names)

    def listen(self, names: Iterable[str]) -> None:
        for name in names:
            sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}")
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def restore(self) -> None:
        """Put back the handlers that were there before (submitit's, in a launcher job)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def set_threads(cfg: config.Config, launch) -> None:
    """Ranks x threads = the cores this process may use, unless train.threads says otherwise.

    Under SLURM a task gets SLURM_CPUS_PER_TASK cores even where no CPU binding shows in the affinity.
    """
    import torch

    cores = len(os.sched_getaffinity(0)) // launch.local_world_size
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cores = min(cores, int(os.environ["SLURM_CPUS_PER_TASK"]))
    torch.set_num_threads(cfg.train.threads or max(1, cores))


def run(cfg: config.Config, stop: StopFlag | None = None) -> int:
    """Set up the process (threads, process group, device), train, tear down. Returns the exit code.

    The launcher's job passes its own StopFlag (listening for submitit's preemption signal too).
    """
    from train import distributed, engine

    launch = distributed.detect()
    set_threads(cfg, launch)
    # Over a file-size limit (ulimit -f) a write then fails with EFBIG, which the checkpoint code
    # reports in one line, instead of SIGXFSZ killing the process mid-save.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    own = stop is None
    stop = stop or StopFlag()
    stop.listen(cfg.dist.stop_signals)
    try:
        with distributed.setup(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, launch) as dist:
            trainer = engine.Trainer(cfg, dist, stop)
            try:
                return trainer.fit()
            finally:
                trainer.logger.close()
                # DDP's reducer must go before its process group: freed after destroy_process_group,
                # gloo's work objects can abort the process at exit ("terminate called without an
                # active exception"; seen rarely at exit after torchrun restarts before this order)
                del trainer
                gc.collect()
    finally:
        if own:
            stop.restore()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = config.ArgumentParser(
        prog="train/main.py",
        description="Train the seed's CIFAR-10 CNN or VGG16. Rerun the same command to resume.",
        epilog="examples: python train/main.py data.name=synthetic | torchrun --nproc_per_node=2 train/main.py --config configs/smoke.yaml",
    )
    config.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, stop: StopFlag | None = None) -> int:
    """The command line: errors a user can fix are one line on stderr and an exit code, never a traceback."""
    args = parse(argv)
    try:
        cfg = config.from_args(args)
        if args.print_config:
            print(config.dump(cfg), end="", flush=True)
            return 0
        return run(cfg, stop)
    except UserError as e:
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        prefix = f"[rank {rank}] " if rank != "0" else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except RuntimeError as e:  # torch.distributed.DistError is one
        from train import distributed

        line = distributed.peer_failure(e, distributed.detect())
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
