"""The job the launcher submits: a submitit checkpointable callable around `train.main.main`.

Every task of the job sets up torch.distributed's variables from submitit's view of the job
(global and local rank, world size, the first node as master) and then runs exactly what
`python train/main.py ARGS` runs. How the job ends, by the trainer's exit code (`finish`):

- 0: the job completes.
- 75 after submitit's preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise; SLURM
  sends it `--signal-delay` seconds before the time limit): all ranks stopped at one step and rank 0
  saved `last.pt`; rank 0 then hands over to submitit, which calls `checkpoint()` and requeues the
  job. The requeued job runs the same command, which resumes from `last.pt`.
- 75 after SIGTERM (`scontrol requeue`, a preempting partition, scancel, the time limit itself):
  when SLURM is requeueing the job, every task ends quietly (exit 0: no srun error line for a
  normal event); otherwise rank 0 exits 75, so that a job stopped for good says so.
- anything else: under SLURM the task exits with the trainer's code, so that SLURM's accounting says
  FAILED with that code (the trainer printed its one line; raising would add submitit's ERROR and a
  traceback); locally and in debug mode the code is the job's result, which the launcher reads.
"""

from __future__ import annotations

import os
import signal
import sys

import submitit

from train import main as train_main
from train import preemption
from train.cli import Exit, StopFlag


def preemption_signal() -> signal.Signals:
    """The signal submitit asked SLURM to send before the time limit (its public setting, USR2 by default)."""
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


def finish(code: int, stop: StopFlag) -> int:
    """End a job task the way the module docstring says; returns the job's result where the task goes on.

    Under SLURM a stopped task that is not the one to report leaves with sys.exit(0): no result file
    and no "Job completed successfully" from submitit; the requeued job writes the real result.
    """
    slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    preempt = preemption_signal()
    if code == Exit.STOPPED and preempt in stop.received and callable(handler := signal.getsignal(preempt)):
        try:
            # submitit's own handler: on global rank 0 it calls checkpoint(), requeues and exits;
            # on the other ranks it logs and returns (SLURM ends them with the job step).
            handler(preempt, None)
        except RuntimeError as e:  # submitit's "not requeued" (the --requeues are used up): one line
            print(f"{e} Rerun the same command to continue from last.pt", file=sys.stderr, flush=True)
            sys.exit(code)
        if slurm:
            sys.exit(0)
        return code
    if not slurm or code == Exit.OK:
        return code
    if code == Exit.STOPPED and (
        submitit.JobEnvironment().global_rank != 0 or (stop.ended or preemption.how_stopped(stop.received)) == "preempted"
    ):
        sys.exit(0)  # rank 0 exits 75 for a job SLURM ends; one SLURM requeues needs no code at all
    sys.exit(code)


class TrainJob(submitit.helpers.Checkpointable):
    """`python train/main.py ARGS`, as a job. Pickled by reference: importable on every node."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        # RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT for the trainer's torchrun path. The device
        # comes from the local rank: CUDA_VISIBLE_DEVICES is left as SLURM set it.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # SLURM sends SIGCONT before every SIGTERM; submitit would log a warning for each
        cont = signal.signal(signal.SIGCONT, signal.SIG_DFL)
        stop = StopFlag([preemption_signal().name])
        try:
            code = train_main.main(self.argv, stop=stop)
        finally:
            stop.restore()  # submitit's handlers are back in place
            signal.signal(signal.SIGCONT, cont)
        return finish(code, stop)

    def __repr__(self) -> str:
        return f"TrainJob({' '.join(self.argv)})"
