"""Gradient norms, overall and per parameter role (MPOE central, auxiliary, router).

Read after the last backward of an optimizer step, when DeepSpeed has already
reduced the gradients and before it clips and steps. Shared parameters hold
the same reduced gradient on every rank; expert parameters differ across the
expert-parallel group, so their squared norms are summed over it.

At ZeRO stage 1/2 the reduced gradients live in the optimizer's partitions,
not in `param.grad`: there only the overall norm (DeepSpeed's own) is known.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mpoe.models.build import moe_layers
from mpoe.models.param_tags import is_expert_param


def role_params(model) -> dict[str, list]:
    roles: dict[str, list] = {"central": [], "auxiliary": [], "router": []}
    for layer in moe_layers(model):
        bank_roles = layer.bank.param_roles()
        roles["central"] += bank_roles.central
        roles["auxiliary"] += bank_roles.auxiliary
        roles["router"] += list(layer.router.parameters())
    return roles


def _sq(params, ep_group) -> float:
    shared = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None and not is_expert_param(p))
    expert = torch.tensor(
        sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None and is_expert_param(p)),
        dtype=torch.float64,
    )
    if ep_group is not None and dist.is_initialized():
        dist.all_reduce(expert, group=ep_group)
    return shared + float(expert)


def grad_norms(model, roles: dict[str, list], ep_group) -> dict[str, float]:
    """{'grad_norm', 'grad_norm_central', ...} from param.grad (ZeRO stage 0)."""
    out = {"grad_norm": math.sqrt(_sq(list(model.parameters()), ep_group))}
    for role, params in roles.items():
        if params:
            out[f"grad_norm_{role}"] = math.sqrt(_sq(params, ep_group))
    return out
