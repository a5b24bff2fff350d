"""Parameter accounting over the whole (possibly expert-parallel) model.

A rank holds the shared parameters and only its local experts, so global counts
scale the per-expert parameters (`param.allreduce == False`) by the expert-parallel
size. "Active" parameters are those one token uses: everything shared (an MPOE
central tensor included: every expert uses it) plus `top_k` experts' own
parameters in each MoE layer.

Embeddings are the token + position tables (T5: the shared token table; its
relative-attention bias is counted with the layers, as in the published counts);
an untied LM head is `params_lm_head`, apart from them. Both are inside the total.

`params_active_compute` is what one token's matrix products multiply by, the
model FLOPs' count: the same as `params_active` but that an MPOE expert counts
the dense W it applies (rebuilt from its MPO tensors), not the MPO tensors.

MPOE vs Switch: a model with MPOE layers also reports `params_switch_equivalent`,
the total the same model would have with Switch experts (E dense FFNs per MoE
layer), and `switch_over_mpoe_params` = that / params_total (Switch's total over
MPOE's: 1.31 means the Switch model is 1.31x larger).
`mpoe_vs_switch_ratio(...)` gives the same by formula for any shape, for the
paper's settings without building anything (`python -m mpoe.models.accounting`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn as nn

from mpoe.models import mpo
from mpoe.models.build import moe_layers
from mpoe.models.experts import MPOEExperts
from mpoe.models.param_tags import is_expert_param


def _lm_head(model: nn.Module) -> int:
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "get_output_embeddings") or backbone.get_output_embeddings() is None:
        return 0
    head, table = backbone.get_output_embeddings().weight, backbone.get_input_embeddings().weight
    return 0 if head is table else head.numel()


def switch_expert_params(d_model: int, d_ff: int, gated: bool, bias: bool) -> int:
    """One dense FFN expert: W_in (+ W_gate) + W_out (+ biases)."""
    return d_model * d_ff * (3 if gated else 2) + ((d_ff + d_model) if bias else 0)


def count_params(model: nn.Module, embedding: int, top_k: int, ep_size: int) -> dict[str, float]:
    unique = {id(p): p for p in model.parameters()}.values()  # tied embeddings count once
    shared = sum(p.numel() for p in unique if not is_expert_param(p))
    expert_local = sum(p.numel() for p in unique if is_expert_param(p))
    counts = {"params_central": 0, "params_auxiliary": 0, "params_router": 0, "params_expert": 0}
    active = shared
    compute = 0  # what `active` is short of the weights one token's matmuls use: MPOE's rebuilt dense W
    mpoe_bank_params = switch_bank_params = 0
    for layer in moe_layers(model):
        bank = layer.bank
        roles = bank.param_roles()
        own = sum(p.numel() for p in bank.parameters() if is_expert_param(p))
        central = sum(p.numel() for p in roles.central)
        counts["params_central"] += central
        counts["params_auxiliary"] += sum(p.numel() for p in roles.auxiliary) * ep_size
        counts["params_router"] += sum(p.numel() for p in layer.router.parameters())
        counts["params_expert"] += central + own * ep_size
        active += top_k * own // bank.num_local_experts
        if isinstance(bank, MPOEExperts):
            d_ff = math.prod(bank.factors["w_in"][1])
            dense_expert = switch_expert_params(bank.d_model, d_ff, bank.gated, bank.b_in is not None)
            mpoe_bank_params += central + own * ep_size
            switch_bank_params += bank.num_experts * dense_expert
            compute += top_k * dense_expert - central - top_k * own // bank.num_local_experts
    total = shared + expert_local * ep_size
    out = {
        "params_total": total,
        "params_active": active,
        "params_active_compute": active + compute,
        "params_embedding": embedding,
        "params_lm_head": _lm_head(model),
        **counts,
    }
    if mpoe_bank_params:
        out["params_switch_equivalent"] = total - mpoe_bank_params + switch_bank_params
        out["switch_over_mpoe_params"] = round(out["params_switch_equivalent"] / total, 3)
    return out


def mpoe_vs_switch_ratio(
    d_model: int,
    d_ff: int,
    num_moe_layers: int,
    num_experts: int,
    other_params: int = 0,
    bond_dim: Optional[int] = None,
    num_factors: int = 5,
    gated: bool = False,
    bias: bool = False,
    router: bool = True,
) -> dict[str, float]:
    """Total parameters of the same model with Switch vs MPOE experts, by formula.

    other_params: everything that is not an MoE layer's experts or router (attention, norms,
    dense FFNs, embeddings), the same in both. Per MoE layer, Switch holds E dense FFNs; MPOE
    holds per weight matrix one central tensor plus E copies of the auxiliary tensors (and E
    bias vectors if the FFN has biases). Factorisations are `mpo.factorize`'s (the paper's).
    """
    fm, ff = mpo.factorize(d_model, num_factors), mpo.factorize(d_ff, num_factors)
    matrices = [(fm, ff), (ff, fm)] + ([(fm, ff)] if gated else [])
    central = sum(mpo.central_num_params(i, o, bond_dim) for i, o in matrices)
    auxiliary = sum(mpo.mpo_num_params(i, o, bond_dim) for i, o in matrices) - central
    biases = (d_ff + d_model) if bias else 0
    routers = num_moe_layers * num_experts * d_model if router else 0
    switch_layers = num_moe_layers * num_experts * switch_expert_params(d_model, d_ff, gated, bias)
    mpoe_layers = num_moe_layers * (central + num_experts * (auxiliary + biases))
    switch_total, mpoe_total = other_params + switch_layers + routers, other_params + mpoe_layers + routers
    return {
        "switch_total": switch_total,
        "mpoe_total": mpoe_total,
        "ratio_total": switch_total / mpoe_total,
        "ratio_expert_layers": switch_layers / mpoe_layers,
        "central_per_layer": central,
        "auxiliary_per_expert": auxiliary,
    }


def format_table(counts: dict) -> str:
    width = max(map(len, counts))
    return "\n".join(f"  {k:<{width}}  {v:>14,}" for k, v in counts.items())


# Shapes of the paper's base models: (d_model, d_ff, FFN layers, other params = published total minus FFNs).
PAPER_SHAPES = {
    "t5-large": (1024, 4096, 48, 737_668_096 - 48 * 2 * 1024 * 4096),
    "gpt2": (768, 3072, 12, 124_439_808 - 12 * (2 * 768 * 3072 + 3072 + 768)),
    "gpt2-medium": (1024, 4096, 24, 354_823_168 - 24 * (2 * 1024 * 4096 + 4096 + 1024)),
}


def paper_table(experts=(8, 16, 32, 64), bonds=(None, 256, 64), every: int = 2) -> str:
    """mpoe_vs_switch_ratio for the paper's base models, MoE every `every` FFNs, the other FFNs dense."""
    lines = [
        f"  {'model':<12} {'E':>3} {'bond':>5} {'switch total':>15} {'mpoe total':>13} "
        f"{'ratio total':>11} {'ratio experts':>13}"
    ]
    for name, (d_model, d_ff, n_ffn, rest) in PAPER_SHAPES.items():
        bias = name.startswith("gpt2")
        moe_layers_n = n_ffn // every
        dense_ffns = (n_ffn - moe_layers_n) * switch_expert_params(d_model, d_ff, False, bias)
        for e in experts:
            for b in bonds:
                r = mpoe_vs_switch_ratio(d_model, d_ff, moe_layers_n, e, rest + dense_ffns, bond_dim=b, bias=bias)
                lines.append(
                    f"  {name:<12} {e:>3} {str(b or 'full'):>5} {r['switch_total']:>15,} {r['mpoe_total']:>13,} "
                    f"{r['ratio_total']:>11.2f} {r['ratio_expert_layers']:>13.2f}"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    print(paper_table())
