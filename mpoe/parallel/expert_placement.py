"""Where this rank sits in expert parallelism: which experts it holds, and the process group it exchanges
tokens over.

The process groups are DeepSpeed's (`mpoe.parallel.deepspeed.distributed`), so the
engine reduces expert gradients over exactly the group we dispatch over. Its layout
for ep_size P on a world of W ranks: expert-parallel groups are runs of P
consecutive ranks ([0..P-1], [P..2P-1], ...), and the expert-data-parallel group of
a rank holds the ranks with the same position in every run. Expert e lives on ep
rank e // (E / P) of every expert-parallel group.

`ExpertPlacement()` (ep_size 1, no process group) is what single-process code (unit
tests, benchmarks) uses: dispatch then never communicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from mpoe.parallel.deepspeed.distributed import expert_parallel_group


@dataclass
class ExpertPlacement:
    """This rank's place among the expert-parallel ranks."""

    ep_size: int = 1
    ep_rank: int = 0
    group_name: str = "ep_size_1"  # DeepSpeed's name of the expert-parallel group: param.group_name of experts
    ep_group: Optional[object] = None  # the all-to-all process group (None: single process)

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


def expert_placement(ep_size: int) -> ExpertPlacement:
    """This rank's placement for `ep_size`, its process groups created once; ExpertPlacement() without a world."""
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise RuntimeError(f"parallel.ep_size={ep_size} needs a process group: launch with torchrun or deepspeed")
        return ExpertPlacement()
    group_name, ep_rank, ep_group = expert_parallel_group(ep_size)
    return ExpertPlacement(ep_size=ep_size, ep_rank=ep_rank, group_name=group_name, ep_group=ep_group)
