"""How an MoE layer's experts compute, in one package.

- `banks.py`: the weights. `SwitchExperts` (independent dense experts) and
  `MPOEExperts` (experts sharing one MPO central tensor per matrix), built by
  `build_expert_bank`; `resolve_expert_backends` chooses every bank's backend once
  the model is placed on its device.
- `backend.py`: what a bank gives its backend and what a backend computes from it.
- `registry.py`: `{bank kind: {implementation: backend}}` and the rule for `moe.expert_impl=auto`.
- `loop.py` with `loop_ops.py`: per-expert GEMMs over host counts (the CPU's backend).
- `grouped.py`: one grouped GEMM per weight matrix, counts on the device (the GPU's),
  with `weight_recompute.py` (`moe.recompute_mpo_weights`).
"""

from mpoe.models.experts.banks import (
    DenseFFN,
    ExpertBank,
    MPOEExperts,
    SwitchExperts,
    activation_fn,
    build_expert_bank,
    resolve_expert_backends,
)

__all__ = [
    "DenseFFN",
    "ExpertBank",
    "MPOEExperts",
    "SwitchExperts",
    "activation_fn",
    "build_expert_bank",
    "resolve_expert_backends",
]
