"""Expert banks: the E feed-forward experts of an MoE layer, as weights, behind one interface.

Routing and dispatch see only `ExpertBank.forward(tokens, tokens_per_expert)`:
tokens arrive sorted by local expert and leave in the same order, so a Switch
bank (independent dense experts) and an MPOE bank (experts sharing one MPO
central tensor per weight matrix) are interchangeable. A bank holds and builds
its weights; its backend (`backend.py`, chosen from `registry.py`) computes.

Choices, and why:
- Weights are in the ``x @ W`` layout (GPT-2 Conv1D's) and per-expert weights
  are stacked along a leading local-expert axis, so every expert's gradient
  lands in one stacked buffer.
- An expert is ``act(x @ W_in + b_in) @ W_out + b_out``; gated (T5 v1.1) it is
  ``(act(x @ W_gate) * (x @ W_in)) @ W_out``. 'gated-gelu' means HF's gelu_new,
  as in T5's config. The activation runs once over all rows.
- Random initialisation (no dense FFN given) draws from generators seeded by
  one number taken from the global torch RNG and the *global* expert id, so an
  expert's initial weights do not depend on how experts are spread over ranks.
- MPOE: per weight matrix one central tensor (the middle MPO tensor, a plain
  parameter reduced over the whole data-parallel world) and per local expert
  the auxiliary tensors (expert parameters, DeepSpeed convention). Upcycled
  from a dense FFN, every expert starts as that FFN (exactly, at full bonds).
  `aux_init_noise` adds Gaussian noise scaled by each auxiliary tensor's RMS,
  seeded per global expert, to break the experts' symmetry if wanted.
- The backend (`moe.expert_impl`) is chosen for a device and a dtype, once: a
  new bank for where its parameters are, a placed model by
  `resolve_expert_backends`. Every backend gives every parameter a (zero)
  gradient when no rows come.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from mpoe.models import mpo
from mpoe.models.experts.backend import ExpertBackend, GroupedWeight, Linear
from mpoe.models.experts.registry import backend_for, choose_impl, describe
from mpoe.models.interfaces import ParamRoles, TokenCounts
from mpoe.models.param_tags import tag_expert_params, tag_first_expert


def activation_fn(activation: str) -> nn.Module:
    name = activation.removeprefix("gated-")
    if activation.startswith("gated-") and name == "gelu":
        name = "gelu_new"
    if name == "gelu_new":  # the same tanh-GELU, as one fused kernel instead of ~8 elementwise passes
        name = "gelu_pytorch_tanh"
    if name not in ACT2FN:
        raise ValueError(
            f"activation={activation!r} is unknown: use one of {', '.join(ACT2FN)} (optionally 'gated-' + name)"
        )
    return ACT2FN[name]


@dataclass
class DenseFFN:
    """The weights of one dense FFN, x @ W layout; w_gate set for gated (T5 v1.1) FFNs."""

    w_in: Tensor  # [d_model, d_ff]
    b_in: Optional[Tensor]  # [d_ff]
    w_out: Tensor  # [d_ff, d_model]
    b_out: Optional[Tensor]  # [d_model]
    w_gate: Optional[Tensor] = None  # [d_model, d_ff]; act(x @ w_gate) * (x @ w_in)

    @property
    def d_model(self) -> int:
        return self.w_in.shape[0]

    @property
    def d_ff(self) -> int:
        return self.w_in.shape[1]

    @classmethod
    def from_gpt2_mlp(cls, mlp: nn.Module) -> DenseFFN:
        """HF GPT2MLP: Conv1D c_fc / c_proj already store (in, out)."""
        d = lambda t: t.detach().clone()
        return cls(d(mlp.c_fc.weight), d(mlp.c_fc.bias), d(mlp.c_proj.weight), d(mlp.c_proj.bias))

    @classmethod
    def from_t5_ff(cls, ff: nn.Module) -> DenseFFN:
        """HF T5DenseActDense (wi, wo) or T5DenseGatedActDense (wi_0 gated, wi_1, wo); Linear is (out, in)."""
        t = lambda lin: lin.weight.detach().t().contiguous()
        b = lambda lin: None if lin.bias is None else lin.bias.detach().clone()
        if hasattr(ff, "wi_0"):
            return cls(t(ff.wi_1), b(ff.wi_1), t(ff.wo), b(ff.wo), w_gate=t(ff.wi_0))
        return cls(t(ff.wi), b(ff.wi), t(ff.wo), b(ff.wo))

    @classmethod
    def random(
        cls,
        d_model: int,
        d_ff: int,
        gated: bool = False,
        bias: bool = True,
        std: float = 0.02,
        generator: Optional[torch.Generator] = None,
    ) -> DenseFFN:
        """GPT-2 style: normal(0, std) weights, zero biases."""
        w = lambda *shape: torch.randn(*shape, generator=generator) * std
        return cls(
            w(d_model, d_ff),
            torch.zeros(d_ff) if bias else None,
            w(d_ff, d_model),
            torch.zeros(d_model) if bias else None,
            w(d_model, d_ff) if gated else None,
        )

    def __call__(self, x: Tensor, activation: str) -> Tensor:
        """The dense FFN's output: the reference an upcycled expert must match."""
        h = x @ self.w_in + (0 if self.b_in is None else self.b_in)
        h = activation_fn(activation)(x @ self.w_gate) * h if self.w_gate is not None else activation_fn(activation)(h)
        return h @ self.w_out + (0 if self.b_out is None else self.b_out)


class ExpertBank(nn.Module):
    """The local experts of one MoE layer; subclasses hold the weights, `backend` computes.

    A backend reads the bank only through the methods here (`backend.BankWeights`)
    and, for the MPOE bank's loop backend, its MPO chains (`backend.MPOBankWeights`).
    """

    kind: str  # the registry's bank kind: switch | mpoe

    def __init__(
        self, num_experts: int, local_experts: range, d_model: int, activation: str, gated: bool, impl: str = "auto"
    ):
        super().__init__()
        self.num_experts = num_experts
        self.num_local_experts = len(local_experts)
        self.first_expert = local_experts.start
        self.d_model = d_model
        self.activation, self.gated = activation, gated
        self.act = activation_fn(activation)
        self._impl = impl
        self.backend: Optional[type[ExpertBackend]] = None  # `resolve_backend`, once the weights exist
        # Grouped backend: rebuild the weights in backward rather than keep them from forward (an MPOE bank's W is
        # rebuilt from its MPO tensors; a Switch bank's is a parameter, kept anyway).
        self.recompute_weights = False

    @property
    def impl(self) -> str:
        """`moe.expert_impl` as asked (auto | loop | grouped); `backend` is what it resolved to."""
        return self._impl

    def use_impl(self, impl: str) -> str:
        """Ask for `impl` from now on, resolved at once for where the parameters are."""
        self._impl = impl
        return self.resolve_backend()

    def resolve_backend(
        self, device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
    ) -> str:
        """Choose the backend for computing on `device` in `dtype` (default: the parameters' device and dtype);
        returns what was chosen, as 'grouped, bf16, sm90'."""
        param = next(self.parameters())
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        impl = choose_impl(self._impl, device, dtype)
        self.backend = backend_for(self.kind, impl)
        return describe(impl, device, dtype)

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.cuda()`, `.bfloat16()` and DeepSpeed's placement all come here: the weights moved or changed
        dtype, so the backend is chosen again for where they now are (once per placement, never per forward)."""
        moved = super()._apply(fn, recurse)
        if self.backend is not None:
            self.resolve_backend()
        return moved

    def forward(self, tokens: Tensor, tokens_per_expert: TokenCounts) -> Tensor:
        return self.backend.forward(self, tokens, tokens_per_expert)

    @property
    def counts_on_device(self) -> bool:
        """Whether the chosen backend takes the per-expert counts as a device tensor (no host read)."""
        return self.backend.counts_on_device

    def linear(self, x: Tensor, counts: TokenCounts, name: str) -> Tensor:
        """Rows of local expert e (consecutive, counts[e] of them) times expert e's weight `name` (+ its bias)."""
        return self.backend.linear(self, x, counts, name)

    def ffn(self, x: Tensor, linear: Linear) -> Tensor:
        """act(x W_in + b_in) W_out + b_out, gated: act(x W_gate) * (x W_in); the activation runs once over all rows.

        linear(x, name): every local expert's rows times its weight `name` (+ bias)."""
        h = linear(x, "w_in")
        h = self.act(linear(x, "w_gate")) * h if self.gated else self.act(h)
        return linear(h, "w_out")

    def weight_names(self) -> tuple[str, ...]:
        return ("w_in", "w_out", "w_gate") if self.gated else ("w_in", "w_out")

    def bias(self, name: str) -> Optional[Tensor]:
        """The stacked bias [L, J] that goes with weight `name` (W_gate never has one)."""
        return {"w_in": self.b_in, "w_out": self.b_out}.get(name)

    def stacked_weight(self, name: str) -> Tensor:
        """All local experts' weight `name`, [L, I, J] (x @ W layout)."""
        raise NotImplementedError

    def grouped_weight(self, name: str, num_rows: int) -> GroupedWeight:
        """Weight `name` of all local experts as the grouped backend applies it to `num_rows` rows."""
        return GroupedWeight(self.stacked_weight(name))

    def effective_weights(self) -> list[Tensor]:
        """Every local expert's weight matrices as the forward multiplies by them, one [L, I, J] per name of
        `weight_names()` (biases are not matrices and are left out); detached, on the parameters' device.

        A Switch bank's are its parameters themselves (not copies: do not write into them); an MPOE bank's
        are rebuilt from its MPO tensors by `stacked_weight`, the rebuild its backends use."""
        with torch.no_grad():
            return [self.stacked_weight(name).detach() for name in self.weight_names()]

    def param_roles(self) -> ParamRoles:
        raise NotImplementedError

    def _tag_stacked(self) -> None:
        """Per-expert params are stacked on a leading local-expert axis; record whose slice 0 is."""
        tag_first_expert(self.param_roles().per_expert(), self.first_expert)

    def mark_expert_params(self, group_name: str) -> None:
        """DeepSpeed: expert params are reduced over the expert-data-parallel group `group_name`."""
        tag_expert_params(self.param_roles().per_expert(), group_name)


def _noise_seed(base: int, name: str, position: int, global_expert: int) -> int:
    """Deterministic across processes (Python's str hash is not)."""
    index = ("w_in", "w_out", "w_gate").index(name)
    return (base + 1_000_003 * global_expert + 1_009 * position + index) % (2**62)


def _stack(tensors: Sequence[Optional[Tensor]]) -> Optional[nn.Parameter]:
    return None if tensors[0] is None else nn.Parameter(torch.stack([t.detach().clone() for t in tensors]))


class SwitchExperts(ExpertBank):
    """Independent dense experts, weights stacked [L, ...]."""

    kind = "switch"

    def __init__(
        self, num_experts: int, local_experts: range, denses: Sequence[DenseFFN], activation: str, impl: str = "auto"
    ):
        gated = denses[0].w_gate is not None
        super().__init__(num_experts, local_experts, denses[0].d_model, activation, gated, impl)
        assert len(denses) == self.num_local_experts
        self.w_in = _stack([d.w_in for d in denses])
        self.b_in = _stack([d.b_in for d in denses])
        self.w_out = _stack([d.w_out for d in denses])
        self.b_out = _stack([d.b_out for d in denses])
        self.w_gate = _stack([d.w_gate for d in denses])
        self._tag_stacked()
        self.resolve_backend()

    def stacked_weight(self, name: str) -> Tensor:
        return getattr(self, name)

    def param_roles(self) -> ParamRoles:
        return ParamRoles(
            expert=[p for p in (self.w_in, self.b_in, self.w_out, self.b_out, self.w_gate) if p is not None]
        )


class MPOEExperts(ExpertBank):
    """Experts whose weight matrices share one MPO central tensor each and own their auxiliary tensors.

    `method` ('auto' | 'dense' | 'chain') is the loop backend's choice between
    rebuilding W and pushing tokens through the chain; the grouped backend always rebuilds.
    """

    kind = "mpoe"

    def __init__(
        self,
        num_experts: int,
        local_experts: range,
        dense: DenseFFN,
        activation: str,
        bond_dim: Optional[int] = None,
        num_factors: int = 5,
        aux_init_noise: float = 0.0,
        noise_seed: int = 0,
        method: str = "auto",
        impl: str = "auto",
        recompute_weights: bool = False,
    ):
        super().__init__(num_experts, local_experts, dense.d_model, activation, dense.w_gate is not None, impl)
        self.bond_dim, self.method = bond_dim, method
        self.recompute_weights = recompute_weights
        model_f, ff_f = mpo.factorize(dense.d_model, num_factors), mpo.factorize(dense.d_ff, num_factors)
        self.factors = {"w_in": (model_f, ff_f), "w_out": (ff_f, model_f), "w_gate": (model_f, ff_f)}
        self.central_index = mpo.central_index(num_factors)
        self.central = nn.ParameterDict()
        self.auxiliary = nn.ModuleDict()
        L, c = self.num_local_experts, self.central_index
        for name in self.weight_names():
            tensors = mpo.decompose(getattr(dense, name), *self.factors[name], bond_dim=bond_dim)
            self.central[name] = nn.Parameter(tensors[c])
            aux = []
            for k, t in enumerate(tensors):
                if k == c:
                    continue
                stacked = t.unsqueeze(0).repeat(L, *([1] * t.dim()))
                if aux_init_noise > 0:
                    rms = t.pow(2).mean().sqrt()
                    for e, g in enumerate(local_experts):
                        gen = torch.Generator().manual_seed(_noise_seed(noise_seed, name, k, g))
                        stacked[e] += aux_init_noise * rms * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                aux.append(nn.Parameter(stacked))
            self.auxiliary[name] = nn.ParameterList(aux)
        self.b_in = _stack([dense.b_in] * L)
        self.b_out = _stack([dense.b_out] * L)
        self._tag_stacked()
        self.resolve_backend()

    def expert_chains(self, name: str) -> list[list[Tensor]]:
        """Per local expert, its n local tensors for weight `name` (auxiliaries around the shared central)."""
        per_position = [a.unbind(0) for a in self.auxiliary[name]]
        c = self.central_index
        return [
            [p[e] for p in per_position[:c]] + [self.central[name]] + [p[e] for p in per_position[c:]]
            for e in range(self.num_local_experts)
        ]

    def stacked_chain(self, name: str) -> list[Tensor]:
        """All local experts' chain for `name`: stacked auxiliaries [L, d, i, j, d'] around the shared central."""
        aux, c = list(self.auxiliary[name]), self.central_index
        return aux[:c] + [self.central[name]] + aux[c:]

    def stacked_weight(self, name: str) -> Tensor:
        """Every local expert's W for `name` at once, [L, I, J]: one batched contraction of the chains.

        The central tensor has no expert axis and broadcasts, so autograd sums its
        gradient over the experts; the auxiliaries' gradients come out stacked."""
        return mpo.contract(self.stacked_chain(name))

    def grouped_weight(self, name: str, num_rows: int, layout: Optional[str] = None) -> GroupedWeight:
        """W for `name` for the grouped backend, in the layout that moves the fewest elements besides the GEMMs
        for `num_rows` rows (`mpo.cheapest_layout`; `layout` forces one: contract | rows | cols)."""
        chain = self.stacked_chain(name)
        layout = layout or mpo.cheapest_layout([t.shape[-4:] for t in chain], self.num_local_experts, num_rows)
        if layout == "contract":
            return GroupedWeight(mpo.contract(chain))
        matrix, perm = mpo.permuted_product(chain, layout)
        if layout == "rows":
            return GroupedWeight(matrix, in_perm=perm)
        return GroupedWeight(matrix.transpose(-2, -1), out_perm=perm)

    def halves(self, name: str, transposed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """All local experts' chain for `name` as `mpo.split_halves` gives it.

        Returns left [L, a, b, d], right [L, d, c, e] and the permutation."""
        halves = mpo.split_halves(self.stacked_chain(name), transposed)
        if halves is None:
            raise ValueError(f"MPO of {name} has a single tensor: use num_mpo_factors >= 2")
        left, right, perm = halves
        L = self.num_local_experts  # a half may hold only the shared central tensor
        return left.expand(L, *left.shape[-3:]), right.expand(L, *right.shape[-3:]), perm

    def expert_weight(self, name: str, local_expert: int) -> Tensor:
        """Expert `local_expert`'s dense weight `name` (x @ W layout)."""
        return mpo.contract(self.expert_chains(name)[local_expert])

    def param_roles(self) -> ParamRoles:
        return ParamRoles(
            central=list(self.central.values()),
            auxiliary=[p for plist in self.auxiliary.values() for p in plist],
            expert=[p for p in (self.b_in, self.b_out) if p is not None],
        )


def build_expert_bank(
    cfg, d_model: int, d_ff: int, activation: str, placement, dense: Optional[DenseFFN] = None, bias: bool = True
) -> ExpertBank:
    """cfg: MoEConfig (kind 'switch' | 'mpoe'); placement: ExpertPlacement; dense: upcycle from this FFN if given.

    `bias` only matters when initialising from scratch (T5 FFNs have none).
    """
    gated = dense.w_gate is not None if dense is not None else activation.startswith("gated-")
    if dense is not None and (dense.d_model, dense.d_ff) != (d_model, d_ff):
        raise ValueError(f"dense FFN is {dense.d_model}x{dense.d_ff}, expected d_model={d_model}, d_ff={d_ff}")
    local = placement.local_experts(cfg.num_experts)
    impl = cfg.expert_impl
    # The same on every rank: the global RNG is seeded alike (build.py).
    base_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
    if cfg.kind == "switch":
        if dense is not None:
            denses = [dense] * len(local)
        else:
            denses = [
                DenseFFN.random(d_model, d_ff, gated, bias, generator=torch.Generator().manual_seed(base_seed + e))
                for e in local
            ]
        bank: ExpertBank = SwitchExperts(cfg.num_experts, local, denses, activation, impl=impl)
    elif cfg.kind == "mpoe":
        if dense is None:
            dense = DenseFFN.random(d_model, d_ff, gated, bias, generator=torch.Generator().manual_seed(base_seed))
        bank = MPOEExperts(
            cfg.num_experts,
            local,
            dense,
            activation,
            bond_dim=cfg.bond_dim,
            num_factors=cfg.num_mpo_factors,
            aux_init_noise=cfg.aux_init_noise,
            noise_seed=base_seed,
            impl=impl,
            recompute_weights=cfg.recompute_mpo_weights,
        )
    else:
        raise ValueError(f"moe.kind={cfg.kind!r} has no expert bank: use 'switch' or 'mpoe'")
    # DeepSpeed reduces the per-expert parameters over the expert-data-parallel group this tag names.
    bank.mark_expert_params(placement.group_name)
    return bank


def resolve_expert_backends(
    model: nn.Module, device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
) -> Optional[str]:
    """Every expert bank's backend chosen for computing on `device` in `dtype` (default: where each bank's parameters
    are), after the model was placed there. Returns the line to log, 'experts: grouped, bf16, sm90', or None
    for a model without experts."""
    chosen = {m.resolve_backend(device, dtype) for m in model.modules() if isinstance(m, ExpertBank)}
    return f"experts: {'; '.join(sorted(chosen))}" if chosen else None
