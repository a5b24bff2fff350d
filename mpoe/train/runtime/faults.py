"""Fault injection, so tests can exercise the recovery paths of a real run.

Read from the environment at each check; unset in normal runs (then every check is a no-op).
- MPOE_FAULT_KILL_AT_STEP=N: SIGKILL this process when optimizer step N begins
  (on the rank given by MPOE_FAULT_RANK, default 0), as a crashed node would.
- MPOE_FAULT_KILL_IN_SAVE=N: SIGKILL rank 0 while it saves the checkpoint of step N,
  after the rank files are written and before the directory is renamed into place.
- MPOE_FAULT_NAN_AT_STEPS=N,M,...: make the loss NaN at those optimizer steps.
- MPOE_FAULT_ONCE=PATH: kill only if PATH does not exist yet (it is created first), so a
  process restarted by `torchrun --max-restarts` runs on past the fault.
"""

from __future__ import annotations

import os
import signal


def _int(name: str):
    value = os.environ.get(name)
    return int(value) if value else None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _kill() -> None:
    once = os.environ.get("MPOE_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_at_step(step: int) -> None:
    if _int("MPOE_FAULT_KILL_AT_STEP") == step and _rank() == (_int("MPOE_FAULT_RANK") or 0):
        _kill()


def maybe_kill_in_save(step: int) -> None:
    if _int("MPOE_FAULT_KILL_IN_SAVE") == step and _rank() == 0:
        _kill()


def nan_at(step: int) -> bool:
    steps = os.environ.get("MPOE_FAULT_NAN_AT_STEPS", "")
    return str(step) in steps.split(",")
