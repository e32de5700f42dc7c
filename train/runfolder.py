"""The run folder (`log.run_dir`): what lives in it. Only rank 0 writes it.

config.yaml     the config as the user gave it, resolved (`auto` stays `auto`: it loads anywhere)
runtime.yaml    what train/runtime.py chose for it on this machine, in this attempt
metrics.jsonl   one line per epoch (train/logger.py)
events.out.tfevents.*   TensorBoard (train/board.py), in the run folder itself: `--logdir runs` names the run after it
checkpoints/    last.pt, prev.pt, best.pt (train/checkpoint.py)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from train import atomic, config
from train.runtime import Runtime


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.metrics = path / "metrics.jsonl"
        self.tensorboard = path  # TensorBoard's event files

    def write_settings(self, cfg: config.Config, runtime: Runtime) -> None:
        """config.yaml and runtime.yaml, each written atomically."""
        atomic.write_atomic(self.path / "config.yaml", data=config.dump(cfg).encode())
        atomic.write_atomic(self.path / "runtime.yaml", data=yaml.safe_dump(runtime.to_dict(), sort_keys=False).encode())
