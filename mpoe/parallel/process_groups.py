"""The world process group: starting it (one process per GPU), and this rank's place in it.

Every other process group (the gloo host group, DeepSpeed's expert-parallel ones) is
made from this world; in mpoe.parallel, "group" means such a torch.distributed process group.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from mpoe.config import ConfigError
from mpoe.parallel.collectives import start_host_group
from mpoe.parallel.deepspeed.accelerator import accelerator_name, configure_accelerator
from mpoe.parallel.deepspeed.distributed import forget_process_groups, start_world


def default_backend() -> str:
    """NCCL when the model is on CUDA, gloo otherwise (DS_ACCELERATOR=cpu on a GPU machine included: DeepSpeed
    then broadcasts CPU parameters, which NCCL refuses)."""
    return "nccl" if accelerator_name() == "cuda" else "gloo"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0) -> None:
    """Start the world process group through DeepSpeed (also for a single process)."""
    configure_accelerator()
    if dist.is_available() and dist.is_initialized():
        return
    forget_process_groups()
    if "RANK" not in os.environ:  # a plain `python -m mpoe.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(cuda_device_for_rank(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _init_on_agent_store(backend, timeout)
    start_world(backend, timeout)
    start_host_group(timeout)


def resolve_backend(backend: Optional[str]) -> str:
    """parallel.backend, or the default for this process's accelerator; one line when NCCL is asked for while
    DeepSpeed runs on the CPU of a GPU machine (it would fail broadcasting CPU parameters over NCCL)."""
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.is_available() and accelerator_name() != "cuda":
        raise ConfigError(
            f"parallel.backend=nccl needs DeepSpeed's CUDA accelerator, but this process runs on its "
            f"{accelerator_name()} accelerator (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')}): "
            "use parallel.backend=gloo, or unset DS_ACCELERATOR"
        )
    return backend


def cuda_device_for_rank(local_rank: int, device_count: int) -> int:
    """The GPU a process drives under NCCL: its local rank, one process per GPU.

    It must be current before the process group starts: NCCL binds a communicator to
    the current device, and a barrier before any model exists would otherwise run every
    rank of a node on GPU 0.
    """
    if device_count == 0:
        raise ConfigError(
            "parallel.backend=nccl needs CUDA devices, and this machine has none: use parallel.backend=gloo"
        )
    if local_rank >= device_count:
        raise ConfigError(
            f"process with LOCAL_RANK={local_rank} has no GPU: this node has {device_count} CUDA device(s); "
            f"start at most {device_count} processes per node (torchrun --nproc_per_node {device_count})"
        )
    return local_rank


_worlds_started = 0


def _init_on_agent_store(backend: str, timeout: timedelta) -> None:
    """Under torchrun, join through the agent's store under a per-restart prefix.

    With the plain env:// rendezvous, gloo workers restarted by `torchrun --max-restarts`
    read the dead previous attempt's addresses from the agent's store and fail in
    connectFullMesh; a key prefix per restart attempt keeps
    each attempt's rendezvous apart. DeepSpeed then adopts the initialised group.
    """
    global _worlds_started
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # and per world this process starts: the jobs of a Hydra sweep (-m) start one each, in the same order on
    # every rank; under one prefix the second would read the first's keys and hang
    _worlds_started += 1
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"/mpoe/attempt_{attempt}/world_{_worlds_started}", store),
        timeout=timeout,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it), for a rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
