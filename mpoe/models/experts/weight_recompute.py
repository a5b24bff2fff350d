"""`moe.recompute_mpo_weights`: an MPOE bank's rebuilt W recomputed in backward instead of kept from forward.

The grouped backend rebuilds every local expert's W from its MPO chain, and autograd
keeps what backward needs from forward: W itself (the grouped GEMM's grad x needs
it) and the rebuild's intermediates (for the MPO tensors' gradients). Per weight
matrix that is L*I*J elements, a Switch bank's weights over again, and at full
bond about as much once more. A Switch bank keeps none of it: its W is a parameter.

Activation checkpointing (`torch.utils.checkpoint`, non-reentrant) of the rebuild
and the grouped GEMM drops them. The GEMM is the region's last op, and what it
keeps (its rows and W) is recorded before it runs, so backward's recomputation
stops there (`early_stop`): it rebuilds W (and permutes the rows' columns, in a
permuted layout) and does not run the GEMM again. The columns put back in order
and the bias are outside the region. Values and gradients are the same, bit for
bit. The price is one more rebuild per matrix and step, about
bond / (rows per expert) of the matrix's GEMM (see `grouped.py`).
It applies where grouped_mm takes the rows (`grouped_mm_takes_rows`: under
torch.compile, bf16 only); the loop fallback keeps its weights as before.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.checkpoint import checkpoint


def with_weights_recomputed(matmul: Callable, *args):
    """matmul(*args), keeping for backward only its inputs; what it computes from them runs again there."""
    # preserve_rng_state=False: the rebuild draws no random numbers.
    return checkpoint(matmul, *args, use_reentrant=False, preserve_rng_state=False, early_stop=True)
