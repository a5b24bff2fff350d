"""Parameter accounting over the whole (possibly expert-parallel) model.

A rank holds the shared parameters and only its local experts, so global counts
scale the per-expert parameters (`param.allreduce == False`) by the expert-parallel
size. "Active" parameters are those one token uses: everything shared (an MPOE
central tensor included: every expert uses it) plus `top_k` experts' own
parameters in each MoE layer.
"""
from __future__ import annotations

import torch.nn as nn


def is_expert_param(p: nn.Parameter) -> bool:
    return getattr(p, "allreduce", True) is False


def count_params(model: nn.Module, embedding: int, top_k: int, ep_size: int) -> dict[str, int]:
    from mpoe.models.build import moe_layers

    unique = {id(p): p for p in model.parameters()}.values()  # tied embeddings count once
    shared = sum(p.numel() for p in unique if not is_expert_param(p))
    expert_local = sum(p.numel() for p in unique if is_expert_param(p))
    counts = {"params_central": 0, "params_auxiliary": 0, "params_router": 0, "params_expert": 0}
    active = shared
    for layer in moe_layers(model):
        bank = layer.bank
        roles = bank.param_roles()
        own = sum(p.numel() for p in bank.parameters() if is_expert_param(p))
        central = sum(p.numel() for p in roles.get("central", []))
        counts["params_central"] += central
        counts["params_auxiliary"] += sum(p.numel() for p in roles.get("auxiliary", [])) * ep_size
        counts["params_router"] += sum(p.numel() for p in layer.router.parameters())
        counts["params_expert"] += central + own * ep_size
        active += top_k * own // bank.num_local_experts
    return {
        "params_total": shared + expert_local * ep_size,
        "params_active": active,
        "params_embedding": embedding,
        **counts,
    }


def format_table(counts: dict[str, int]) -> str:
    width = max(map(len, counts))
    return "\n".join(f"  {k:<{width}}  {v:>14,}" for k, v in counts.items())
