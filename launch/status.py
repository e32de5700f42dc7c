"""`launch/submit.py --status DIR`: a table of the runs below DIR (one run, or a sweep), and their goodput.

A run folder is any folder below DIR holding `runtime.yaml` (the trainer writes it when it starts).
Its state comes from `attempts.jsonl` and the heartbeat of the attempt running now (train/runfolder.py),
its epoch and best accuracy from `metrics.jsonl`; nothing here loads a checkpoint or asks SLURM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from train import runfolder
from train.cli import Exit, UserError


def run_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise UserError(f"--status {root}: no such folder; give a run folder or a sweep's folder (log.run_dir)")
    return sorted(p.parent for p in root.rglob("runtime.yaml"))


def state(folder: Path, attempts: list[dict]) -> str:
    live = runfolder.read_live(folder)
    if live is not None:
        beat = runfolder.number(live.get("time"))
        if not beat:  # an edited or damaged heartbeat: no age to show
            return "lost (heartbeat unreadable)"
        age = time.time() - beat
        # a heartbeat older than a few periods: the attempt died without a word (SIGKILL, a lost node)
        return "running" if age < 4 * runfolder.HEARTBEAT_S else f"lost ({age:.0f} s without a heartbeat)"
    return str(attempts[-1].get("ended", "?")) if attempts else "not started"


def epochs(folder: Path) -> tuple[str, str]:
    """(`done/asked` epochs, best test accuracy) from metrics.jsonl and config.yaml."""
    done, best = 0, None
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if isinstance(m, dict):
            done, best = int(runfolder.number(m.get("epoch"))), max(best or 0.0, runfolder.number(m.get("test_acc")))
    try:
        asked = yaml.safe_load((folder / "config.yaml").read_text())["train"]["epochs"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        asked = "?"
    return f"{done}/{asked}", f"{best:.4f}" if best is not None else "-"


def main(root: Path) -> int:
    folders = run_folders(root)
    if not folders:
        raise UserError(f"--status {root}: no run below it (a run folder holds runtime.yaml once training started)")
    rows, everything = [("run", "state", "epoch", "best test_acc", "attempts")], []
    for folder in folders:
        attempts = runfolder.read_attempts(folder)
        everything += attempts
        epoch, best = epochs(folder)
        name = str(folder.relative_to(root)) if folder != root else folder.name
        rows.append((name, state(folder, attempts), epoch, best, runfolder.goodput(attempts) if attempts else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    if len(folders) > 1 and everything:
        print(f"all {len(folders)} runs: {runfolder.goodput(everything)}")
    return Exit.OK
