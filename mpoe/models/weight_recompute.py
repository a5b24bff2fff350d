"""`moe.recompute_mpo_weights`: an MPOE bank's rebuilt W recomputed in backward instead of kept from forward.

The grouped backend rebuilds every local expert's W from its MPO chain, and autograd
keeps what backward needs from forward: W itself (the grouped GEMM's grad x needs
it) and the rebuild's intermediates (for the MPO tensors' gradients). Per weight
matrix that is L*I*J elements, a Switch bank's weights over again, and at full
bond about as much once more. A Switch bank keeps none of it: its W is a parameter.

Selective activation checkpointing drops them: `torch.utils.checkpoint` with a
policy (as torchtitan's selective activation checkpointing does) keeps the outputs
of the ops that work on the rows (the grouped GEMM, the rows' column
permutations, the per-row bias) and runs everything else again in backward: the
rebuild, which reads only the MPO tensors. Values and gradients are the same, bit
for bit. The price is one more rebuild per matrix and step, about
bond / (rows per expert) of the matrix's GEMM (the grouped backend's module doc).
Where that backend hands a call to the loop backend's op (float64, sizes grouped_mm
cannot align), its per-expert GEMMs are recomputed too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_ROW_OPS = frozenset(
    {
        torch.ops.aten._grouped_mm.default,
        torch.ops.aten.index_select.default,  # the rows' input columns permuted (a permuted layout)
        # The output columns put back in order: as traced under torch.compile. Eager runs it in place
        # (index_copy_ into a new tensor), which is recomputed: one more pass over those rows, no memory kept.
        torch.ops.aten.index_copy.default,
        torch.ops.aten.addmm.default,  # the per-row bias, one_hot @ bias
    }
)


def _keep_row_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ROW_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def with_weights_recomputed(linear: Callable[..., Tensor], *args) -> Tensor:
    """linear(*args), keeping for backward only what the ops on the rows need; the weights are rebuilt there."""
    return checkpoint(
        linear,
        *args,
        use_reentrant=False,
        preserve_rng_state=False,  # the rebuild draws no random numbers
        context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_row_outputs),
    )
