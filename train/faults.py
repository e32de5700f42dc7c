"""Test-only fault injection: named points in the code where a test can make this process die.

    SCAFFOLD_FAULT=POINT@N[:RANK]

kills the process with SIGKILL (nothing is flushed, nothing is cleaned up) the N-th time it
reaches POINT, on RANK only when given. Before dying it writes one line to stderr saying where,
so a test can prove the kill landed there. Points:

    step          mid-step: after backward, before the optimizer step
    eval          during evaluation, after a batch
    ckpt_write    inside a checkpoint write, half of the temporary file written
    ckpt_rename   the temporary file complete and fsync'ed, not yet renamed over last.pt
    ckpt_renamed  just after the rename, before the directory fsync and best.pt

Faults fire on the first attempt of a job only: a torchrun restart (TORCHELASTIC_RESTART_COUNT
above 0) runs clean, so that an elastic test can prove the restart finishes. Unset, every
check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "SCAFFOLD_FAULT"
_hits: dict[str, int] = {}


def _armed() -> tuple[str, int, int | None] | None:
    spec = os.environ.get(ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    where, _, rank = spec.partition(":")
    name, _, count = where.partition("@")
    return name, int(count or 1), int(rank) if rank else None


def armed(name: str) -> bool:
    """Whether a fault is set for this point (lets a caller prepare, e.g. write a file in two halves)."""
    spec = _armed()
    return spec is not None and spec[0] == name


def point(name: str, detail: str = "") -> None:
    """Die here with SIGKILL if the environment asks for it."""
    spec = _armed()
    if spec is None or spec[0] != name:
        return
    _, count, rank = spec
    from train.distributed import detect  # imported here: distributed's own imports need this module loaded

    this_rank = detect().rank
    if rank is not None and rank != this_rank:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != count:
        return
    print(f"fault injected: SIGKILL at {name} (hit {count}) on rank {this_rank} {detail}".rstrip(), file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
