"""The MPOE gradient mask: a random element-wise Bernoulli mask on chosen MPO tensors' gradients.

Why: the shared central tensor gets gradient from every expert's tokens, each
expert's auxiliary tensors only from their own; the paper masks gradients
(Child-Tuning style) so only a random subset of entries moves per step.

Choices (configurable through `moe.grad_mask.*`):
- Target: 'central' (default), 'auxiliary' or 'all' MPO tensors, found through
  each bank's `param_roles()` (biases and Switch weights are never masked).
- Rescale: kept entries are divided by keep_prob, so the masked gradient is an
  unbiased estimate of the full one (Child-Tuning's choice).
- When: one mask per optimizer step, the same for every micro-batch of the
  accumulation window (call `set_step(step)` before the window). Masking is
  linear, so this equals masking the accumulated gradient.
- Where: a tensor hook (`param.register_hook`), which acts on the gradient
  before it is accumulated into `.grad`, hence before DeepSpeed's reduction
  hooks (ZeRO 1/2 included) see it.
- Identical replicas: the mask comes from a CPU torch.Generator seeded by
  (seed, step, parameter index), so every data-parallel replica of a tensor
  draws the same mask and replicas of the shared central tensor never drift.
  A stacked per-expert tensor (attribute `first_expert`, leading axis = local
  experts) draws one mask per slice seeded by the *global* expert id, so the
  mask does not depend on how experts are spread over ranks.
- keep_prob = 1 leaves gradients untouched; keep_prob = 0 zeros them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Union

import torch
from torch import Tensor, nn

from mpoe.models.experts import ExpertBank
from mpoe.models.param_tags import first_expert


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class GradientMask:
    def __init__(self, params: list[nn.Parameter], keep_prob: float, rescale: bool = True, seed: int = 0):
        self.params, self.keep_prob, self.rescale, self.seed = list(params), keep_prob, rescale, seed
        self.step = 0
        self._masks: dict[int, Tensor] = {}
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def set_step(self, step: int) -> None:
        """Draw fresh masks for optimizer step `step` (they are kept for its micro-batches)."""
        if step != self.step:
            self._masks.clear()
        self.step = step

    def mask(self, index: int) -> Tensor:
        """The multiplier for parameter `index` at the current step (0, or 1 or 1/keep_prob)."""
        if index not in self._masks:
            p = self.params[index]
            first = first_expert(p)
            if first is None:
                keep = self._draw(p.shape, _seed(self.seed, self.step, index))
            else:
                keep = torch.stack(
                    [self._draw(p.shape[1:], _seed(self.seed, self.step, index, first + e)) for e in range(p.shape[0])]
                )
            scale = 1.0 / self.keep_prob if self.rescale and self.keep_prob > 0 else 1.0
            self._masks[index] = (keep.to(p.dtype) * scale).to(p.device)
        return self._masks[index]

    def _draw(self, shape, seed: int) -> Tensor:
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < self.keep_prob

    def _hook(self, index: int):
        def hook(grad: Tensor):
            if self.keep_prob == 1.0:
                return None
            return grad * self.mask(index)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def select_masked_params(model_or_banks: Union[nn.Module, Iterable[nn.Module]], target: str) -> list[nn.Parameter]:
    """The MPO tensors of every expert bank in `model_or_banks` that the mask should act on, in module order.

    `target` is moe.grad_mask.target, checked when the config was built."""
    roots = [model_or_banks] if isinstance(model_or_banks, nn.Module) else list(model_or_banks)
    roles = ["central", "auxiliary"] if target == "all" else [target]
    chosen, seen = [], set()
    for root in roots:
        for module in root.modules():
            if isinstance(module, ExpertBank):
                for role in roles:
                    for p in module.param_roles().of(role):
                        if id(p) not in seen:
                            seen.add(id(p))
                            chosen.append(p)
    return chosen
