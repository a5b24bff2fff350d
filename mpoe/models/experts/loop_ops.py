"""The loop backend's ops: consecutive rows of each local expert times that expert's weight, one GEMM per expert.

Tokens arrive sorted by local expert, counts[k] rows for expert k, counts on the
host. Both ops write every expert's rows into one output (no split / cat) and
return gradients for all experts in stacked buffers.

- `per_expert_linear`: the weights are given, stacked [L, I, J] (a Switch bank's parameters).
- `per_expert_mpo_linear`: each expert's W_k is the product of the two halves of
  its MPO chain (`mpo.split_halves`), built inside the op. Why an op of its own
  rather than contracting W for all experts and handing it to autograd:
  autograd's backward of that contraction first writes grad W for every expert
  into one [L, I, J] buffer and then reads it twice (once per half), the
  product of left and right materialises as a fresh [L, I, J] tensor, and both
  passes stream through memory. Here the weight gradient of expert k lands in
  one scratch buffer that is reused for every expert (it stays in cache) and is
  contracted with the two halves right away; only the halves' gradients leave
  the op (`python -m bench.experts` measures what it buys).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _expert_rows(counts: list[int]):
    """(k, rows of expert k) for every expert that has rows; rows are consecutive, counts[k] of them."""
    start = 0
    for k, n in enumerate(counts):
        if n:
            yield k, slice(start, start + n)
        start += n


def _linear_into(out: Tensor, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> None:
    if bias is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(bias, x, w, out=out)


class _PerExpertLinear(torch.autograd.Function):
    """Each expert's consecutive rows times its per-expert weights [L, I, J], written into one output (no split / cat).

    Backward writes each expert's weight gradient straight into one stacked buffer.
    """

    @staticmethod
    def forward(ctx, x, counts, bias, stacked):
        out = x.new_empty(x.shape[0], stacked.shape[2])
        for k, rows in _expert_rows(counts):
            _linear_into(out[rows], x[rows], stacked[k], None if bias is None else bias[k])
        ctx.counts = counts
        ctx.save_for_backward(x, bias, stacked)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bias, stacked = ctx.saved_tensors
        counts = ctx.counts
        need_x, _, need_b, need_stacked = ctx.needs_input_grad
        gx = torch.empty_like(x) if need_x else None
        gb = torch.zeros_like(bias) if bias is not None and need_b else None
        gstacked = None
        if need_stacked:
            # Every expert with rows overwrites its slice below; zero-filling the whole [L, I, J]
            # buffer first would be one more pass over all weights, so zero only the idle experts.
            gstacked = torch.empty_like(stacked)
            for k, n in enumerate(counts):
                if not n:
                    gstacked[k].zero_()
        for k, rows in _expert_rows(counts):
            g = grad[rows]
            if gx is not None:
                torch.mm(g, stacked[k].t(), out=gx[rows])
            if gstacked is not None:
                torch.mm(x[rows].t(), g, out=gstacked[k])
            if gb is not None:
                torch.sum(g, 0, out=gb[k])
        return gx, None, gb, gstacked


def per_expert_linear(x: Tensor, counts: list[int], bias: Optional[Tensor], stacked: Tensor) -> Tensor:
    """x rows of expert k (consecutive, counts[k]) @ stacked[k] + bias[k]; stacked is [L, I, J]."""
    return _PerExpertLinear.apply(x, counts, bias, stacked)


class _PerExpertMPOLinear(torch.autograd.Function):
    """Rows of expert k times M_k (or M_k^T), M_k[(c, a), (b, e)] = sum_d left[k, a, b, d] * right[k, d, c, e].

    Forward builds each M_k with one batched product over c (no reordering pass)
    into a stacked buffer kept for backward, the way a Switch bank keeps its
    weights. Backward, per expert: grad x from the kept M_k; grad M_k into one
    reused scratch buffer; from it grad left_k = sum_c gM[c] @ right[c]^T and
    grad right_k[c] = left_k^T @ gM[c].
    """

    @staticmethod
    def forward(ctx, x, counts, transposed, bias, left, right, accumulate_max_blocks):
        L, a, b, d = left.shape
        c, e = right.shape[2], right.shape[3]
        left_rows = left.reshape(L, a * b, d)
        right_by_c = right.transpose(1, 2).contiguous()  # [L, c, d, e]: small
        weights = x.new_empty(L, c, a * b, e)  # M_k as c blocks of (a*b, e)
        out = x.new_empty(x.shape[0], c * a if transposed else b * e)
        for k, rows in _expert_rows(counts):
            torch.bmm(left_rows[k].expand(c, a * b, d), right_by_c[k], out=weights[k])
            m = weights[k].view(c * a, b * e)
            _linear_into(out[rows], x[rows], m.t() if transposed else m, None if bias is None else bias[k])
        ctx.counts, ctx.transposed, ctx.dims = counts, transposed, (L, a, b, c, d, e)
        ctx.accumulate_max_blocks = accumulate_max_blocks
        ctx.save_for_backward(x, bias, left_rows, right_by_c, weights)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bias, left_rows, right_by_c, weights = ctx.saved_tensors
        counts, transposed = ctx.counts, ctx.transposed
        L, a, b, c, d, e = ctx.dims
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gb = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        need_halves = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]  # false when the MPO tensors are frozen
        g_left = left_rows.new_zeros(L, a * b, d) if need_halves else None  # experts without rows get zeros
        g_right = right_by_c.new_zeros(L, c, d, e) if need_halves else None
        scratch = x.new_empty(c, a * b, e) if need_halves else None  # grad M_k, one expert at a time
        for k, rows in _expert_rows(counts):
            g = grad[rows]
            m = weights[k].view(c * a, b * e)
            if gx is not None:
                torch.mm(g, m if transposed else m.t(), out=gx[rows])
            if need_halves:
                gm = scratch.view(c * a, b * e)
                if transposed:
                    torch.mm(g.t(), x[rows], out=gm)
                else:
                    torch.mm(x[rows].t(), g, out=gm)
                # grad left: sum over c of (a*b, e) @ (e, d). A loop of accumulating GEMMs
                # beats one bmm + sum while c is small (the bmm writes c partial results): the caller's policy.
                # Not in bf16/fp16: each addmm_ would round the running sum to 8 (11) significant bits, where
                # torch.sum adds the c products in float32 and rounds once.
                if c <= ctx.accumulate_max_blocks and scratch.element_size() >= 4:
                    for i in range(c):
                        g_left[k].addmm_(scratch[i], right_by_c[k, i].t())
                else:
                    torch.sum(torch.bmm(scratch, right_by_c[k].transpose(1, 2)), 0, out=g_left[k])
                torch.bmm(left_rows[k].t().expand(c, d, a * b), scratch, out=g_right[k])
            if gb is not None:
                torch.sum(g, 0, out=gb[k])
        if not need_halves:
            return gx, None, None, gb, None, None, None
        return gx, None, None, gb, g_left.view(L, a, b, d), g_right.transpose(1, 2), None


def per_expert_mpo_linear(
    x: Tensor,
    counts: list[int],
    bias: Optional[Tensor],
    left: Tensor,
    right: Tensor,
    transposed: bool = False,
    accumulate_max_blocks: int = 64,
) -> Tensor:
    """Rows of expert k @ M_k (transposed: @ M_k^T) + bias[k].

    M_k is built from the halves left [L, a, b, d] and right [L, d, c, e].

    M_k is (c*a, b*e) with rows in (c, a) order: see `mpo.split_halves` for how
    that relates to the expert's W.
    """
    return _PerExpertMPOLinear.apply(x, counts, transposed, bias, left, right, accumulate_max_blocks)
