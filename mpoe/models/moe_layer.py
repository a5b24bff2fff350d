"""The MoE FFN block: route -> dispatch -> experts -> combine, as a drop-in for a dense FFN.

It returns a plain tensor of the input's shape, because it replaces HF's
`GPT2Block.mlp` and `T5LayerFF.DenseReluDense`, which expect one; the router losses
and counts of the last forward are left in `self.stats` for the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from mpoe.config import MoEConfig, check_ep_divides_experts
from mpoe.models.experts import ExpertBank, build_expert_bank
from mpoe.models.router import TopKRouter
from mpoe.parallel.dispatch import AllToAllDispatcher
from mpoe.parallel.groups import ExpertGroups, expert_groups


@dataclass
class MoEStats:
    aux_loss: Tensor  # scalar with grad, aux_loss_coef applied (this rank's tokens)
    z_loss: Tensor  # scalar with grad, z_loss_coef applied (this rank's tokens)
    # The statistics below are this rank's, kept on the device; the training loop sums them over
    # the world once per logged step instead of synchronising in every layer's forward.
    tokens_per_expert: Tensor  # [E] long, this rank's tokens routed to each global expert, before dropping
    tokens_dropped: Tensor  # scalar long, (token, expert) pairs this rank dropped for capacity
    router_entropy: Tensor  # scalar, mean entropy of the routing distribution over this rank's tokens


class MoELayer(MoE):
    """Our MoE layer, dressed as a `deepspeed.moe.layer.MoE` for the engine.

    Why subclass MoE without calling its __init__: DeepSpeed's engine finds MoE layers
    with `isinstance(module, MoE)`; only then does it reduce parameters marked
    `allreduce=False` over the expert-data-parallel group named `group_name` (rather
    than averaging them with the dense parameters over the whole world), build the
    ZeRO MoE parameter groups, and call `set_deepspeed_parallelism`. MoE.__init__ would
    build DeepSpeed's own gate and padded einsum experts, so we set by hand only the
    attributes the engine reads: num_experts, num_local_experts, ep_size,
    expert_group_name, enable_expert_tensor_parallelism and use_residual.

    The expert bank is registered as `bank`, not `experts`: the engine's MoE checkpoint
    code treats every state-dict key containing "expert" as a DeepSpeed
    `deepspeed_moe.experts.deepspeed_experts.<i>` parameter and fails on any other.
    """

    def __init__(self, cfg: MoEConfig, d_model: int, experts: ExpertBank, groups: ExpertGroups):
        nn.Module.__init__(self)
        check_ep_divides_experts(groups.ep_size, cfg.num_experts)
        if experts.num_experts != cfg.num_experts or experts.num_local_experts != cfg.num_experts // groups.ep_size:
            raise ValueError(
                f"expert bank holds {experts.num_local_experts} of {experts.num_experts} experts; "
                f"moe.num_experts={cfg.num_experts} over parallel.ep_size={groups.ep_size} needs "
                f"{cfg.num_experts // groups.ep_size} of {cfg.num_experts}"
            )
        self.num_experts = cfg.num_experts
        self.num_local_experts = cfg.num_experts // groups.ep_size
        self.ep_size = groups.ep_size
        self.expert_group_name = groups.name
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

        self.groups = groups
        self.router = TopKRouter(cfg, d_model)
        self.bank = experts
        self.bank.mark_expert_params(groups.name)
        self.dispatcher = AllToAllDispatcher(cfg.num_experts, groups, top_k=cfg.top_k)
        self.stats: Optional[MoEStats] = None

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine at init: the groups must exist; the dispatcher already holds them."""
        expert_groups(self.ep_size)

    def forward(self, hidden: Tensor) -> Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        routed = self.router(tokens)
        dropless = self.router.capacity_factor() is None
        expert_input, tokens_per_local_expert = self.dispatcher.dispatch(
            tokens, routed.probs, routed.routing_map, dropless=dropless
        )
        expert_output = self.bank(expert_input, tokens_per_local_expert)
        output = self.dispatcher.combine(expert_output)

        self.stats = MoEStats(
            routed.aux_loss, routed.z_loss, routed.tokens_per_expert, routed.tokens_dropped, routed.entropy
        )
        return output.view(hidden.shape)


def build_moe_layer(
    cfg: MoEConfig,
    d_model: int,
    d_ff: int,
    activation: str,
    groups: ExpertGroups,
    dense: Optional[nn.Module] = None,
    bias: bool = True,
) -> MoELayer:
    """An MoE layer with the expert bank cfg.kind asks for ('switch' or 'mpoe'), upcycled from `dense` if given.

    `bias=False` builds experts without biases (T5's FFNs have none)."""
    return MoELayer(
        cfg, d_model, build_expert_bank(cfg, d_model, d_ff, activation, groups, dense=dense, bias=bias), groups
    )
