"""Fault injection, so tests can exercise the recovery paths of a real run.

One `Faults` hook, read from the environment once when the run is set up
(`from_environment`); the training step and the checkpoint save call it. In a
normal run nothing is set and every call is a no-op.
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Faults:
    """The faults this process injects; the default injects none."""

    kill_at_step: Optional[int] = None
    kill_in_save: Optional[int] = None
    nan_at_steps: frozenset = frozenset()
    once: Optional[str] = None

    def step_begins(self, step: int) -> None:
        """Optimizer step `step` (1-based) begins."""
        if step == self.kill_at_step:
            self._kill()

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-batch of optimizer step `step`: NaN where a non-finite step is injected."""
        return loss * float("nan") if step in self.nan_at_steps else loss

    def saving(self, step: int) -> None:
        """Rank 0 has the rank files of step `step` written, not yet its meta.json."""
        if step == self.kill_in_save:
            self._kill()

    def _kill(self) -> None:
        if self.once:
            try:
                os.close(os.open(self.once, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


NONE = Faults()


def from_environment(rank: int, environ: Mapping[str, str] = os.environ) -> Faults:
    """This rank's faults, as the MPOE_FAULT_* variables ask (read here only)."""

    def number(name: str) -> Optional[int]:
        value = environ.get(name)
        return int(value) if value else None

    killed_rank = number("MPOE_FAULT_RANK") or 0
    steps = environ.get("MPOE_FAULT_NAN_AT_STEPS", "")
    return Faults(
        kill_at_step=number("MPOE_FAULT_KILL_AT_STEP") if rank == killed_rank else None,
        kill_in_save=number("MPOE_FAULT_KILL_IN_SAVE") if rank == 0 else None,
        nan_at_steps=frozenset(int(s) for s in steps.split(",") if s.strip()),
        once=environ.get("MPOE_FAULT_ONCE") or None,
    )
