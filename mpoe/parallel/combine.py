"""The combine's arithmetic: each token's gate-weighted sum of its rows' expert outputs.

out[t] = sum over rows r of token t of expert_output[r] * row_probs[r], with the
gate weights in float32 (the router's dtype) and the sum in float32, rounded once
to the rows' dtype: Megatron-Core's `unpermute` with a float32 router.

Top-k > 1: as Megatron writes it, the weighted rows promoted to float32, added
into a float32 output, cast back. In bf16 that moves every row and the output
three times in float32, forward and backward (Megatron avoids it with a fused
permute kernel from Transformer Engine, which we do not use). `_WeightedSum` is
that arithmetic with the float32 rows kept out of the backward: autograd through
it would keep them ([rows, d] in float32, which `index_add_` saves only for their
shape) beside the rows themselves; backward recomputes what it needs from the rows.

Top-1 (`one_row_per_token=True`): a token has one row (padding rows, gate weight 0,
add zeros to token 0), so the sum has one term and float32 accumulation changes
nothing: the product is formed in float32 and rounded once as it is stored
(`torch.mul(..., out=)` in the rows' dtype), and the scatter runs in that dtype.
Forward and the rows' gradient are bit for bit Megatron's. The gate weights'
gradient <grad, row> adds its products in float32 as Megatron does, but rounds each
product to the rows' dtype first (Megatron forms it in float32): an error of the
rows' precision, for no float32 copy of the rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gate_weighted_sum(
    expert_output: Tensor, row_probs: Tensor, token: Tensor, shape: torch.Size, one_row_per_token: bool
) -> Tensor:
    """expert_output [R, d], row_probs [R] (float32), token [R] -> [N, d] in expert_output's dtype."""
    if one_row_per_token:
        return _OneRowPerToken.apply(expert_output, row_probs, token, shape)
    return _WeightedSum.apply(expert_output, row_probs, token, shape)


class _WeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_output: Tensor, row_probs: Tensor, token: Tensor, shape: torch.Size) -> Tensor:
        weighted = expert_output * row_probs.unsqueeze(-1)  # promotes bf16 rows to the probs' float32
        out = weighted.new_zeros(shape)
        out.index_add_(0, token, weighted)
        ctx.save_for_backward(expert_output, row_probs, token)
        return out.to(expert_output.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        expert_output, row_probs, token = ctx.saved_tensors
        # In the product's dtype (float32 for bf16/fp16/fp32 rows), as autograd's cast back gives it.
        grad_weighted = grad.to(torch.promote_types(expert_output.dtype, row_probs.dtype)).index_select(0, token)
        grad_output = grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_output = (grad_weighted * row_probs.unsqueeze(-1)).to(expert_output.dtype)
        if ctx.needs_input_grad[1]:
            grad_probs = (grad_weighted * expert_output).sum(-1).to(row_probs.dtype)
        return grad_output, grad_probs, None, None


class _OneRowPerToken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_output: Tensor, row_probs: Tensor, token: Tensor, shape: torch.Size) -> Tensor:
        weighted = torch.empty_like(expert_output)
        torch.mul(expert_output, row_probs.unsqueeze(-1), out=weighted)  # float32 math, one rounding on store
        out = expert_output.new_zeros(shape)
        out.index_add_(0, token, weighted)  # one term per token (+ zeros): exact in any dtype
        ctx.save_for_backward(expert_output, row_probs, token)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        expert_output, row_probs, token = ctx.saved_tensors
        grad_rows = grad.index_select(0, token)
        grad_output = grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_output = torch.empty_like(expert_output)
            torch.mul(grad_rows, row_probs.unsqueeze(-1), out=grad_output)
        if ctx.needs_input_grad[1]:
            grad_probs = (grad_rows * expert_output).sum(-1, dtype=torch.float32).to(row_probs.dtype)
        return grad_output, grad_probs, None, None
