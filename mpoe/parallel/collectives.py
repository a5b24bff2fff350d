"""Where a collective's tensors live, and the small reductions the training loop needs.

NCCL reduces only CUDA tensors and gloo only CPU ones ("No backend type
associated with device type cpu" is NCCL refusing a CPU tensor). Every
collective in the package asks `comm_device` where to put its tensor, so that
choice is made in one place.

Agreements between the hosts (a stop was asked for, files are written, which
cache key) go over the *host group*: a gloo twin of the world, on CPU tensors.
Under NCCL the same agreement on a CUDA tensor would wait for all the GPU work
queued before it (a host sync per training step for the stop check). The group
meets with the world's timeout, so a node that cannot reach the others over
gloo (a hostname that resolves to a loopback address: set GLOO_SOCKET_IFNAME)
fails as soon as NCCL would; then its agreements may wait up to `HOST_WAIT`,
where NCCL's watchdog would abort ranks that wait longer than the world's
timeout while one process per node tokenizes a large corpus or writes a large
checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


HOST_WAIT = timedelta(hours=24)  # how long a host_barrier waits for the other hosts (data preparation, a save)

_host: Optional[tuple] = None  # (the world group, its gloo twin)


def start_host_group(timeout: timedelta) -> None:
    """Collective, on every rank once, right after the world starts (`process_groups.init_distributed`), with its
    timeout."""
    global _host
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch's, private: absent, wait long
    group = dist.new_group(backend="gloo", timeout=timeout if set_timeout else HOST_WAIT)
    if set_timeout:
        set_timeout(HOST_WAIT, group)
    _host = (dist.group.WORLD, group)


def host_group() -> Optional[dist.ProcessGroup]:
    """The world's gloo twin for host-side agreements; None (the world itself) where the world was started
    without one, or there is no world."""
    if not _distributed() or _host is None or _host[0] is not dist.group.WORLD:
        return None
    return _host[1]


def host_broadcast(objects: list) -> None:
    """Rank 0's `objects` (picklable) into `objects` on every rank, over the host group (no-op without peers)."""
    if _distributed() and dist.get_world_size() > 1:
        group = host_group()
        dist.broadcast_object_list(objects, src=0, group=group, device=comm_device(group))


def host_barrier() -> None:
    """Every rank has reached this point (files written, a cache made); no GPU work is waited for."""
    if _distributed():
        dist.barrier(group=host_group())


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device a tensor must be on for a collective over `group` (the world by default)."""
    if _distributed() and "nccl" not in str(dist.get_backend(group)):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: Tensor, op: str = "sum", group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """`tensor` reduced over `group` ("sum" | "max" | "min"), returned on its own device (in place when it is
    already on the collective's device; unchanged without a group)."""
    if not _distributed() or dist.get_world_size(group) == 1:
        return tensor
    device = comm_device(group)
    moved = tensor.to(device)
    dist.all_reduce(
        moved, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op], group=group
    )
    return moved.to(tensor.device)


def all_reduce_floats(
    values: Sequence[float], op: str = "sum", group: Optional[dist.ProcessGroup] = None
) -> list[float]:
    """Host numbers reduced over `group` in float64: one collective and one host read for all of them."""
    if not _distributed() or dist.get_world_size(group) == 1:
        return [float(v) for v in values]  # no round trip through a device for a world of one
    t = torch.tensor(list(values), dtype=torch.float64, device=comm_device(group))
    return all_reduce(t, op, group).tolist()
