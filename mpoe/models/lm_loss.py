"""The language-model loss from the last hidden states: LM head and cross-entropy together, over chunks of tokens.

Hugging Face's models compute the whole [tokens, vocab] logits tensor in the training dtype; GPT-2's loss then
makes a float32 copy, its log-softmax and, in backward, a float32 gradient of the same size. At 16 x 1024 tokens
and GPT-2's 50257 ids each float32 copy is 3.3 GB, and every pass over one is a trip through GPU memory.

`linear_cross_entropy` never holds more than `CHUNK_LOGIT_BYTES` of float32 logits: it runs the head's GEMM and
the cross-entropy one chunk of rows at a time and, in the same pass, the gradients with respect to the hidden
states and the head's weight (as Liger-Kernel's fused linear cross-entropy does). Nothing of the logits is kept
for backward, and the head's GEMM is not run again there.

Numerics:
- logits are computed in the weight's dtype (as HF's `lm_head`), log-softmax and loss in float32 (as HF's GPT-2
  loss; HF's T5 takes its cross-entropy in the logits' dtype, so in bf16 ours is the more exact of the two);
- the forward computes the gradient of the *summed* loss, whose logit gradient (softmax - one-hot) lies in
  [-1, 1], so nothing underflows in fp16 before DeepSpeed's loss scale is applied. The mean's 1 / (counted
  tokens) and the incoming gradient (loss scale, accumulation) are applied in backward;
- the head weight's gradient is summed over chunks in float32 (float64 for a float64 model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

IGNORE_INDEX = -100  # targets with this id count for nothing (HF's convention)

# At most this much float32 logits at once (plus its copy in the weight's dtype): large enough that each chunk's
# GEMM is big (about 2600 rows for GPT-2's vocabulary), small next to the logits it replaces.
CHUNK_LOGIT_BYTES = 512 * 2**20


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    chunk_math: Optional[Callable] = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, over the targets that are not IGNORE_INDEX.

    hidden [N, d] (the last hidden states, flattened), weight [V, d] (the LM head's), targets [N].
    chunk_math: what happens to each chunk's logits (`chunk_math_in_place` by default; trainer.compile hands in
    `chunk_math_fusable` compiled). With no counted target the result is nan, as HF's mean over none.
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_LOGIT_BYTES // (4 * weight.shape[0]))
    # Inside Function.forward grad mode is off and needs_input_grad says nothing about it: read it here
    grad_enabled = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, chunk_rows, grad_enabled, chunk_math or chunk_math_in_place
    )


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The logits in float32 (float64; the same tensor when they already are), log z, the target's logit and the
    chunk's summed loss: what both chunk maths start from."""
    wide_logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_z = torch.logsumexp(wide_logits, dim=-1, keepdim=True)
    target_logit = wide_logits.gather(1, targets)
    return wide_logits, log_z, target_logit, ((log_z - target_logit) * keep).sum()


def chunk_math_in_place(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One chunk's summed loss and, with_grad, d(summed loss)/d(logits) = softmax - one_hot(target) in the logits'
    dtype, written over the logits (eager: as few passes over [rows, vocab] as torch's ops allow).

    logits [n, V] in the head's dtype; targets [n, 1] (valid ids); keep [n, 1] (whether a row counts). Rows that
    do not count are left in the gradient: the caller zeroes them in the GEMMs' [n, d] operands, a pass less
    over this large tensor. exp(logit - log z) is formed in float32 (float64) and rounded once; the target's
    entry p - 1 likewise (after rounding p, p - 1 would lose its digits as p nears 1)."""
    wide_logits, log_z, target_logit, loss = _chunk_loss(logits, targets, keep)
    if not with_grad:
        return loss, None
    grad = torch.exp(wide_logits.sub_(log_z), out=logits)
    return loss, grad.scatter_(1, targets, (torch.exp(target_logit - log_z) - 1).to(grad.dtype))


def chunk_math_fusable(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`chunk_math_in_place` without in-place ops, for torch.compile: inductor fuses it into one reduction over the
    logits (log z and the target's logit) and one elementwise pass writing the gradient in the logits' dtype,
    where eager makes about five passes over [rows, vocab] in float32. Same math, same roundings."""
    wide_logits, log_z, target_logit, loss = _chunk_loss(logits, targets, keep)
    if not with_grad:
        return loss, None
    columns = torch.arange(logits.shape[1], device=logits.device)
    probs = torch.exp(wide_logits - log_z)
    return loss, torch.where(columns == targets, probs - 1, probs).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, grad_enabled, chunk_math):
        wide = torch.promote_types(weight.dtype, torch.float32)  # sums: float32, or float64 in float64
        counted = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~counted, 0)  # any valid index; rows that do not count are masked
        loss_sum = hidden.new_zeros((), dtype=wide)
        grad_hidden = torch.empty_like(hidden) if grad_enabled and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=wide) if grad_enabled and ctx.needs_input_grad[1] else None
        with_grad = grad_hidden is not None or grad_weight is not None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, keep = hidden[rows], counted[rows, None]
            logits = h @ weight.T  # in the weight's dtype, as HF's lm_head
            loss, grad = chunk_math(logits, safe_targets[rows, None], keep, with_grad)
            loss_sum += loss
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[rows]).mul_(keep)
            if grad_weight is not None:
                grad_weight += grad.T @ (h * keep)
        count = counted.sum()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count  # a scalar on the device: no host read
        dh = (grad_hidden.to(scale.dtype) * scale).to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None, None
