"""The attributes patched onto `nn.Parameter` that tell DeepSpeed and our own code what a parameter is.

One module writes and reads them, so that the hidden protocol has one owner:
- `allreduce = False` and `group_name`: DeepSpeed's names (its engine reduces such
  parameters over the expert-data-parallel group `group_name` instead of averaging
  them over the whole world). `is_expert_param` is true for exactly these.
- `first_expert`: the global id of slice 0 of a parameter stacked on a leading
  local-expert axis; the gradient mask seeds each slice by its global expert id.
Readers: grad_mask, accounting, train.checkpoint.reshard, train.metrics.grad_norms, tools.export.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from torch import nn


def tag_expert_params(params: Iterable[nn.Parameter], group_name: str) -> None:
    """DeepSpeed: reduce these over the expert-data-parallel group `group_name`, not the whole world."""
    for p in params:
        p.allreduce = False
        p.group_name = group_name


def tag_first_expert(params: Iterable[nn.Parameter], first_expert: int) -> None:
    """These are stacked [local experts, ...]; slice 0 belongs to global expert `first_expert`."""
    for p in params:
        p.first_expert = first_expert


def to_empty_keeping_tags(module: nn.Module, device: str) -> None:
    """`module.to_empty(device=device)` for a module built on the meta device: its new Parameters keep these tags,
    which `to_empty` drops (it makes new Parameter objects where the storage type changes)."""
    tags = {name: dict(vars(p)) for name, p in module.named_parameters()}
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        vars(p).update(tags[name])


def is_expert_param(p: nn.Parameter) -> bool:
    return getattr(p, "allreduce", True) is False


def expert_group_name(p: nn.Parameter) -> Optional[str]:
    return getattr(p, "group_name", None) if is_expert_param(p) else None


def first_expert(p: nn.Parameter) -> Optional[int]:
    """Global id of slice 0 for a stacked per-expert parameter, None for any other."""
    return getattr(p, "first_expert", None)
