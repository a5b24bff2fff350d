"""Expert-parallel token dispatch: sort tokens by expert, all-to-all them to the expert's rank, and back.

Permutation-based, as in Megatron-Core's all-to-all dispatcher, rather than the
padded one-hot einsum of GShard/DeepSpeed: a token is copied once per expert it is
routed to, never padded to a capacity, so dropless routing and skewed loads cost
only the tokens actually routed. Every step is differentiable: `moe_utils.permute`
/ `unpermute` are index ops, and torch.distributed.nn's all_to_all_single sends the
gradients back along the reverse splits (it works over gloo with uneven splits).

Order of tokens at each stage, for P ranks with L local experts each:
  permute:      by global expert e = rank * L + local expert   (so by destination rank)
  all-to-all:   by (source rank, local expert)
  re-sort:      by (local expert, source rank): what the expert bank wants
and the combine path walks the same stages backwards.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from torch import Tensor
from torch.distributed.nn.functional import all_to_all_single

from mpoe.parallel.groups import ExpertGroups

# torch 2.13 deprecates torch.distributed.nn's all_to_all_single in favour of
# torch.distributed._functional_collectives, a private module. We keep the public
# one (autograd over uneven splits on gloo and nccl, tested) and silence only its notice.
warnings.filterwarnings(
    "ignore", message="torch.distributed.nn.functional.all_to_all_single is deprecated", category=FutureWarning
)


@dataclass
class CommStats:
    """What the last dispatch + combine put through the all-to-all (both directions)."""

    routed_tokens: int = 0  # (token, expert) copies this rank sent out: the minimum any dispatcher must send
    bytes_sent: int = 0  # token payload handed to the all-to-all, dispatch + combine (0 when ep_size=1)
    bytes_to_peers: int = 0  # the part of bytes_sent that left this rank


class AllToAllDispatcher:
    """Stateful between `dispatch` and `combine` of one forward (like Megatron's dispatchers)."""

    def __init__(self, num_experts: int, groups: ExpertGroups):
        if num_experts % groups.ep_size:
            raise ValueError(f"parallel.ep_size={groups.ep_size} is invalid: must divide moe.num_experts={num_experts}")
        self.num_experts = num_experts
        self.groups = groups
        self.ep_size = groups.ep_size
        self.num_local_experts = num_experts // groups.ep_size
        self.stats = CommStats()
        self._saved: Optional[dict] = None

    def dispatch(self, tokens: Tensor, probs: Tensor, routing_map: Tensor) -> tuple[Tensor, list[int]]:
        """tokens [N, d], routing_map [N, E] -> (tokens for this rank's experts sorted by local expert, counts)."""
        permuted, _, sorted_indices = moe_utils.permute(tokens, routing_map)
        tokens_per_expert = routing_map.sum(dim=0).long()
        self._saved = dict(shape=tokens.shape, probs=probs, routing_map=routing_map, sorted_indices=sorted_indices)
        row_bytes = tokens.shape[-1] * tokens.element_size()
        self.stats = CommStats(routed_tokens=int(tokens_per_expert.sum()))
        if self.groups.ep_group is None or self.ep_size == 1:
            return permuted, tokens_per_expert.tolist()

        P, L, group = self.ep_size, self.num_local_experts, self.groups.ep_group
        sent_counts = tokens_per_expert.view(P, L)  # [destination rank, its local expert]
        received_counts = torch.empty_like(sent_counts)  # [source rank, my local expert]
        dist.all_to_all_single(received_counts, sent_counts.contiguous(), group=group)
        input_splits = sent_counts.sum(dim=1).tolist()
        output_splits = received_counts.sum(dim=1).tolist()
        received = all_to_all_single(
            tokens.new_empty(sum(output_splits), tokens.shape[-1]),
            permuted.contiguous(),
            output_splits,
            input_splits,
            group=group,
        )

        by_expert, _ = moe_utils.sort_chunks_by_idxs(
            received, received_counts.flatten(), torch.arange(P * L).view(P, L).t().flatten()
        )
        self._saved.update(
            input_splits=input_splits,
            output_splits=output_splits,
            resorted_counts=received_counts.t().flatten(),
            restore_order=torch.arange(L * P).view(L, P).t().flatten(),
        )
        me = self.groups.ep_rank
        sent_rows, recv_rows = sum(input_splits), sum(output_splits)
        self.stats.bytes_sent = (sent_rows + recv_rows) * row_bytes
        self.stats.bytes_to_peers = (sent_rows - input_splits[me] + recv_rows - output_splits[me]) * row_bytes
        return by_expert, received_counts.sum(dim=0).tolist()

    def combine(self, expert_output: Tensor) -> Tensor:
        """Expert outputs (order of `dispatch`'s result) -> [N, d]: each token's gate-weighted sum over its experts."""
        saved, self._saved = self._saved, None
        if saved is None:
            raise RuntimeError("combine() called without a matching dispatch()")
        if "input_splits" in saved:
            by_source, _ = moe_utils.sort_chunks_by_idxs(
                expert_output, saved["resorted_counts"], saved["restore_order"]
            )
            expert_output = all_to_all_single(
                expert_output.new_empty(sum(saved["input_splits"]), expert_output.shape[-1]),
                by_source.contiguous(),
                saved["input_splits"],
                saved["output_splits"],
                group=self.groups.ep_group,
            )
        return moe_utils.unpermute(
            expert_output,
            saved["sorted_indices"],
            saved["shape"],
            probs=saved["probs"],
            routing_map=saved["routing_map"],
        )
