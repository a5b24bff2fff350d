"""torch's CPU thread count fitted to the CPUs this process may use.

torch sizes its intra-op pool from the machine's cores, not from the CPUs a
process may run on (`taskset`, a container's cpuset) nor from how many
processes share them: two ranks on 2 cores each run 2 threads, and their
threads displace each other at every step. When the pool
is larger than this process's share, it is lowered to the share and the log
says so. OMP_NUM_THREADS set by the user is their choice and is kept.
"""

from __future__ import annotations

import os
from typing import Optional

import torch


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Processes on this node: torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE; 1 for neither."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1")


def share(cpus: int, local_world: int) -> int:
    """Threads per process: this process's CPUs split over the processes of the node, at least one."""
    return max(1, cpus // max(1, local_world))


def fit_threads() -> Optional[str]:
    """Lower torch's thread count to this process's share of CPUs; return the log line saying what was done."""
    cpus, local_world = cpus_available(), local_world_size()
    threads, fitted = torch.get_num_threads(), share(cpus, local_world)
    where = f"{cpus} CPU(s) in this process's affinity, {local_world} process(es) on this node"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"torch uses {threads} thread(s) (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; {where})"
    if threads <= fitted:
        return f"torch uses {threads} thread(s) ({where})"
    torch.set_num_threads(fitted)
    return f"torch threads lowered from {threads} to {fitted} ({where}; set OMP_NUM_THREADS to choose)"
