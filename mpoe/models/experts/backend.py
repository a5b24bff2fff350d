"""What a bank gives its backend, and what a backend gives its bank.

A bank holds the weights and builds them in the forms a backend asks for; a
backend computes the experts' FFN from those forms and reads nothing else of the
bank. The registry (`registry.py`) pairs every bank kind with one backend per
implementation, so a bank that needs another path is another registry entry,
not a branch inside a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Protocol

from torch import Tensor

from mpoe.models.interfaces import TokenCounts

# linear(x, name): every local expert's rows of x times that expert's weight `name`, plus its bias.
Linear = Callable[[Tensor, str], Tensor]


@dataclass
class GroupedWeight:
    """One weight of every local expert as the grouped backend applies it: out = x[:, in_perm] @ matrix, whose
    column r is the weight's column out_perm[r]. A Switch bank's is its stacked weight as it stands; an MPOE
    bank may hand a matrix whose rows or columns its MPO chain builds in another order (`mpo.permuted_product`)."""

    matrix: Tensor  # [L, I, J], possibly a transposed view
    in_perm: Optional[Tensor] = None  # [I]: the input columns in the matrix's row order
    out_perm: Optional[Tensor] = None  # [J]: the weight column each output column is


class BankWeights(Protocol):
    """What every backend reads of a bank."""

    num_local_experts: int
    recompute_weights: bool  # grouped backend: rebuild the weights in backward rather than keep them

    def ffn(self, x: Tensor, linear: Linear) -> Tensor:
        """The experts' FFN (activation, gating) around the backend's `linear`."""
        ...

    def bias(self, name: str) -> Optional[Tensor]:
        """The stacked bias [L, J] that goes with weight `name`, or None."""
        ...

    def stacked_weight(self, name: str) -> Tensor:
        """All local experts' weight `name`, [L, I, J] (x @ W layout)."""
        ...

    def grouped_weight(self, name: str, num_rows: int) -> GroupedWeight:
        """Weight `name` of all local experts as the grouped backend applies it to `num_rows` rows."""
        ...


class MPOBankWeights(BankWeights, Protocol):
    """What the MPOE bank's loop backend reads besides: the MPO chains, and the FFN's parts to rebuild it."""

    method: str  # auto | dense | chain: rebuild W, or push the rows through the chain
    gated: bool
    act: Callable[[Tensor], Tensor]

    def weight_names(self) -> tuple[str, ...]: ...

    def stacked_chain(self, name: str) -> list[Tensor]: ...

    def expert_chains(self, name: str) -> list[list[Tensor]]: ...

    def halves(self, name: str, transposed: bool = False) -> tuple[Tensor, Tensor, Tensor]: ...


class ExpertBackend(Protocol):
    """How a bank's experts compute: `loop` (per-expert GEMMs, counts on the host) or `grouped` (one grouped GEMM
    per weight, counts on the device). Stateless: the registry holds the classes and a bank holds the one chosen.

    `linear` is the one seam: rows of local expert e (consecutive, counts[e] of them) times the bank's weight
    `name` of expert e, plus its bias; `forward` is the whole FFN over all local experts' rows."""

    name: str
    # Whether the backend takes the per-expert counts as a device tensor (no host read): the dispatcher then
    # takes its sync-free path too, so that nothing between the router and the combine waits for the device.
    counts_on_device: bool

    @staticmethod
    def forward(bank: BankWeights, tokens: Tensor, counts: TokenCounts) -> Tensor: ...

    @staticmethod
    def linear(bank: BankWeights, x: Tensor, counts: TokenCounts, name: str) -> Tensor: ...
