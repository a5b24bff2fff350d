"""Expert-parallel token dispatch: sort tokens by expert, all-to-all them to the expert's rank, and back.

Permutation-based, as in Megatron-Core's all-to-all dispatcher, rather than the
padded one-hot einsum of GShard/DeepSpeed: a token is copied once per expert it is
routed to, never padded to a capacity, so dropless routing and skewed loads cost
only the tokens actually routed. Every step is differentiable: the permutation is
an index_select, the combine a gate-weighted index_add (Megatron's `unpermute`
arithmetic, `combine.py`), and the all-to-all is torch's functional collective with autograd
(`all_to_all_single_autograd`, as torchtitan's MoE uses): its backward sends the
gradients back along the reverse splits, over NCCL or gloo, uneven splits included.

Order of tokens at each stage, for P ranks with L local experts each:
  permute:      by global expert e = rank * L + local expert   (so by destination rank)
  all-to-all:   by (source rank, local expert)
  re-sort:      by (local expert, source rank): what the expert bank wants
and the combine path walks the same stages backwards.

Host syncs. The (expert, token) pairs are listed by `torch.nonzero_static`, whose
output length is given, not read from the device:
- ep_size 1 on CUDA (top_k known): the length is tokens * top_k, the most a top-k
  router can keep. Pairs dropped for capacity leave rows at the end; they are
  given to the last local expert with gate weight 0, so they change no output and
  no gradient (a dropless step has none). Permutation, counts and offsets stay on
  the device and nothing is read back. Padding rows hold zeros, not a copy of a
  token: the expert's output for zeros is finite, where a copy of a token could
  overflow (fp16) in an expert the router did not choose for it, and 0 * inf is a
  NaN in that token's output and in the expert's weight gradients. The zero row
  costs a copy of the tokens, made only where the router may drop (a capacity).
- ep_size > 1: the uneven all-to-all takes its split sizes as host ints, so the
  per-expert counts (sent and received) are read to the host once per layer, in one
  small device-to-host copy; everything else follows from those numbers.
- ep_size 1 on the CPU: the kept count is read (free there) and no row is padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from mpoe.parallel.combine import gate_weighted_sum
from mpoe.parallel.expert_placement import ExpertPlacement


@dataclass
class CommStats:
    """What the last dispatch + combine put through the all-to-all (both directions)."""

    routed: Union[int, Tensor] = 0  # kept (token, expert) pairs; a device tensor until read, so reading is lazy
    bytes_sent: int = 0  # token payload handed to the all-to-all, dispatch + combine (0 when ep_size=1)

    @property
    def routed_tokens(self) -> int:
        """(token, expert) copies this rank sent out: the minimum any dispatcher must send (reads the device)."""
        return int(self.routed)


def _all_to_all(rows: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """rows, cut by input_splits, to the group's ranks; returns what they sent, cut by output_splits.

    The result is waited for at once: the next op needs it, and an AsyncCollectiveTensor
    would otherwise wrap every op applied to it until the first read."""
    return wait_tensor(all_to_all_single_autograd(rows, output_splits, input_splits, group))


def _sort_chunks(x: Tensor, sizes: list[int], order: list[int]) -> Tensor:
    """x's consecutive chunks (host sizes) concatenated in `order` (differentiable, no sync)."""
    chunks = torch.split(x, sizes)
    return torch.cat([chunks[i] for i in order])


class AllToAllDispatcher:
    """The `Dispatcher` that `moe.dispatcher=alltoall` picks; stateful between `dispatch` and `combine` of one
    forward (like Megatron's dispatchers). moe.num_experts is a multiple of ep_size (mpoe.config checks it).

    top_k: the router's k, which bounds the kept pairs by tokens * k and so lets
    ep_size 1 on CUDA dispatch without reading anything back (None: read the count).
    sync_free: force that path on (tests run it on the CPU) or off; None = where the expert bank takes its counts
    on the device (`dispatch`'s counts_on_device: the grouped backend, which `auto` picks for bf16 on sm90+).
    """

    def __init__(
        self,
        num_experts: int,
        placement: ExpertPlacement,
        top_k: Optional[int] = None,
        sync_free: Optional[bool] = None,
    ):
        self.num_experts = num_experts
        self.placement = placement
        self.ep_size = placement.ep_size
        self.num_local_experts = num_experts // placement.ep_size
        self.top_k, self.sync_free = top_k, sync_free
        self.stats = CommStats()
        self._saved: Optional[dict] = None

    def _pairs(self, routing_map: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """(token index, global expert, is-kept) of each dispatch row, expert-major; rows past the kept pairs
        are padding (token -1, last expert)."""
        pairs = torch.nonzero_static(routing_map.t(), size=num_rows, fill_value=-1)
        expert, token = pairs.unbind(1)
        kept = expert >= 0
        return token, torch.where(kept, expert, self.num_experts - 1), kept

    def dispatch(
        self, tokens: Tensor, probs: Tensor, routing_map: Tensor, dropless: bool = False, counts_on_device: bool = False
    ) -> tuple[Tensor, Tensor]:
        """tokens [N, d], routing_map [N, E] -> (rows for this rank's experts sorted by local expert, counts [L]).

        counts is an int64 tensor on the rows' device (summing to the rows given). dropless: the router kept
        all top_k pairs of every token (no capacity), so the sync-free path has no padding rows to provide for.
        counts_on_device: the expert bank reads no count on the host, so at ep_size 1 neither does this."""
        tokens_per_expert = routing_map.sum(dim=0)
        self.stats = CommStats(routed=tokens_per_expert.sum())
        if self.placement.ep_group is None or self.ep_size == 1:
            sync_free = self.sync_free if self.sync_free is not None else counts_on_device
            return self._dispatch_local(tokens, probs, routing_map, tokens_per_expert, dropless, sync_free)
        return self._dispatch_all_to_all(tokens, probs, routing_map, tokens_per_expert)

    def _dispatch_local(
        self, tokens, probs, routing_map, tokens_per_expert, dropless: bool, sync_free: bool
    ) -> tuple[Tensor, Tensor]:
        if sync_free and self.top_k is not None:
            num_rows = tokens.shape[0] * self.top_k
            return self._permute_local(tokens, probs, routing_map, tokens_per_expert, num_rows, padded=not dropless)
        return self._dispatch_local_counted(tokens, probs, routing_map, tokens_per_expert)

    # The host-read paths below run eagerly under torch.compile (the blocks around them still compile): traced,
    # every new host count or split list would be a recompilation, until Dynamo's limit turns the rest eager.
    @torch.compiler.disable
    def _dispatch_local_counted(self, tokens, probs, routing_map, tokens_per_expert) -> tuple[Tensor, Tensor]:
        num_rows = int(tokens_per_expert.sum())  # the CPU path: reading it is free there
        return self._permute_local(tokens, probs, routing_map, tokens_per_expert, num_rows, padded=False)

    def _permute_local(
        self, tokens, probs, routing_map, tokens_per_expert, num_rows: int, padded: bool
    ) -> tuple[Tensor, Tensor]:
        token, expert, kept = self._pairs(routing_map, num_rows)
        self._save(tokens, probs, token, expert, kept)
        counts = tokens_per_expert.clone()
        counts[-1] += num_rows - tokens_per_expert.sum()  # padding rows (dropped pairs) go to the last expert
        if padded:  # padding rows read a row of zeros (one copy of the tokens; see the module doc)
            with_zeros = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])])
            return with_zeros.index_select(0, torch.where(kept, token, tokens.shape[0])), counts
        return tokens.index_select(0, token.clamp_min(0)), counts  # (no -1 here: rows are kept pairs)

    @torch.compiler.disable
    def _dispatch_all_to_all(self, tokens, probs, routing_map, tokens_per_expert) -> tuple[Tensor, Tensor]:
        P, L, group = self.ep_size, self.num_local_experts, self.placement.ep_group
        sent_counts = tokens_per_expert.view(P, L)  # [destination rank, its local expert]
        received_counts = torch.empty_like(sent_counts)  # [source rank, my local expert]
        dist.all_to_all_single(received_counts, sent_counts.contiguous(), group=group)
        # The uneven all-to-all wants its split sizes on the host: one device-to-host copy per layer.
        host = torch.cat([sent_counts.flatten(), received_counts.flatten()]).tolist()
        sent, received = host[: P * L], host[P * L :]
        input_splits = [sum(sent[r * L : (r + 1) * L]) for r in range(P)]
        output_splits = [sum(received[r * L : (r + 1) * L]) for r in range(P)]
        token, expert, kept = self._pairs(routing_map, sum(input_splits))
        self._save(tokens, probs, token, expert, kept)
        received_rows = _all_to_all(tokens.index_select(0, token), output_splits, input_splits, group)
        by_source = received  # rows' chunk sizes: (source rank r, local expert e) at index r * L + e
        by_expert = [r * L + e for e in range(L) for r in range(P)]
        self._saved.update(
            input_splits=input_splits,
            output_splits=output_splits,
            resorted_sizes=[by_source[i] for i in by_expert],
            restore_order=[e * P + r for r in range(P) for e in range(L)],
        )
        row_bytes = tokens.shape[-1] * tokens.element_size()
        sent_rows, recv_rows = sum(input_splits), sum(output_splits)
        self.stats.routed = sent_rows
        self.stats.bytes_sent = (sent_rows + recv_rows) * row_bytes
        rows = _sort_chunks(received_rows, by_source, by_expert)
        return rows, received_counts.sum(dim=0)

    @torch.compiler.disable
    def _return_all_to_all(self, expert_output: Tensor, saved: dict) -> Tensor:
        """Expert outputs back to the ranks their tokens came from, in the order those sent them."""
        by_source = _sort_chunks(expert_output, saved["resorted_sizes"], saved["restore_order"])
        return _all_to_all(by_source, saved["input_splits"], saved["output_splits"], self.placement.ep_group)

    def _save(self, tokens: Tensor, probs: Tensor, token: Tensor, expert: Tensor, kept: Tensor) -> None:
        # Each row's gate weight, 0 for padding rows, which add their (finite) output times 0 to token 0;
        # gradients reach probs through the gather.
        token = token.clamp_min(0)
        row_probs = torch.where(kept, probs[token, expert], probs.new_zeros(()))
        self._saved = dict(shape=tokens.shape, token=token, row_probs=row_probs)

    def combine(self, expert_output: Tensor) -> Tensor:
        """Expert outputs (order of `dispatch`'s result) -> [N, d]: each token's gate-weighted sum over its experts."""
        saved, self._saved = self._saved, None
        if saved is None:
            raise RuntimeError("combine() called without a matching dispatch()")
        if "input_splits" in saved:
            expert_output = self._return_all_to_all(expert_output, saved)
        return gate_weighted_sum(
            expert_output, saved["row_probs"], saved["token"], saved["shape"], one_row_per_token=self.top_k == 1
        )
