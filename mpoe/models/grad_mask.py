"""The MPOE gradient mask: a random element-wise Bernoulli mask on chosen MPO tensors' gradients.

Why: the shared central tensor gets gradient from every expert's tokens, each
expert's auxiliary tensors only from their own; the paper masks gradients
(Child-Tuning style) so only a random subset of entries moves per step.

Choices (configurable through `moe.grad_mask.*`):
- Target: 'central' (default), 'auxiliary' or 'all' MPO tensors, found through
  each bank's `param_roles()` (biases and Switch weights are never masked).
- Rescale: kept entries are divided by keep_prob, so the masked gradient is an
  unbiased estimate of the full one (Child-Tuning's choice). The mask is 0/1 in
  the parameter's dtype and the gradient is multiplied by the Python float
  1/keep_prob, which torch applies in float32 for bf16/fp16 gradients and rounds
  once: a bf16 multiplier would itself be rounded (1/0.3 -> 3.328, biased by 0.2%).
- When: one mask per optimizer step, the same for every micro-batch of the
  accumulation window (call `set_step(step)` before the window). Masking is
  linear, so this equals masking the accumulated gradient.
- Where: a tensor hook (`param.register_hook`), which acts on the gradient
  before it is accumulated into `.grad`, hence before DeepSpeed's reduction
  hooks (ZeRO 1/2 included) see it.
- Identical replicas: every entry's draw is a counter-based hash of
  (seed, step, parameter index, global expert id, entry index), computed with
  integer ops on the parameter's own device. Integer math is exact, so every
  data-parallel replica, on any device, draws the same mask (replicas of the
  shared central tensor never drift), and a stacked per-expert tensor
  (attribute `first_expert`, leading axis = local experts) gets masks that do
  not depend on how experts are spread over ranks. One vectorized draw per
  tensor: no host RNG, no host-to-device copy, no per-expert loop.
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


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so no product overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons' integer hash): a bijection of [0, 2**32); every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def bernoulli_hash(key: int, slices: Tensor, numel: int, keep_prob: float) -> Tensor:
    """Boolean (len(slices), numel): entry j of slice s is kept iff hash(key, s, j) < keep_prob * 2**32.

    `slices` (int64, on the target device) names each slice, e.g. by global expert id."""
    lo, hi = key & _M32, (key >> 32) & _M32
    slice_key = _mix32(_mix32(slices & _M32) ^ lo)[:, None]
    entries = torch.arange(numel, device=slices.device, dtype=torch.int64) & _M32
    draws = _mix32(_mix32(entries[None, :] ^ slice_key) ^ hi)
    return draws < round(keep_prob * 2**32)


class GradientMask:
    def __init__(self, params: list[nn.Parameter], keep_prob: float, rescale: bool = True, seed: int = 0):
        self.params, self.keep_prob, self.rescale, self.seed = list(params), keep_prob, rescale, seed
        self.scale = 1.0 / keep_prob if rescale and keep_prob > 0 else 1.0  # a Python float: see the docstring
        self.step = 0
        self._masks: dict[int, Tensor] = {}
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def set_step(self, step: int) -> None:
        """Draw fresh masks for optimizer step `step` (they are kept for its micro-batches)."""
        if step != self.step:
            self._masks.clear()
        self.step = step

    def mask(self, index: int) -> Tensor:
        """The 0/1 keep mask of parameter `index` at the current step, in its dtype (the gradient is
        multiplied by it and then by `self.scale`)."""
        if index not in self._masks:
            p = self.params[index]
            first = first_expert(p)
            if first is None:  # one slice: the whole tensor
                slices, shape = torch.zeros(1, dtype=torch.int64, device=p.device), p.shape
            else:  # one slice per local expert, named by its global id
                slices, shape = torch.arange(first, first + p.shape[0], device=p.device), p.shape[1:]
            keep = bernoulli_hash(_seed(self.seed, self.step, index), slices, shape.numel(), self.keep_prob)
            self._masks[index] = keep.to(p.dtype).view(p.shape)
        return self._masks[index]

    def _hook(self, index: int):
        def hook(grad: Tensor):
            if self.keep_prob == 1.0:
                return None
            masked = grad * self.mask(index)  # exact: each entry is 0 or the gradient's own value
            return masked if self.scale == 1.0 else masked.mul_(self.scale)  # one rounding, from float32 math

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
