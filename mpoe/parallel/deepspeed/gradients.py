"""What the training step reads of the gradients inside DeepSpeed's engine, and the skipped step it asks for.

These reach into the engine's optimizer (its ZeRO partitions, its loss scale, its
overflow flag), which DeepSpeed exposes through no public method.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from mpoe.parallel.collectives import all_reduce


def global_grad_norm(engine) -> float:
    """DeepSpeed's norm of the last step's gradients (before clipping); read once per logged step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def gradients_finite(engine) -> bool:
    """At ZeRO 0 (fp32 only: see `engine.zero_stage`), after the reduction: are all gradients finite on every rank?

    DeepSpeed steps our bare torch AdamW there, which has no overflow check (its ZeRO 1/2
    optimizers have one, and skip the step themselves). The answer decides, on the host, whether the
    step runs, so this reads one flag per optimizer step.
    """
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return True
    bad = torch.logical_not(torch.stack([g.isfinite().all() for g in grads]).all()).to(torch.float32)
    return all_reduce(bad).item() == 0  # any rank's NaN reaches all ranks


def loss_scale(engine) -> float:
    """The loss scale this step's gradients carry until `engine.step()` divides it out: fp16's dynamic scale
    (DeepSpeed's public `loss_scale` of its optimizer), 1.0 otherwise. A host float: no device read."""
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0


def local_grad_fragment(param: nn.Parameter) -> Optional[torch.Tensor]:
    """ZeRO 1/2, after the last backward of a step and before `engine.step()`: the part of `param`'s reduced
    gradient that this rank's optimizer partition owns (None if it owns none). Every entry of every
    parameter is owned by exactly one rank of its data-parallel process group (experts: of their
    expert-data-parallel group), so squares summed over these fragments and over the world give the global
    squared norm. DeepSpeed's `safe_get_full_grad` would all-reduce a full gradient per parameter instead."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
    owned = mapping.lp_fragment_address
    if grad.numel() != owned.numel:  # BF16_Optimizer (bf16 ZeRO 1) keeps the whole gradient on every rank
        grad = grad.reshape(-1).narrow(0, owned.start, owned.numel)
    return grad


@contextlib.contextmanager
def skipped_step(engine):
    """ZeRO 0: let DeepSpeed run `engine.step()` as a skipped step, as it does for an fp16 overflow.

    The engine, seeing `optimizer.overflow`, neither steps the LR schedule nor counts the
    step as applied (it increments `skipped_steps`), as ZeRO 1/2 do by themselves; the
    gradients are zeroed (so clipping sees finite numbers) and the optimizer's own step,
    which would still move the weights through momentum and weight decay, is not run.
    """
    optimizer = engine.optimizer
    for param_set in optimizer.param_groups:
        for p in param_set["params"]:
            if p.grad is not None:
                p.grad.zero_()
    optimizer.overflow = True
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step
        optimizer.overflow = False
