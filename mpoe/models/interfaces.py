"""The three swappable parts of an MoE layer, and what each promises the others.

    router      tokens [N, d]                         -> RouterOutput (probs, routing map, losses, counts)
    dispatcher  tokens, probs, routing map            -> rows sorted by local expert + per-expert counts
                expert rows (same order)              -> [N, d], each token's gate-weighted sum (combine)
    expert bank rows sorted by local expert, counts   -> rows in the same order

A new router or dispatcher is one class that satisfies its Protocol here plus
one line in its registry (`mpoe.models.moe_builder`) and its name among the
config's choices; the MoE layer and the training loop see only these methods. How a bank computes (per-expert loop
or one grouped GEMM) is its backend, chosen once by `moe.expert_impl` (`mpoe.models.experts`).

Parameter roles are what the rest of the system needs to know about a bank's
parameters: which are shared by all experts (MPOE central tensors: reduced over
the whole data-parallel world, targets of the gradient mask), and which belong
to the local experts (stacked on a leading local-expert axis, reduced over the
expert-data-parallel group). `mpoe.models.param_tags` writes and reads the
matching attributes on the parameters themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Union, runtime_checkable

from torch import Tensor, nn

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


@dataclass
class RouterOutput:
    """What a router decided for N tokens over E experts."""

    probs: Tensor  # [N, E] gate weight of each kept (token, expert) pair, 0 elsewhere
    routing_map: Tensor  # [N, E] bool, the kept (token, expert) pairs
    aux_loss: Tensor  # scalar with grad, load-balancing loss, its coefficient applied
    z_loss: Tensor  # scalar with grad, router z-loss, its coefficient applied
    tokens_per_expert: Tensor  # [E] long, local tokens routed to each expert before dropping
    # Monitoring statistics stay tensors on the tokens' device: reading them here would stall the GPU
    # once per layer and step; the training loop reads them once per logged step.
    tokens_dropped: Tensor  # scalar long, (token, expert) pairs removed by a capacity limit
    entropy: Tensor  # scalar float32, mean entropy (nats) of the full routing distribution
    # Every token kept all the pairs it chose (no capacity limit): a dispatcher that lists rows without reading
    # the kept count from the device then has no padding rows to provide for.
    dropless: bool = False


@runtime_checkable
class Router(Protocol):
    """An nn.Module (its parameters are the layer's); the layer builder makes it as cls(cfg: MoEConfig, d_model)."""

    def __call__(self, tokens: Tensor) -> RouterOutput: ...


@runtime_checkable
class Dispatcher(Protocol):
    """Stateful between `dispatch` and `combine` of one forward; the layer builder makes it as
    cls(num_experts, placement: ExpertPlacement, top_k=k)."""

    num_experts: int
    num_local_experts: int

    def dispatch(
        self, tokens: Tensor, probs: Tensor, routing_map: Tensor, dropless: bool = False, counts_on_device: bool = False
    ) -> tuple[Tensor, Tensor]:
        """-> (rows for this rank's experts, sorted by local expert; counts [L] int64 on the rows' device);
        dropless as `RouterOutput.dropless`; counts_on_device: the expert bank reads no count on the host, so the
        dispatcher need not either (`ExpertBankLike.counts_on_device`)."""
        ...

    def combine(self, expert_output: Tensor) -> Tensor:
        """Expert outputs in the order `dispatch` gave -> [N, d], each token's gate-weighted sum."""
        ...


@runtime_checkable
class ExpertBankLike(Protocol):
    """The local experts of one layer (an nn.Module): rows sorted by local expert in, rows in the same order out."""

    num_experts: int
    num_local_experts: int
    first_expert: int  # global id of local expert 0
    counts_on_device: bool  # its backend, chosen once it is placed, takes the counts as a device tensor

    def __call__(self, tokens: Tensor, tokens_per_expert: TokenCounts) -> Tensor: ...

    def param_roles(self) -> ParamRoles: ...
