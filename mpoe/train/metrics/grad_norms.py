"""Gradient norms, overall and per parameter role (MPOE central, auxiliary, router).

Read after the last backward of an optimizer step, when DeepSpeed has already
reduced the gradients and before it clips and steps. Shared parameters hold
the same reduced gradient on every rank; expert parameters differ across the
expert-parallel group, so their squared norms are summed over it.

At ZeRO stage 1/2 the reduced gradients live in the optimizer's partitions,
not in `param.grad`: `zero_role_norms` sums the squares of each rank's own
fragments per role and adds them up over the world in one all-reduce (the
overall norm is DeepSpeed's own, the one it clips with).

A frozen parameter (the central tensors at optim.central_lr_scale=0) has no gradient
and no fragment: it adds nothing, so a role that is all frozen logs a norm of 0.
"""

from __future__ import annotations

import torch

from mpoe.models.build import moe_layers
from mpoe.models.param_tags import is_expert_param
from mpoe.parallel.collectives import all_reduce
from mpoe.parallel.deepspeed.gradients import local_grad_fragment, loss_scale


def role_params(model) -> dict[str, list]:
    roles: dict[str, list] = {"central": [], "auxiliary": [], "router": []}
    for layer in moe_layers(model):
        bank_roles = layer.bank.param_roles()
        roles["central"] += bank_roles.central
        roles["auxiliary"] += bank_roles.auxiliary
        roles["router"] += list(layer.router.parameters())
    return roles


def _sq(params, ep_group, device: torch.device) -> torch.Tensor:
    """Squared norm of the params' gradients, a float64 scalar on `device`; expert parameters' part is
    summed over the expert-parallel group, where each rank holds other experts."""
    shared = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            part = p.grad.double().pow(2).sum()
            if is_expert_param(p):
                expert += part
            else:
                shared += part
    if ep_group is not None:
        expert = all_reduce(expert, group=ep_group)
    return shared + expert


def grad_norms(model, roles: dict[str, list], ep_group) -> dict[str, float]:
    """{'grad_norm', 'grad_norm_central', ...} from param.grad (ZeRO stage 0), read to the host once."""
    device = next(model.parameters()).device
    names = ["grad_norm"] + [f"grad_norm_{role}" for role, params in roles.items() if params]
    param_sets = [list(model.parameters())] + [params for params in roles.values() if params]
    squares = torch.stack([_sq(params, ep_group, device) for params in param_sets])
    return dict(zip(names, squares.sqrt().tolist()))


def zero_role_norms(engine, roles: dict[str, list]) -> dict[str, float]:
    """{'grad_norm_central', ...} at ZeRO 1/2 from this rank's gradient partition (see the module doc), read to
    the host once. fp16 gradients still carry the loss scale until `engine.step()`: it is divided out."""
    names = [f"grad_norm_{role}" for role, params in roles.items() if params]
    if not names:
        return {}
    device = engine.device
    squares = []
    for params in (params for params in roles.values() if params):
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:
            fragment = local_grad_fragment(p)
            if fragment is not None:
                sq += fragment.double().pow(2).sum()
        squares.append(sq)
    norms = all_reduce(torch.stack(squares)).sqrt() / loss_scale(engine)
    return dict(zip(names, norms.tolist()))
