"""SIGINT/SIGTERM stop a run cleanly: the current step finishes, a checkpoint is saved, the run says how to resume.

Why: by default Ctrl-C raises KeyboardInterrupt wherever the process is (a
traceback per process, no checkpoint with the default `save_every=0`), and a
cluster scheduler's SIGTERM before preemption kills the run the same way.

`stop_on_signals()` (the entry point wraps the run in it) installs handlers that
only set a flag; the step loop asks `stop_agreed()` once per step, which agrees
on the flag over all ranks (a checkpoint is a collective, so every rank must
stop after the same step, whichever of them got the signal). A second SIGINT
while stopping exits at once (exit code 130) for a user who does not want to
wait; a SIGTERM then is ignored.

Under torchrun a terminal's Ctrl-C reaches every worker twice: directly (the
workers share the terminal's process group) and, milliseconds later, from
torchrun, which sends each worker the signal it received itself before it waits
for them (`--shutdown-timeout`, 30 s by default, then SIGKILL). So a second
SIGINT within `FORWARD_WINDOW_S` of the first is taken as that copy, not as the
user's second Ctrl-C. Python runs a handler once for signals that arrive while
the main thread is inside one C call, so on a CPU, busy in long kernels, the two
usually merge; on a GPU the main thread runs Python most of the time and they do not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from mpoe.parallel.collectives import all_reduce_floats, host_group

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Raised by the step loop after an agreed stop and its checkpoint; main.py turns it into one line."""

    def __init__(self, signum: int, step: int, max_steps: int, checkpoint: Optional[Path]):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.max_steps, self.checkpoint = signum, step, max_steps, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by that signal


FORWARD_WINDOW_S = 2.0  # torchrun's copy of a Ctrl-C comes within milliseconds; a person's second press later


class _State:
    signum: Optional[int] = None  # the first stop signal this process received
    at: float = 0.0  # when (time.monotonic)
    agreed: bool = False  # every rank has seen a stop request (set by stop_agreed)


_state = _State()


def requested() -> Optional[int]:
    """The signal number that asked this process to stop, or None."""
    return _state.signum


def _handle(signum, frame) -> None:
    if _state.signum is None:
        _state.signum, _state.at = signum, time.monotonic()
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"\nmpoe-train: {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                "(Ctrl-C again to quit at once, without one)",
                file=sys.stderr,
                flush=True,
            )
        return
    if signum == signal.SIGINT and not _forwarded_copy():
        os._exit(128 + signum)  # the user asked twice: no cleanup, no checkpoint


def _forwarded_copy() -> bool:
    """Is this second SIGINT torchrun's copy of the first (see the module doc)?"""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    return under_torchrun and _state.signum == signal.SIGINT and time.monotonic() - _state.at < FORWARD_WINDOW_S


@contextlib.contextmanager
def stop_on_signals():
    """Install the stop handlers for the duration of a run (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in _STOP_SIGNALS}
    _state.signum, _state.agreed = None, False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_agreed() -> bool:
    """Collective, once per step on every rank: has any rank been asked to stop? (sticky once true)"""
    if not _state.agreed:
        # Over the host group (gloo, a CPU number): on the NCCL world it would wait for the step's GPU work.
        signum = all_reduce_floats([_state.signum or 0], op="max", group=host_group())[0]
        if signum:
            _state.agreed = True
            _state.signum = _state.signum or int(signum)
    return _state.agreed


def stopped() -> bool:
    """Did the step loop stop on a signal? (no collective: the answer of the last `stop_agreed`)"""
    return _state.agreed
