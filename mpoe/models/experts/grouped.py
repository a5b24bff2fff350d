"""The `grouped` backend: all local experts at once, one grouped GEMM per weight matrix, no host sync.

Tokens arrive sorted by local expert with their per-expert counts as a device
tensor; the offsets of each expert's rows are their int32 cumulative sum,
computed on the device, and each weight matrix is applied to all rows by one
`torch.nn.functional.grouped_mm` (`torch._grouped_mm` where only that exists) over
the stacked weights [L, I, J], as torchtitan's MoE does and as Megatron-Core's
GroupedMLP does with grouped_gemm's `gmm`. Autograd through grouped_mm gives grad x
and the stacked grad W; experts with no rows get zero gradients. Biases are added
per row as one_hot(row's expert) @ bias, the one-hot built by comparing row numbers
with the offsets (`add_bias`): no sync, and a GEMM rather than atomics in backward.

What grouped_mm takes, and what happens otherwise:
- CUDA: a fused kernel for bf16 on compute capability 9.0 and up (`fast_path`).
  Other dtypes or GPUs go to torch's own fallback, which copies the offsets to the
  host and loops over groups: correct, but one sync per call, like the loop backend;
  `moe.expert_impl=auto` therefore takes this backend only on the fast path.
- CPU: float32 / bfloat16 / float16 (a loop inside the op), not float64.
- Both: every row stride 16-byte aligned (d_model and d_ff * element size
  multiples of 16), and at least one row.
Where it cannot run (float64, unaligned sizes) this backend hands the call to
the loop backend's op (`loop_ops.per_expert_linear`, counts read to the host): a
padded `bmm` would need the largest count on the host too, so it would sync as
well and move more bytes. Zero rows: a plain matmul with the experts' summed
weight, which gives every parameter its (zero) gradient without a grouped op.

MPOE: the bank's `grouped_weight` rebuilds every local expert's W from its MPO
chain in one batched product per weight matrix (auxiliaries [L, ...] around the
shared central tensor, which broadcasts), in the parameters' dtype; the grouped
GEMM then runs as for a Switch bank. Autograd sums the central tensor's gradient
over the experts and gives the auxiliaries' gradients stacked: no per-expert loop
anywhere. The layout is the one that moves the fewest elements besides the GEMMs
(`mpo.cheapest_layout`): W in order (`mpo.contract`, whose reorder is a pass over
all of W and of grad W), or, with few rows per expert, W with its rows or columns
permuted as one broadcast product writes them (`mpo.permuted_product`, no pass over
W) and the rows' input or output columns permuted to match (`in_perm`, `out_perm`:
a gather and a scatter of N x width, each the other's backward).
- Memory: the rebuilt W of all local experts, L*I*J per matrix, exactly a Switch
  bank's weights, lives from forward to backward (grouped_mm keeps it for grad x),
  plus the chain's two halves (at full bond the larger half is about as big as W)
  and, in the permuted layouts, the copy of the left half that the product
  broadcasts; in backward a grad W of the same L*I*J transiently. The parameters
  stay MPO-sized. `moe.recompute_mpo_weights` keeps none of it from forward and
  rebuilds W in backward instead (`weight_recompute.py`).
- Time: the rebuild is ~2*L*I*J*bond FLOPs per matrix against 2*N*I*J for the
  GEMM over N rows, so it costs about bond / (rows per expert) of the GEMM, plus
  writing W once.
- Pushing tokens through the chain instead (`mpo.apply_chain`, the loop backend's
  'chain' path) costs about N * sum_k (width of step k) and never forms W: it
  wins only when an expert has fewer rows than about the bond dimension (decoding
  one token at a time), and it is a sequence of small per-expert ops, launch-bound
  on a GPU; training batches are far past that point, so this backend always rebuilds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from mpoe.models.experts.backend import BankWeights, GroupedWeight
from mpoe.models.experts.loop_ops import per_expert_linear
from mpoe.models.experts.weight_recompute import with_weights_recomputed
from mpoe.models.interfaces import TokenCounts

GROUPED_MM: Optional[Callable] = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Under torch.compile, grouped_mm's shape function (the "meta" kernel every traced call goes through) takes bf16
# only, whatever the device's kernel takes; other dtypes take the fallback below, a graph break.
_COMPILED_GROUPED_MM_DTYPES = (torch.bfloat16,)
_ALIGN_BYTES = 16
_FAST_PATH_CAPABILITY = (9, 0)  # the first compute capability with grouped_mm's fused bf16 kernel


def fast_path(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs its fused kernel on `device` in `dtype`, rather than a fallback that syncs per call."""
    return (
        GROUPED_MM is not None
        and device.type == "cuda"
        and dtype == torch.bfloat16
        and tuple(torch.cuda.get_device_capability(device)) >= _FAST_PATH_CAPABILITY
    )


def _aligned(t: Tensor, *sizes: int) -> bool:
    # Under torch.compile a traced tensor has no address yet: the check is left to the compiled kernel.
    address_ok = torch.compiler.is_compiling() or t.data_ptr() % _ALIGN_BYTES == 0
    return address_ok and all(s * t.element_size() % _ALIGN_BYTES == 0 for s in sizes)


def grouped_mm_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether grouped_mm takes rows x [N, I] and weights [L, I, J] (shapes and dtypes only: no sync)."""
    return grouped_mm_takes_rows(x) and weight.dtype == x.dtype and _aligned(weight, weight.shape[1], weight.shape[2])


def grouped_mm_takes_rows(x: Tensor) -> bool:
    """The rows' half of `grouped_mm_fits`: what a weight of x's dtype, made for x, leaves to check."""
    return (
        GROUPED_MM is not None
        and x.dtype in (_COMPILED_GROUPED_MM_DTYPES if torch.compiler.is_compiling() else _GROUPED_MM_DTYPES)
        and x.shape[0] > 0
        and x.is_contiguous()
        and _aligned(x, x.shape[1])
    )


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects
    stride-0 gradients (what `out.sum().backward()` hands it) and `.contiguous()` is free when it already is."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class RowSpans:
    """Each local expert's span of consecutive rows, as counts on the device, and what the grouped ops derive from
    them (once per forward)."""

    def __init__(self, counts: Tensor, num_rows: int):
        self.counts, self.num_rows = counts, num_rows
        self.offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # offsets[e] = end of expert e's rows
        self._one_hot: dict[torch.dtype, Tensor] = {}

    def one_hot(self, dtype: torch.dtype) -> Tensor:
        """[N, L]: 1 where row n belongs to expert e, built from the offsets by comparison (no sync)."""
        if dtype not in self._one_hot:
            rows = torch.arange(self.num_rows, device=self.counts.device).unsqueeze(1)
            ends = self.offsets.unsqueeze(0)
            self._one_hot[dtype] = ((rows < ends) & (rows >= ends - self.counts.unsqueeze(0))).to(dtype)
        return self._one_hot[dtype]


def add_bias(out: Tensor, spans: RowSpans, bias: Tensor) -> Tensor:
    """out + bias[expert of row]. As one_hot @ bias (one addmm) rather than an index: its backward is the
    GEMM one_hot^T @ grad instead of an index_add whose atomics all rows of an expert aim at one bias row."""
    return torch.addmm(out, spans.one_hot(out.dtype), bias)


class _PermuteColumns(torch.autograd.Function):
    """x's columns reordered: gather (out[:, r] = x[:, order[r]]) or scatter (out[:, order[r]] = x[:, r]).
    Backward is the other one: a permutation's gradient is the inverse permutation, not an index_add."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, scatter: bool) -> Tensor:
        ctx.save_for_backward(order)
        ctx.scatter = scatter
        return _permute_columns(x, order, scatter)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (order,) = ctx.saved_tensors
        return _permute_columns(grad, order, not ctx.scatter), None, None


def _permute_columns(x: Tensor, order: Tensor, scatter: bool) -> Tensor:
    return torch.empty_like(x).index_copy_(1, order, x) if scatter else x.index_select(1, order)


def _matmul_in_layout(x: Tensor, spans: RowSpans, weight: GroupedWeight) -> tuple[Tensor, Optional[Tensor]]:
    """The grouped GEMM in the weight's layout: its output, and the order its columns are to be put in."""
    if weight.in_perm is not None:
        x = _PermuteColumns.apply(x, weight.in_perm, False)
    return _grouped_matmul(x, spans, weight.matrix.to(x.dtype)), weight.out_perm  # .to: e.g. fp32 masters, autocast


def _in_order_plus_bias(out: Tensor, out_perm: Optional[Tensor], spans: RowSpans, bias: Optional[Tensor]) -> Tensor:
    if out_perm is not None:
        out = _PermuteColumns.apply(out, out_perm, True)
    if bias is None:
        return out
    bias = bias.to(out.dtype)
    return out + bias.sum(0) if out.shape[0] == 0 else add_bias(out, spans, bias)


def _grouped_matmul(x: Tensor, spans: RowSpans, weight: Tensor) -> Tensor:
    if x.shape[0] == 0:
        return x @ weight.sum(0)  # no rows: every weight still gets a (zero) gradient, as in the loop backend
    if not grouped_mm_fits(x, weight):
        return _loop_fallback(x, spans.counts, weight)  # float64 / odd sizes: see module doc
    if stray_gradients_for_idle_experts(x):
        weight = _IdleExpertsGetZeroGrad.apply(weight, spans.counts)
    return _ContiguousGrad.apply(GROUPED_MM(x, weight, offs=spans.offsets))


def stray_gradients_for_idle_experts(x: Tensor) -> bool:
    """Whether grouped_mm on x's device gives groups without rows nonzero weight gradients: reported on Blackwell
    (compute capability 10 and later; pytorch#172439), where Hopper's kernel gives zeros."""
    return x.device.type == "cuda" and _blackwell_or_later(x.get_device())


@torch.compiler.assume_constant_result  # a property of the GPU: no guard, no graph break under torch.compile
def _blackwell_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 10


class _IdleExpertsGetZeroGrad(torch.autograd.Function):
    """Identity on the stacked weights [L, I, J]; backward zeroes the gradient of experts that had no rows (one pass
    over grad W, on the GPUs that need it)."""

    @staticmethod
    def forward(ctx, weight: Tensor, counts: Tensor) -> Tensor:
        ctx.save_for_backward(counts)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (counts,) = ctx.saved_tensors
        return grad * (counts > 0).to(grad.dtype)[:, None, None], None


@torch.compiler.disable  # eager under torch.compile: traced, every new list of host counts would recompile
def _loop_fallback(x: Tensor, counts: Tensor, weight: Tensor) -> Tensor:
    return per_expert_linear(x, counts.tolist(), None, stacked=weight)


def device_counts(tokens: Tensor, tokens_per_expert: TokenCounts, num_local_experts: int) -> Tensor:
    """Counts as an integer tensor on the tokens' device. Only the length is checked: checking the sum
    against the rows would read the counts to the host (the dispatcher builds them from the same rows)."""
    counts = torch.as_tensor(tokens_per_expert, device=tokens.device)
    if counts.dim() != 1 or counts.shape[0] != num_local_experts or counts.is_floating_point():
        raise ValueError(
            f"tokens_per_expert must be {num_local_experts} integer counts (one per local expert), "
            f"got shape {tuple(counts.shape)} {counts.dtype}"
        )
    return counts


class GroupedBackend:
    """Every bank kind: the bank hands each weight as a `GroupedWeight`, one grouped GEMM applies it."""

    name = "grouped"
    counts_on_device = True

    @staticmethod
    def forward(bank: BankWeights, tokens: Tensor, counts: TokenCounts) -> Tensor:
        spans = RowSpans(device_counts(tokens, counts, bank.num_local_experts), tokens.shape[0])
        return bank.ffn(tokens, lambda x, name: _linear(bank, x, spans, name))

    @staticmethod
    def linear(bank: BankWeights, x: Tensor, counts: TokenCounts, name: str) -> Tensor:
        return _linear(bank, x, RowSpans(device_counts(x, counts, bank.num_local_experts), x.shape[0]), name)


def _linear(bank: BankWeights, x: Tensor, spans: RowSpans, name: str) -> Tensor:
    # The loop fallback (see the module doc) keeps its weights anyway, and recomputed it would run its GEMMs
    # twice: only grouped_mm's rows recompute the weights.
    if bank.recompute_weights and grouped_mm_takes_rows(x):
        out, out_perm = with_weights_recomputed(_matmul_rebuilding_weight, bank, x, spans, name)
    else:
        out, out_perm = _matmul_rebuilding_weight(bank, x, spans, name)
    return _in_order_plus_bias(out, out_perm, spans, bank.bias(name))


def _matmul_rebuilding_weight(bank: BankWeights, x: Tensor, spans: RowSpans, name: str):
    return _matmul_in_layout(x, spans, bank.grouped_weight(name, x.shape[0]))
