"""Spawn a real gloo world of processes on 127.0.0.1 (multi-process tests and benchmarks).

Each worker gets the usual launcher environment (RANK, WORLD_SIZE, MASTER_*),
initialises through `mpoe.parallel.process_groups.init_distributed` as training does, runs
`fn(rank, *args)` and tears the group down. Workers report results by writing files
(torch.save) into a directory the test passes them; a failing worker makes
`spawn_world` raise with its traceback. Spawning is slow (each process imports the stack),
so tests reuse one world for several checks.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpoe.parallel.process_groups import free_port, init_distributed


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    init_distributed(backend="gloo", timeout_s=timeout_s)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_world(fn: Callable, world_size: int, *args, timeout_s: float = 120) -> None:
    """Run fn(rank, *args) on `world_size` processes of one gloo world (its collectives' timeout `timeout_s`);
    fn must be importable (module level)."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args, timeout_s), nprocs=world_size, join=True)
