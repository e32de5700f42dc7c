"""What every entry point shares: the exit codes, the one-line error, the parser, the stop flag.

The four commands (`train/main.py`, `infer/predict.py`, `infer/evaluate.py`, `launch/submit.py`)
report a mistake the user can fix as one line on stderr, `error: <what is wrong and what to do>`,
and exit with the code below; never with a traceback. `Exit` is the one table of exit codes: the
README, `slurm/*.sbatch` and the launcher cite it.

Nothing here imports torch: a config typo is reported before torch loads.
"""

from __future__ import annotations

import argparse
import enum
import signal
import sys
from collections.abc import Callable, Iterable


class Exit(enum.IntEnum):
    OK = 0  # done: trained to train.epochs, or nothing was left to do
    FAILED = 1  # an unexpected error, or another rank was lost
    USAGE = 2  # bad input: one line on stderr says what is wrong and what to do
    NONFINITE = 3  # the loss became NaN or infinite; nothing after the last good checkpoint was saved
    STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after saving last.pt; rerun the same command to continue
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it


class UserError(Exception):
    """A mistake in the user's input (a config typo, a missing dataset, a corrupt checkpoint), reported as one line."""

    exit_code = Exit.USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other input error."""

    def error(self, message: str):
        self.exit(Exit.USAGE, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # options may come after the overrides: `main.py data.name=synthetic --config smoke.yaml`
        return self.parse_intermixed_args(args, namespace)


def error_line(message: str) -> str:
    """`error: message`, prefixed with `[rank N]` on every rank but 0 (the one rule for all entry points)."""
    from train.distributed import detect  # imports no torch

    rank = detect().rank
    return f"{f'[rank {rank}] ' if rank else ''}error: {message}"


def report(message: str) -> None:
    print(error_line(message), file=sys.stderr, flush=True)


def guarded(body: Callable[[], int]) -> int:
    """Run an entry point's body and return its exit code; what a user can fix becomes one line.

    A `UserError` prints its message; an error that means another rank is gone prints one line
    saying so (exit 1); Ctrl-C prints `interrupted` (exit 130). Anything else is a bug and keeps
    its traceback.
    """
    try:
        return body()
    except UserError as e:
        report(str(e))
        return e.exit_code
    except RuntimeError as e:  # torch.distributed.DistError is one
        from train.distributed import peer_failure

        line = peer_failure(e)
        if line is None:
            raise
        report(line)
        return Exit.FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return Exit.INTERRUPTED


class StopFlag:
    """Set by the configured signals; the loop reads it at step boundaries and all ranks agree on it."""

    def __init__(self, names: Iterable[str] = ()):
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self.listen(names)

    def listen(self, names: Iterable[str]) -> None:
        for name in names:
            sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
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
