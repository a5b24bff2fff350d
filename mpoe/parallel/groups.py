"""Process groups: the world, and DeepSpeed's expert-parallel / expert-data-parallel groups.

DeepSpeed owns the groups (`deepspeed.utils.groups`), so the engine reduces expert
gradients over exactly the group we dispatch over. Its layout for ep_size P on a
world of W ranks: expert-parallel groups are runs of P consecutive ranks
([0..P-1], [P..2P-1], ...), and the expert-data-parallel group of a rank holds the
ranks with the same position in every run. Expert e lives on ep rank
e // (E / P) of every expert-parallel group.

`ExpertGroups` with ep_size 1 and no process group is what single-process code
(unit tests, benchmarks) uses: dispatch then never communicates.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from mpoe.parallel import engine as ds_engine
from mpoe.parallel.collectives import start_host_group


def _deepspeed_accelerator() -> Optional[str]:
    """The device name of DeepSpeed's accelerator if this process has fixed it already, else None."""
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(real, "ds_accelerator", None)
    return None if chosen is None else chosen.device_name()


def accelerator_name() -> str:
    """The accelerator this process trains on: 'cuda' or 'cpu' (or another name DS_ACCELERATOR gives).

    The one place the device is decided: the DeepSpeed engine puts the model on its
    accelerator's device, so the process group's backend (`default_backend`) and
    the benchmarks' batches follow this. DeepSpeed fixes its accelerator on first
    use (`import deepspeed` uses it): DS_ACCELERATOR if set, else CUDA when torch
    sees a device, else the CPU. Before that, this predicts the same choice; after
    it, it reports the choice made.
    """
    chosen = _deepspeed_accelerator()
    if chosen is not None:
        return chosen
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"]
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_backend() -> str:
    """NCCL when the model is on CUDA, gloo otherwise (DS_ACCELERATOR=cpu on a GPU machine included: DeepSpeed
    then broadcasts CPU parameters, which NCCL refuses)."""
    return "nccl" if accelerator_name() == "cuda" else "gloo"


def configure_accelerator(device: Optional[str] = None) -> None:
    """Fix the accelerator DeepSpeed will use, before it is imported.

    device None (entry points): the CPU when there is no CUDA device, else DS_ACCELERATOR or DeepSpeed's own
    choice. 'cpu' or 'cuda' (benchmarks with --device): that one; a one-line RuntimeError when DeepSpeed
    already runs on another in this process, since it cannot change accelerator once it has chosen.
    """
    if device is None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        want = torch.device(device).type
        chosen = _deepspeed_accelerator()
        if chosen is None:
            os.environ["DS_ACCELERATOR"] = want
        elif chosen != want:
            raise RuntimeError(
                f"device {device} asked for, but DeepSpeed already runs on its {chosen} accelerator in this "
                f"process (it is chosen once, at import): run this in its own process, with DS_ACCELERATOR={want}"
            )
    if accelerator_name() == "cpu":
        keep_freed_cpu_memory()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_freed_cpu_memory() -> bool:
    """Let glibc reuse freed memory instead of returning it to the OS (no-op elsewhere; MPOE_MALLOC_DEFAULT=1 skips).

    Why: a training step on CPU allocates and frees the same large buffers every
    step (activations, rebuilt MPO weights, expert weight gradients). glibc serves
    each large one by a fresh mmap and unmaps it when freed, so every step
    page-faults and kernel-zeroes all of them again; reusing freed memory avoids
    that, as jemalloc/tcmalloc do by default. The price is that the process keeps
    its peak heap instead of shrinking.
    """
    if os.environ.get("MPOE_MALLOC_DEFAULT") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0) -> None:
    """Start the world process group through DeepSpeed (also for a single process)."""
    configure_accelerator()
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    ds_engine.forget_deepspeed_groups()
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
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    start_host_group(timeout)


def resolve_backend(backend: Optional[str]) -> str:
    """parallel.backend, or the default for this process's accelerator; one line when NCCL is asked for while
    DeepSpeed runs on the CPU of a GPU machine (it would fail broadcasting CPU parameters over NCCL)."""
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.is_available() and accelerator_name() != "cuda":
        from mpoe.config import ConfigError

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
    from mpoe.config import ConfigError

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
    connectFullMesh (seen with torch 2.13); a key prefix per restart attempt keeps
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


@dataclass
class ExpertGroups:
    """Where this rank sits in expert parallelism."""

    ep_size: int = 1
    ep_rank: int = 0
    name: str = "ep_size_1"  # DeepSpeed's group name: param.group_name of expert params
    ep_group: Optional[object] = None  # the all-to-all group (None: single process)

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


def expert_groups(ep_size: int) -> ExpertGroups:
    """DeepSpeed's expert groups for `ep_size`, created once; a bare ExpertGroups without a world."""
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise RuntimeError(f"parallel.ep_size={ep_size} needs a process group: launch with torchrun or deepspeed")
        return ExpertGroups()
    name, ep_rank, ep_group = ds_engine.deepspeed_expert_group(ep_size)
    return ExpertGroups(ep_size=ep_size, ep_rank=ep_rank, name=name, ep_group=ep_group)


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
