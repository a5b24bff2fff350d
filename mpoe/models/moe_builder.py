"""Config -> MoE layer: the registries of routers and dispatchers, and the one function that reads config.

`moe.router` and `moe.dispatcher` name a class in `ROUTERS` and `DISPATCHERS`; the
expert bank comes from `moe.kind` (`build_expert_bank`). A new router or dispatcher is
a class satisfying its Protocol (`mpoe.models.interfaces`), one line here and its name
in the config's choices (`mpoe.config`, which rejects any other name when the config
is built); `MoELayer` does not change.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from mpoe.config import MoEConfig
from mpoe.models.experts import build_expert_bank
from mpoe.models.moe_layer import MoELayer
from mpoe.models.router import TopKRouter
from mpoe.parallel.dispatch import AllToAllDispatcher
from mpoe.parallel.expert_placement import ExpertPlacement

# name -> class, called as cls(cfg, d_model)
ROUTERS: dict[str, type] = {"topk": TopKRouter}
# name -> class, called as cls(num_experts, placement, top_k=k)
DISPATCHERS: dict[str, type] = {"alltoall": AllToAllDispatcher}


def build_moe_layer(
    cfg: MoEConfig,
    d_model: int,
    d_ff: int,
    activation: str,
    placement: ExpertPlacement,
    dense: Optional[nn.Module] = None,
    bias: bool = True,
) -> MoELayer:
    """An MoE layer with the expert bank cfg.kind asks for ('switch' or 'mpoe'), upcycled from `dense` if given.

    `bias=False` builds experts without biases (T5's FFNs have none). The bank is built before the router:
    both draw from the global RNG, and this order is the one every rank and every recorded run follows.
    """
    # The bank's builder tags its per-expert parameters with the placement's group for DeepSpeed.
    experts = build_expert_bank(cfg, d_model, d_ff, activation, placement, dense=dense, bias=bias)
    router = ROUTERS[cfg.router](cfg, d_model)
    dispatcher = DISPATCHERS[cfg.dispatcher](cfg.num_experts, placement, top_k=cfg.top_k)
    return MoELayer(router, dispatcher, experts, placement)
