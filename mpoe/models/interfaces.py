"""The three swappable parts of an MoE layer, and what each promises the others.

    router      tokens [N, d]                         -> RouterOutput (probs, routing map, losses, counts)
    dispatcher  tokens, probs, routing map            -> rows sorted by local expert + per-expert counts
                expert rows (same order)              -> [N, d], each token's gate-weighted sum (combine)
    expert bank rows sorted by local expert, counts   -> rows in the same order

A new router, dispatcher or expert bank is one class that satisfies its
Protocol here plus one config option that picks it; the MoE layer and the
training loop see only these methods. How a bank computes (per-expert loop on
the CPU, one grouped GEMM on the GPU) is its `ExpertBackend`, picked by
`moe.expert_impl`.

Parameter roles are what the rest of the system needs to know about a bank's
parameters: which are shared by all experts (MPOE central tensors: reduced over
the whole data-parallel world, targets of the gradient mask), and which belong
to the local experts (stacked on a leading local-expert axis, reduced over the
expert-data-parallel group). `mpoe.models.param_tags` writes and reads the
matching attributes on the parameters themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol, Union, runtime_checkable

from torch import Tensor, nn

if TYPE_CHECKING:
    from mpoe.models.router import RouterOutput

# Per-local-expert row counts: a host list (CPU path) or a 1-D integer tensor on the rows' device (GPU path,
# so that no device-to-host copy is needed between dispatch and the grouped GEMM).
TokenCounts = Union[list[int], Tensor]


@dataclass(frozen=True)
class ParamRoles:
    """A bank's parameters by role; every parameter of the bank is in exactly one list."""

    central: list[nn.Parameter] = field(default_factory=list)  # shared by all experts (MPOE central tensors)
    auxiliary: list[nn.Parameter] = field(default_factory=list)  # per expert, MPO auxiliary tensors (stacked)
    expert: list[nn.Parameter] = field(default_factory=list)  # per expert, everything else (weights, biases; stacked)

    NAMES = ("central", "auxiliary", "expert")

    def per_expert(self) -> list[nn.Parameter]:
        """The parameters stacked on a leading local-expert axis (expert parallel, reduced over the ep-dp group)."""
        return self.auxiliary + self.expert

    def all(self) -> list[nn.Parameter]:
        return self.central + self.auxiliary + self.expert

    def of(self, role: str) -> list[nn.Parameter]:
        """The list for a role named in config (e.g. `moe.grad_mask.target`)."""
        if role not in self.NAMES:
            raise ValueError(f"parameter role {role!r} is unknown: use one of {', '.join(self.NAMES)}")
        return getattr(self, role)


@runtime_checkable
class Router(Protocol):
    def __call__(self, tokens: Tensor) -> RouterOutput: ...


@runtime_checkable
class Dispatcher(Protocol):
    """Stateful between `dispatch` and `combine` of one forward."""

    def dispatch(self, tokens: Tensor, probs: Tensor, routing_map: Tensor) -> tuple[Tensor, Tensor]:
        """-> (rows for this rank's experts, sorted by local expert; counts [L] int64 on the rows' device)."""
        ...

    def combine(self, expert_output: Tensor) -> Tensor: ...


@runtime_checkable
class ExpertBankLike(Protocol):
    num_experts: int
    num_local_experts: int
    first_expert: int  # global id of local expert 0

    def __call__(self, tokens: Tensor, tokens_per_expert: TokenCounts) -> Tensor: ...

    def param_roles(self) -> ParamRoles: ...


@dataclass
class GroupedWeight:
    """One weight of every local expert as the grouped backend applies it: out = x[:, in_perm] @ matrix, whose
    column r is the weight's column out_perm[r]. A Switch bank's is its stacked weight as it stands; an MPOE
    bank may hand a matrix whose rows or columns its MPO chain builds in another order (`mpo.permuted_product`)."""

    matrix: Tensor  # [L, I, J], possibly a transposed view
    in_perm: Optional[Tensor] = None  # [I]: the input columns in the matrix's row order
    out_perm: Optional[Tensor] = None  # [J]: the weight column each output column is


class ExpertBackend(Protocol):
    """How a bank's experts are computed: `loop` (per-expert GEMMs) or `grouped` (all experts in one op).

    `linear` is the one seam: rows of local expert e (consecutive, counts[e] of them)
    times the bank's weight `name` of expert e, plus its bias.
    """

    name: str

    def counts(self, tokens: Tensor, tokens_per_expert: TokenCounts, num_local_experts: int) -> TokenCounts:
        """tokens_per_expert in the form this backend wants (host list or device tensor)."""
        ...

    def forward(self, bank: nn.Module, tokens: Tensor, counts: TokenCounts) -> Tensor:
        """The bank's FFN over all local experts' rows; `counts` as the dispatcher gives them (converted by
        `counts`). A backend that reads counts on the host runs eagerly under torch.compile (see experts_loop)."""
        ...

    def linear(self, bank: nn.Module, x: Tensor, counts: TokenCounts, name: str) -> Tensor: ...


def bias_of(bank: nn.Module, name: str) -> Optional[Tensor]:
    """The stacked bias that goes with weight `name` (W_gate never has one)."""
    return {"w_in": getattr(bank, "b_in", None), "w_out": getattr(bank, "b_out", None)}.get(name)
