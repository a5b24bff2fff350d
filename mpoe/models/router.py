"""Top-k router: which experts each token goes to, with what gate weight, and the router losses.

The arithmetic is Megatron-Core's (`moe_utils`), which runs on CPU tensors, so our
routing matches a reference implementation the field trusts. Two places deviate,
each because Megatron's CPU path would be wrong or degenerate for us:

- drop_policy='position' keeps the *first* `capacity` tokens of each expert by a
  cumulative count. Megatron picks them with `torch.topk` over a 0/1 map, whose
  choice among ties is not positional on CPU (it may keep tokens other than the first).
- drop_policy='probs' ranks an expert's tokens by the router's full-softmax score
  for that expert, not by the gate weight: with top-1 and softmax after top-k the
  gate weight is 1 for every token, and ranking ties would be arbitrary.

Load-balancing statistics are computed over this rank's local tokens (Megatron's
default): the aux loss and the capacity of a rank depend only on its own tokens, so
a rank's routing is the same whatever the expert-parallel size, which is what makes
ep_size=P reproduce ep_size=1 exactly. Each rank's aux loss is its own micro-batch's
Switch loss; data parallelism averages them like the LM loss.

`TopKRouter` is the router `moe.router=topk` picks (`mpoe.models.moe_builder`); what
any router returns is `RouterOutput` (`mpoe.models.interfaces`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.transformer.moe import moe_utils
from torch import Tensor, nn

from mpoe.config import MoEConfig
from mpoe.models.interfaces import RouterOutput


class _GateLogitsInFloat32(torch.autograd.Function):
    """tokens @ weight^T in float32, keeping tokens and weight in their own dtypes for backward.

    Megatron-Core's `RouterGatingLinearFunction`, the same arithmetic (Megatron's own needs Transformer Engine
    to run). Autograd through `F.linear(tokens.float(), weight.float())` computes the same
    values and gradients but keeps the float32 copy of the tokens: twice a bf16 layer input, per MoE layer.
    """

    @staticmethod
    def forward(ctx, tokens: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(tokens, weight)
        return torch.mm(tokens.float(), weight.float().t())

    @staticmethod
    def backward(ctx, grad: Tensor):
        tokens, weight = ctx.saved_tensors
        grad_tokens = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_tokens = torch.mm(grad, weight.float()).to(tokens.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad.t(), tokens.float()).to(weight.dtype)
        return grad_tokens, grad_weight


class TopKRouter(nn.Module):
    """Softmax or sigmoid scores over a linear gate, top-k experts per token, optional capacity dropping."""

    def __init__(self, cfg: MoEConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=cfg.router_init_std)

    def capacity_factor(self) -> Optional[float]:
        return self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor

    def forward(self, tokens: Tensor) -> RouterOutput:
        """tokens [N, d_model] -> RouterOutput; routing runs in float32 whatever the input dtype."""
        cfg = self.cfg
        if self.training and cfg.jitter_eps > 0:
            # Switch Transformer's multiplicative jitter: explore routings near the current one. Drawn and applied in
            # float32, as HF's Switch router does: in bf16 (8 significant bits) uniform(1 - eps, 1 + eps) rounds to
            # a few values, never above 1 for eps = 0.01 and only 1.0 for eps = 0.001, i.e. no jitter.
            tokens = tokens.float()
            noise = torch.empty_like(tokens).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
            tokens = tokens * noise
        logits = self.gate_logits(tokens)

        probs, routing_map = moe_utils.topk_routing_with_score_function(
            logits, self.top_k, use_pre_softmax=cfg.pre_softmax, score_function=cfg.score_function
        )
        probs = self._normalize(logits, probs, routing_map)

        # Full-distribution scores: what the aux loss balances and what 'probs' dropping ranks by.
        _, scores = moe_utils.compute_routing_scores_for_aux_loss(logits, self.top_k, cfg.score_function)
        tokens_per_expert = routing_map.sum(dim=0)
        aux_loss = moe_utils.switch_load_balancing_loss_func(
            scores,
            tokens_per_expert,
            total_num_tokens=logits.shape[0],
            topk=self.top_k,
            num_experts=self.num_experts,
            moe_aux_loss_coeff=cfg.aux_loss_coef,
        )
        z_loss = moe_utils.z_loss_func(logits, cfg.z_loss_coef)

        kept = self._apply_capacity(routing_map, scores)
        # Monitoring only, and each a kernel per layer and step on a GPU: dropless drops nothing to count, and
        # entr(p) = -p log p (0 at p = 0) is the entropy's terms in one op.
        tokens_dropped = (
            routing_map.sum() - kept.sum() if kept is not routing_map else logits.new_zeros((), dtype=torch.long)
        )
        p = scores.detach()
        entropy = torch.special.entr(p).sum(dim=-1).mean() if p.shape[0] else p.new_zeros(())
        gate = self._straight_through(scores, kept) if cfg.gate_scale == "straight_through" else probs * kept
        return RouterOutput(
            gate,
            kept,
            aux_loss,
            z_loss,
            tokens_per_expert.long(),
            tokens_dropped,
            entropy,
            dropless=self.capacity_factor() is None,
        )

    def gate_logits(self, tokens: Tensor) -> Tensor:
        """[N, E] router logits computed in float32 whatever the training dtype.

        The Switch Transformer's selective precision (as HF's SwitchTransformersTop1Router does):
        in bf16 the gate's matmul rounds logits enough to send some tokens to another expert.
        `_GateLogitsInFloat32` casts inside its forward and backward, so what is kept for backward is the
        tokens in their own dtype, not a float32 copy of them. Autocast is switched off so that it cannot
        turn the float32 matmul back into bf16.
        """
        device = tokens.device.type
        # No autocast to switch off on devices without one (meta: shape-only runs). CUDA and CPU are named first
        # so that torch.compile need not trace is_autocast_available, which not every torch can (a graph break).
        has_autocast = device in ("cuda", "cpu") or torch.amp.is_autocast_available(device)
        off = torch.autocast(device, enabled=False) if has_autocast else contextlib.nullcontext()
        with off:
            return _GateLogitsInFloat32.apply(tokens, self.gate.weight)

    def _normalize(self, logits: Tensor, probs: Tensor, routing_map: Tensor) -> Tensor:
        """Make the top-k gate weights sum to 1 exactly when cfg.topk_normalized().

        Softmax after top-k is a distribution over the chosen experts by construction;
        Megatron always normalises sigmoid scores for k > 1, so undo that when asked not to.
        """
        normalize = self.cfg.topk_normalized()
        if self.cfg.score_function == "softmax" and self.cfg.pre_softmax and normalize:
            return probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.cfg.score_function == "sigmoid":
            raw = torch.sigmoid(logits) * routing_map
            return raw / raw.sum(dim=-1, keepdim=True).clamp_min(1e-20) if normalize else raw
        return probs

    @staticmethod
    def _straight_through(scores: Tensor, kept: Tensor) -> Tensor:
        """moe.gate_scale=straight_through: p / stop_gradient(p) for each kept pair, 0 elsewhere.

        Exactly 1 in the forward pass (x / x is 1 in floating point), so the expert's output goes through
        unscaled; in backward the gradient of p scaled by 1/p, so the router learns from the loss from the first
        step even when all experts are the same function (upcycled), where a gate-weighted sum whose weights add
        up to 1 gives it none. p is the chosen expert's probability under the full distribution (`scores`), as in
        the MPOE authors' code, not the gate weight: with pre_softmax=false (or moe.normalize_topk=true) top-1's
        gate weight is the constant 1 and would carry no gradient.
        """
        chosen = scores * kept
        return chosen / torch.where(kept, scores.detach(), torch.ones_like(scores))

    def _apply_capacity(self, routing_map: Tensor, scores: Tensor) -> Tensor:
        """The routing map with each expert's tokens beyond its capacity removed (dropless: unchanged)."""
        capacity_factor = self.capacity_factor()
        if capacity_factor is None:
            return routing_map
        if self.cfg.drop_policy == "position":
            capacity = moe_utils.get_capacity(routing_map.shape[0] * self.top_k, self.num_experts, capacity_factor)
            return routing_map & (routing_map.long().cumsum(dim=0) <= capacity)
        _, kept = moe_utils.apply_router_token_dropping(
            scores.detach() * routing_map, routing_map, self.top_k, capacity_factor, drop_policy="probs"
        )
        return kept
