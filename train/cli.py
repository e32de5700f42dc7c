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
import os
import signal
import sys
import threading
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


def rank_prefix() -> str:
    """`[rank N] ` on every rank but 0, so that the lines of several ranks in one log can be told apart."""
    from train.distributed import detect  # imports no torch

    rank = detect().rank
    return f"[rank {rank}] " if rank else ""


def error_line(message: str) -> str:
    """`error: message`, prefixed with `[rank N]` on every rank but 0 (the one rule for all entry points)."""
    return f"{rank_prefix()}error: {message}"


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


# The signals that mean "stop at the next step and save": SLURM's SIGTERM (requeue, preemption, the
# time limit), the time-limit signals of the sbatch scripts (USR1) and of submitit (USR2).
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """For DataLoader workers: SLURM signals every process of a job; only the main process may act on it."""
    for name in STOP_SIGNALS:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def exit_code_of(error: BaseException) -> int:
    """The exit code `guarded` will give an exception (for records written before it gets there)."""
    if isinstance(error, UserError):
        return error.exit_code
    return Exit.INTERRUPTED if isinstance(error, KeyboardInterrupt) else Exit.FAILED


class StopFlag:
    """Set by the configured signals; the loop reads it at step boundaries and all ranks agree on it.

    Until `at_step_boundaries()` there is nothing to save, and a stop signal ends the process at once
    with one line and Exit.STOPPED. A rank waiting in the rendezvous for a peer that never comes sits
    in C++ code, where no Python handler runs until the wait times out (minutes); so the C-level
    handler's wake-up byte (`signal.set_wakeup_fd`) wakes a thread of ours, which ends the process.
    """

    def __init__(self, names: Iterable[str] = ()):
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[int, int, int] | None = None  # (read end, write end, the wake-up fd before ours)
        self._stepping = False
        self.ended: str | None = None  # how rank 0 recorded the attempt (train/main.py): its job need not ask SLURM again
        self.listen(names)

    def listen(self, names: Iterable[str]) -> None:
        for name in names:
            sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        if self._previous and self._wakeup is None and not self._stepping:
            self._exit_on_signal()

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)

    def _exit_on_signal(self) -> None:
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = (read, write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
        prefix = rank_prefix()  # here, not in the thread: an import there could wait for the main thread's import lock

        def watch() -> None:
            while chunk := os.read(read, 64):  # empty: at_step_boundaries() closed the write end
                ours = [byte for byte in chunk if byte in self._previous]
                if ours and not self._stepping:
                    # os.write, not print: the main thread may hold sys.stderr's lock
                    what = f"stopped by {signal.Signals(ours[0]).name} before training started; nothing to save"
                    os.write(2, f"{prefix}{what}. Rerun the same command to continue\n".encode())
                    os._exit(Exit.STOPPED)
            os.close(read)

        threading.Thread(target=watch, name="stop-before-training", daemon=True).start()

    def at_step_boundaries(self) -> None:
        """From now on a stop signal only sets the flag: the loop stops at the next step boundary and saves."""
        self._stepping = True
        if self._wakeup is not None:
            read, write, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write)
            self._wakeup = None

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def restore(self) -> None:
        """Put back the handlers that were there before (submitit's, in a launcher job)."""
        self.at_step_boundaries()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
