"""torchrun for batch scripts: a stop signal reaches every worker once, the save finishes, and a stop is one line.

    python -m launch.torchrun [torchrun options] train/main.py [args]      (what slurm/torchrun.sbatch runs)

Plain torchrun answers SIGTERM by raising inside its agent: it forwards SIGTERM to the workers,
SIGKILLs them 30 s later whatever they are doing, and ends with a traceback. It does not handle
USR1 or USR2 at all (their default action kills the agent). Here the agent is torchrun's own,
unchanged, except that SIGTERM, USR1 and USR2 are ours: each is passed to the workers as SIGTERM
(the trainer's stop signal), and the agent goes on watching them. The workers stop at one step
boundary, rank 0 saves, they exit 75 (train/cli.py's Exit.STOPPED), and so does this process, with
one line instead of torchrun's failure report. Any other failure keeps torchrun's report.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from train.cli import STOP_SIGNALS, Exit
from train.preemption import FORWARDED_BY_WRAPPER


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers are the agent's children)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the command name (field 2) may hold spaces and parentheses: the parent id follows the last ')'
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = sys.argv[1:] if argv is None else argv
    received: list[str] = []

    def forward(signum, frame) -> None:
        name = signal.Signals(signum).name
        if not received:
            print(f"torchrun: {name}: asking the workers to stop at the next step and save (SIGTERM)", flush=True)
        received.append(name)
        for pid in children(os.getpid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for name in STOP_SIGNALS:
        signal.signal(signal.Signals[name], forward)
    # after a stop, a worker's exit 75 is the plan, not torchrun's "failed (exitcode: 75)" ERROR line
    stopped_as_asked = lambda record: not (received and record.msg.startswith("failed (exitcode") and record.args[0] == 75)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(stopped_as_asked)
    os.environ[FORWARDED_BY_WRAPPER] = "1"  # the workers' grace is SLURM's alone (train/preemption.py)
    try:
        # the agent keeps SIGINT, SIGHUP and SIGQUIT; the stop signals stay with forward() above
        run.main(["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *argv])
    except ChildFailedError as e:
        # 75: stopped and saved; -SIGTERM: ended by the agent once another had (after the save), or before it started
        codes = {failure.exitcode for failure in e.failures.values()}
        if received and Exit.STOPPED in codes and codes <= {Exit.STOPPED, -signal.SIGTERM}:
            print(f"torchrun: the workers stopped after {received[0]} and saved; exit {int(Exit.STOPPED)}", flush=True)
            return Exit.STOPPED
        raise
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
