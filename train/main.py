"""Train an image classifier: one process, torchrun, srun, or the launcher's job, one code path.

    python train/main.py [--config FILE] [section.key=value ...]
    torchrun --nproc_per_node=4 train/main.py --config configs/cifar10_cnn.yaml
    srun python train/main.py --config configs/cifar10_cnn.yaml

Rerunning the same command resumes from <run>/checkpoints/last.pt. Exit codes: train/cli.py's
`Exit` (0 done, 2 bad input, 3 the loss became non-finite, 75 stopped by a signal after saving).
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys

# Only the config is imported up front: a typo is reported in a fraction of a second, before
# torch loads (about 2 s); run() imports the rest.
from train import cli, config


def run(cfg: config.Config, stop: cli.StopFlag | None = None) -> int:
    """Set up the process (runtime, process group), train, tear down. Returns the exit code.

    The launcher's job passes its own StopFlag (listening for submitit's preemption signal too).
    """
    stop = stop or cli.StopFlag()
    # Until the trainer is ready, a stop signal ends the process at once: nothing is trained yet, and
    # a rank waiting in the rendezvous for a peer that never comes must not wait for SIGKILL.
    stop.listen(cfg.dist.stop_signals)
    try:
        import torch

        from train import distributed, engine, runfolder, runtime

        launch = distributed.detect()
        chosen, warnings = runtime.resolve(cfg, launch)
        torch.set_num_threads(chosen.threads)
        # Over a file-size limit (ulimit -f) a write then fails with EFBIG, which the checkpoint code
        # reports in one line, instead of SIGXFSZ killing the process mid-save.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        with (
            distributed.setup(launch, chosen.torch_device, chosen.backend, cfg.dist.timeout_s) as dist,
            runfolder.owned(cfg.run_dir, dist) as notes,  # one trainer per run folder, for the whole run
        ):
            trainer = engine.Trainer(cfg, chosen, dist, stop)
            for line in warnings + notes:
                trainer.logger.warn(line)
            try:
                return fit(trainer, stop)
            finally:
                trainer.logger.close()
                # DDP's reducer must go before its process group: freed after destroy_process_group,
                # gloo's work objects can abort the process at exit ("terminate called without an
                # active exception"; seen rarely at exit after torchrun restarts before this order)
                del trainer
                gc.collect()
    finally:
        # This process ends next: its handlers stay, so that a late stop signal (torchrun's agent
        # stops the slower ranks once one has exited) cannot turn its exit code into a signal's.
        stop.at_step_boundaries()


def fit(trainer, stop: cli.StopFlag) -> int:
    """`trainer.fit()`, recorded by rank 0 as one attempt of the run; a finished run's last line is its goodput."""
    from train import preemption, runfolder

    stop.at_step_boundaries()  # from here on a stop signal is a save at the next step boundary
    folder, logger, attempt = trainer.folder.path, trainer.logger, None
    if trainer.dist.is_main:
        try:
            where = preemption.where()
            step = lambda: trainer.progress.step  # read by the heartbeat thread
            attempt = runfolder.Attempt.begin(folder, step(), where, trainer.dist.world_size, step)
        except OSError as e:
            logger.warn(f"cannot record this attempt in {folder / runfolder.ATTEMPTS} ({e.strerror or e})")
    code = cli.Exit.FAILED
    try:
        code = trainer.fit()
        return code
    except BaseException as e:
        code = cli.exit_code_of(e)
        raise
    finally:
        if attempt is not None:
            names = [signal.Signals(s).name for s in stop.received]
            stop.ended = how_ended(code, stop)
            try:
                attempt.end(stop.ended, code, trainer.saver.blocked, names)
            except OSError as e:
                logger.warn(f"cannot record this attempt in {folder / runfolder.ATTEMPTS} ({e.strerror or e})")
            if code == cli.Exit.OK:
                logger.info(f"goodput: {runfolder.goodput(runfolder.read_attempts(folder))}")


def how_ended(code: int, stop: cli.StopFlag) -> str:
    from train import preemption

    if code == cli.Exit.STOPPED:
        return preemption.how_stopped(stop.received)
    return {cli.Exit.OK: "completed", cli.Exit.INTERRUPTED: "interrupted"}.get(code, "failed")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="train/main.py",
        description="Train the seed's CIFAR-10 CNN or VGG16. Rerun the same command to resume.",
        epilog="examples: python train/main.py data.name=synthetic | "
        "torchrun --nproc_per_node=2 train/main.py --config configs/smoke.yaml",
    )
    config.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, stop: cli.StopFlag | None = None) -> int:
    """The command line: errors a user can fix are one line on stderr and an exit code, never a traceback."""
    args = parse(argv)

    def body() -> int:
        cfg = config.from_args(args)
        if args.print_config:
            print(config.dump(cfg), end="", flush=True)
            return cli.Exit.OK
        return run(cfg, stop)

    return cli.guarded(body)


if __name__ == "__main__":
    sys.exit(main())
