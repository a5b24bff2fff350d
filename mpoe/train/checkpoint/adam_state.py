"""Adam's state per parameter, whichever DeepSpeed optimizer holds it: written when a checkpoint is resharded, and
read from a live optimizer (the truth the checkpoint tests compare the stored form with).

Per parameter that is `exp_avg`, `exp_avg_sq` and, where the model's weights are
not float32, the float32 master copy the optimizer updates (`master`): the
weight a bf16 or fp16 run really trains, which its bf16/fp16 module weight only
rounds. DeepSpeed keeps these in two shapes (bf16/fp16 always run ZeRO >= 1,
`engine.zero_stage`):

- ZeRO 0 (float32): our torch AdamW itself; its state is keyed by the module's
  parameters, which are their own masters (`TorchAdam`).
- ZeRO 1/2 (bf16's ZeRO 1 is DeepSpeed's BF16_Optimizer, of the same shape): flat
  padded partitions, read and written per parameter through DeepSpeed's
  tensor-fragment API (`safe_get/set_full_*`), collective (`ZeroAdam`).

`holder(engine)` picks the shape. A checkpoint's Adam state, joined by parameter
name (`reshard.portable_forms`), is written through it, so a checkpoint written in
one shape resumes in the other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def step_tensor(step: int, group: dict, param: Tensor) -> Tensor:
    """Adam's step count as torch keeps it for `param` of `group` (its `Optimizer.load_state_dict` rule): a float32
    tensor on the parameter's device for fused or capturable Adam, whose kernels read it there (on CUDA a CPU step
    would hand the fused kernel a host pointer), else a CPU tensor."""
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(float(step), dtype=torch.float32, device=param.device)
    return torch.tensor(float(step))


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict:
    return next(group for group in optimizer.param_groups if any(p is param for p in group["params"]))


def _step_of(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


class TorchAdam:
    """ZeRO 0 (float32): torch's AdamW keyed by the module's parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def params_in_order(self) -> list[nn.Parameter]:
        """The module parameters in the order the native `state_dict` numbers them."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self) -> int:
        return _step_of(self.optimizer)

    def read(self, p: nn.Parameter) -> dict[str, Tensor]:
        return {k: v for k in ADAM_KEYS if (v := self.optimizer.state.get(p, {}).get(k)) is not None}

    def write(self, p: nn.Parameter, values: dict[str, Tensor], step: int) -> None:
        # The master is the parameter itself, loaded with the module.
        adam = {k: values[k].to(p.device, torch.float32) for k in ADAM_KEYS if values.get(k) is not None}
        if len(adam) == len(ADAM_KEYS):
            self.optimizer.state[p] = {"step": step_tensor(step, _group_of(self.optimizer, p), p), **adam}

    def finish(self, step: int) -> None:
        pass


class ZeroAdam:
    """ZeRO 1/2: per-parameter views of the flat partitions (DeepSpeed's tensor-fragment API; collective)."""

    def __init__(self, wrapper):
        self.wrapper = wrapper
        self._link_fragments()

    def _link_fragments(self) -> None:
        """ZeRO 1/2 link each parameter's view of the Adam state lazily, possibly before torch's Adam
        created exp_avg/exp_avg_sq; create them and link again so the tensor-fragment API sees them."""
        wrapper = self.wrapper
        if not hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
            return
        for group in wrapper.optimizer.param_groups:
            for flat in group["params"]:
                state = wrapper.optimizer.state[flat]
                if "exp_avg" not in state:
                    zeros = torch.zeros_like
                    state.update(step=step_tensor(0, group, flat), exp_avg=zeros(flat), exp_avg_sq=zeros(flat))
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()

    def step(self) -> int:
        return _step_of(self.wrapper.optimizer)

    def read(self, p: nn.Parameter) -> dict[str, Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        values = {k: v for k in ADAM_KEYS if (v := safe_get_full_optimizer_state(p, k)) is not None}
        if p.dtype != torch.float32:  # a float32 weight is its own master: no collective read of a copy
            values["master"] = safe_get_full_fp32_param(p)
        return values

    def write(self, p: nn.Parameter, values: dict[str, Tensor], step: int) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(p, values["master"].to(p.device))
        for k in ADAM_KEYS:
            if values.get(k) is not None:
                safe_set_full_optimizer_state(p, values[k].to(p.device), k)

    def finish(self, step: int) -> None:
        optimizer = self.wrapper.optimizer
        for group in optimizer.param_groups:
            for flat in group["params"]:
                state = optimizer.state.get(flat, {})
                if "step" in state:
                    state["step"] = step_tensor(step, group, flat) if torch.is_tensor(state["step"]) else step


def holder(engine):
    """The view of Adam's state that fits `engine`'s optimizer (see the module doc)."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() > 0:
        return ZeroAdam(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        return TorchAdam(optimizer)
    raise TypeError(f"no per-parameter view of Adam's state in DeepSpeed's {type(optimizer).__name__}")
