"""The MoE FFN block: route -> dispatch -> experts -> combine, as a drop-in for a dense FFN.

The layer assembles the parts it is given (a `Router`, a `Dispatcher` and an expert
bank, `mpoe.models.interfaces`) and knows none of their classes; `mpoe.models.moe_builder`
picks them from config. It returns a plain tensor of the input's shape, because it
replaces HF's `GPT2Block.mlp` and `T5LayerFF.DenseReluDense`, which expect one; the
router losses and counts of the last forward are left in `self.stats` for the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from mpoe.models.interfaces import Dispatcher, ExpertBankLike, Router
from mpoe.parallel.expert_placement import ExpertPlacement, expert_placement


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
    """Router, dispatcher and expert bank as one FFN block.

    DeepSpeed contract kept: the engine's `isinstance(module, MoE)`, with the attributes `_deepspeed_attributes` sets.

    What that check buys: the engine then reduces the parameters tagged `allreduce=False`
    (the bank's per-expert ones) over the expert-data-parallel group named
    `expert_group_name` instead of averaging them over the whole world, splits them into
    their own ZeRO / optimizer parameter groups, calls `set_deepspeed_parallelism`, and saves
    and loads them per expert in its checkpoints. `MoE.__init__` is not called: it would build
    DeepSpeed's own gate and padded einsum experts (parameters, and draws from the RNG) that
    this layer does not use.

    The expert bank is registered as `bank`, not `experts`: the engine's MoE checkpoint
    code treats every state-dict key containing "expert" as a DeepSpeed
    `deepspeed_moe.experts.deepspeed_experts.<i>` parameter and fails on any other.
    """

    def __init__(self, router: Router, dispatcher: Dispatcher, experts: ExpertBankLike, placement: ExpertPlacement):
        nn.Module.__init__(self)
        parts = (dispatcher.num_experts, dispatcher.num_local_experts)
        if parts != (experts.num_experts, experts.num_local_experts):
            raise ValueError(
                f"dispatcher routes to {parts[1]} local of {parts[0]} experts, the expert bank holds "
                f"{experts.num_local_experts} of {experts.num_experts}: build both for the same moe.num_experts"
            )
        self.router = router  # registered before the bank: the parameters' order is the optimizer's layout
        self.bank = experts
        self.dispatcher = dispatcher
        self._deepspeed_attributes(experts, placement)
        self.stats: Optional[MoEStats] = None

    def _deepspeed_attributes(self, experts: ExpertBankLike, placement: ExpertPlacement) -> None:
        """What DeepSpeed's engine reads of an MoE module, in place of what MoE.__init__ would set."""
        self.num_experts = experts.num_experts  # engine init: counts the experts of each MoE layer
        self.num_local_experts = experts.num_local_experts  # MoE checkpoints: experts this rank saves and loads
        self.expert_group_name = placement.group_name  # MoE checkpoints: whose expert-parallel rank names the files
        self.ep_size = placement.ep_size  # set_deepspeed_parallelism: the groups to make sure of

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine at init (MoE's would reach for DeepSpeed's gate): make sure DeepSpeed's expert
        groups for ep_size exist, since the engine reduces expert gradients over them."""
        expert_placement(self.ep_size)

    def forward(self, hidden: Tensor) -> Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        routed = self.router(tokens)
        expert_input, tokens_per_local_expert = self.dispatcher.dispatch(
            tokens,
            routed.probs,
            routed.routing_map,
            dropless=routed.dropless,
            counts_on_device=self.bank.counts_on_device,
        )
        expert_output = self.bank(expert_input, tokens_per_local_expert)
        output = self.dispatcher.combine(expert_output)

        self.stats = MoEStats(
            routed.aux_loss, routed.z_loss, routed.tokens_per_expert, routed.tokens_dropped, routed.entropy
        )
        return output.view(hidden.shape)
