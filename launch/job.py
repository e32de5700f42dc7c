"""The job the launcher submits: a submitit checkpointable callable around `train.main.main`.

Every task of the job sets up torch.distributed's variables from submitit's view of the job
(global and local rank, world size, the first node as master) and then runs exactly what
`python train/main.py ARGS` runs. On submitit's preemption signal (USR2 unless
SUBMITIT_PREEMPT_SIGNAL says otherwise) the trainer stops all ranks at the same step and
rank 0 saves `last.pt`; then rank 0 hands over to submitit, which calls `checkpoint()` and
requeues the job. The requeued job runs the same command, which resumes from `last.pt`.
"""

from __future__ import annotations

import signal

import submitit

from train import main as train_main
from train.cli import Exit, StopFlag


class TrainJob(submitit.helpers.Checkpointable):
    """`python train/main.py ARGS`, as a job. Pickled by reference: importable on every node."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        # RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT for the trainer's torchrun path. The device
        # comes from the local rank: CUDA_VISIBLE_DEVICES is left as SLURM set it.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # the signal submitit asked SLURM to send before the time limit (its public setting, USR2 by default)
        preempt = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
        stop = StopFlag([preempt.name])
        try:
            code = train_main.main(self.argv, stop=stop)
        finally:
            stop.restore()  # submitit's handlers are back in place
        handler = signal.getsignal(preempt)
        if code == Exit.STOPPED and preempt in stop.received and callable(handler):
            # submitit's own handler: on global rank 0 it calls checkpoint(), requeues and exits;
            # on the other ranks it logs and returns (SLURM ends them with the job step).
            handler(preempt, None)
            return code
        if code != Exit.OK:
            raise RuntimeError(f"training exited with code {code} (see the error line above in this log)")
        return code

    def __repr__(self) -> str:
        return f"TrainJob({' '.join(self.argv)})"
