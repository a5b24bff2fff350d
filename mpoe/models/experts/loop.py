"""The `loop` backends: per-expert GEMMs over token counts read to the host.

Reading the counts is free on the CPU and a device-to-host sync on a GPU, which
is why `moe.expert_impl=auto` takes the grouped backend where its fast path runs.
Both run eagerly under torch.compile: traced, each new list of host counts would
be one more compilation (and past Dynamo's limit the block would silently run
eagerly anyway); the blocks around them still compile.

- Switch (`SwitchLoopBackend`): each weight by `loop_ops.per_expert_linear`.
- MPOE (`MPOELoopBackend`): per weight, rebuilding W costs about I*J*bond FLOPs and
  pushing an expert's tokens through the chain about tokens * (chain width) FLOPs;
  the cheaper one is chosen per expert by `mpo.matmul_costs` with the policy's
  memory cost. Rebuilt, each expert's W is built inside
  `loop_ops.per_expert_mpo_linear` from the chain's two halves (`mpo.split_halves`),
  with W_in's columns and W_out's rows reordered so that the orders cancel through h
  and no pass over W or grad W reorders it (`_rebuilt_ffn`).

The policy's constants are this backend's, tuned where memory traffic rather than
FLOPs decides (a CPU); they are not facts about MPOs in general.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mpoe.models import mpo
from mpoe.models.experts.backend import BankWeights, MPOBankWeights
from mpoe.models.experts.loop_ops import per_expert_linear, per_expert_mpo_linear
from mpoe.models.interfaces import TokenCounts


@dataclass(frozen=True)
class LoopPolicy:
    # One element written to memory costs about as much time as this many FLOPs: pure FLOP counts favour the
    # chain path, whose every step rewrites a tokens-sized state.
    memory_cost: float = mpo.MEMORY_COST
    # grad of the left MPO half: below this many column blocks c, a loop of accumulating GEMMs beats
    # one bmm + sum (the bmm writes c partial results).
    accumulate_max_blocks: int = 64


POLICY = LoopPolicy()


def host_counts(tokens: Tensor, tokens_per_expert: TokenCounts, num_local_experts: int) -> list[int]:
    """tokens_per_expert as host ints, checked against the local experts and the rows given."""
    raw = tokens_per_expert.tolist() if isinstance(tokens_per_expert, Tensor) else tokens_per_expert
    counts = [int(c) for c in raw]
    if len(counts) != num_local_experts or sum(counts) != tokens.shape[0]:
        raise ValueError(
            f"tokens_per_expert={counts} must have {num_local_experts} entries summing to {tokens.shape[0]} tokens"
        )
    return counts


class SwitchLoopBackend:
    """Independent stacked weights: one GEMM per expert and weight."""

    name = "loop"
    counts_on_device = False

    @staticmethod
    @torch.compiler.disable  # eager under torch.compile: see the module doc
    def forward(bank: BankWeights, tokens: Tensor, counts: TokenCounts) -> Tensor:
        counts = host_counts(tokens, counts, bank.num_local_experts)
        return bank.ffn(tokens, lambda x, name: _switch_linear(bank, x, counts, name))

    @staticmethod
    @torch.compiler.disable  # as forward
    def linear(bank: BankWeights, x: Tensor, counts: TokenCounts, name: str) -> Tensor:
        return _switch_linear(bank, x, host_counts(x, counts, bank.num_local_experts), name)


def _switch_linear(bank: BankWeights, x: Tensor, counts: list[int], name: str) -> Tensor:
    return per_expert_linear(x, counts, bank.bias(name), stacked=bank.stacked_weight(name))


class MPOELoopBackend:
    """MPO chains around a shared central tensor: each expert by its cheaper path, the whole FFN rebuilt at once
    when every expert with rows rebuilds W."""

    name = "loop"
    counts_on_device = False

    @staticmethod
    @torch.compiler.disable  # eager under torch.compile: see the module doc
    def forward(bank: MPOBankWeights, tokens: Tensor, counts: TokenCounts) -> Tensor:
        counts = host_counts(tokens, counts, bank.num_local_experts)
        if _all_rebuilt(bank, counts):
            return _rebuilt_ffn(bank, tokens, counts)
        return bank.ffn(tokens, lambda x, name: _mpoe_linear(bank, x, counts, name))

    @staticmethod
    @torch.compiler.disable  # as forward
    def linear(bank: MPOBankWeights, x: Tensor, counts: TokenCounts, name: str) -> Tensor:
        return _mpoe_linear(bank, x, host_counts(x, counts, bank.num_local_experts), name)


def _cheaper_path(n_tokens: int, chain: Sequence) -> str:
    """chain: an expert's local tensors in chain order, or their shapes. The dense path is the per-expert op's."""
    dense, chain_cost = mpo.matmul_costs(
        n_tokens, [getattr(t, "shape", t) for t in chain], weight_passes=1, memory_cost=POLICY.memory_cost
    )
    return "chain" if chain_cost < dense else "dense"


def _all_rebuilt(bank: MPOBankWeights, counts: list[int]) -> bool:
    """Whether every expert with tokens takes the rebuilt-W path for every weight (then `_rebuilt_ffn` runs)."""
    used = [n for n in counts if n > 0]
    if not used or bank.method == "chain":
        return False
    if bank.method == "dense":
        return True
    shapes = {name: [t.shape[-4:] for t in bank.stacked_chain(name)] for name in bank.weight_names()}
    return all(_cheaper_path(n, shapes[name]) == "dense" for name in shapes for n in used)


def _mpoe_linear(bank: MPOBankWeights, x: Tensor, counts: list[int], name: str) -> Tensor:
    """One weight of an MPOE bank, each expert by its cheaper path."""
    bias = bank.bias(name)
    chains = bank.expert_chains(name)
    methods = [bank.method if bank.method != "auto" else _cheaper_path(n, chains[e]) for e, n in enumerate(counts)]
    used = [e for e, n in enumerate(counts) if n > 0]
    if used and all(methods[e] == "dense" for e in used):
        left, right, perm = bank.halves(name)
        return per_expert_mpo_linear(
            x.index_select(1, perm), counts, bias, left, right, accumulate_max_blocks=POLICY.accumulate_max_blocks
        )
    outputs = [
        mpo.mpo_matmul(xe, chains[e], methods[e], None if bias is None else bias[e])
        for e, xe in enumerate(x.split(counts))
    ]
    return torch.cat(outputs)


def _rebuilt_ffn(bank: MPOBankWeights, x: Tensor, counts: list[int]) -> Tensor:
    """The FFN with every W rebuilt inside the per-expert op, permutations cancelled between W_in and W_out.

    W_in (and W_gate) are built transposed with their columns reordered by q
    (`mpo.split_halves`), so h comes out with its d_ff columns in q's order
    and b_in is reordered to match; W_out is built with its rows reordered by p.
    When W_out's cut of the d_ff factors mirrors W_in's, q == p and h feeds W_out
    as it is; otherwise one index_select over h maps q's order to p's. No pass
    over any full weight matrix or its gradient reorders it.
    """
    blocks = POLICY.accumulate_max_blocks
    left, right, q = bank.halves("w_in", transposed=True)  # M: rows = W_in columns q
    b_in = bank.bias("w_in")
    b_in = None if b_in is None else b_in.index_select(1, q)
    h = per_expert_mpo_linear(x, counts, b_in, left, right, transposed=True, accumulate_max_blocks=blocks)
    if bank.gated:
        left, right, q_gate = bank.halves("w_gate", transposed=True)
        if not torch.equal(q_gate, q):
            raise AssertionError("w_gate and w_in share their factors, so their column orders must agree")
        gate = per_expert_mpo_linear(x, counts, None, left, right, transposed=True, accumulate_max_blocks=blocks)
        h = bank.act(gate) * h
    else:
        h = bank.act(h)
    left, right, p = bank.halves("w_out")  # M: rows = W_out rows p
    where = torch.empty_like(q)
    where[q] = torch.arange(q.numel(), device=q.device)  # column of h holding d_ff index f
    index = where[p]
    if not torch.equal(index, torch.arange(index.numel(), device=index.device)):
        h = h.index_select(1, index)
    return per_expert_mpo_linear(h, counts, bank.bias("w_out"), left, right, accumulate_max_blocks=blocks)
