"""The state of the optimizer DeepSpeed's engine steps: saved and loaded as is, and Adam's state per parameter.

DeepSpeed keeps Adam's state in one of two shapes (bf16/fp16 always run ZeRO >= 1,
`engine.zero_stage`):

- ZeRO 0 (float32): our torch AdamW itself; its state is keyed by the module's
  parameters, which are their own masters (`TorchAdam`).
- ZeRO 1/2 (bf16's ZeRO 1 is DeepSpeed's BF16_Optimizer, of the same shape): flat
  padded partitions, one per optimizer parameter set, each spread over the ranks of
  a process group (the data-parallel group; for expert parameters the
  expert-data-parallel group). A rank's saved state holds its partitions and, per
  parameter name, where that parameter's fragment lies in them
  (`param_slice_mappings`). A live optimizer is read and written per parameter
  through DeepSpeed's tensor-fragment API (`safe_get/set_full_*`), collectively
  (`ZeroAdam`).

Per parameter, Adam's state is `exp_avg`, `exp_avg_sq` and, where the model's
weights are not float32, the float32 master copy the optimizer updates (`master`):
the weight a bf16 or fp16 run really trains, which its module weight only rounds.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")

# The key of a ZeRO 1/2 rank file under which `partition_ranks` is saved (the name checkpoints have on disk).
ZERO_GROUPS_KEY = "zero_groups"


def per_parameter(engine) -> bool:
    """ZeRO 0 (float32, torch's AdamW): the optimizer's state_dict holds Adam's state per parameter."""
    return engine.zero_optimization_stage() == 0


def partition_ranks(engine) -> list[list[int]]:
    """ZeRO 1/2: per optimizer parameter set, the global ranks its partitions are spread over, in partition order."""
    process_groups = engine.optimizer.real_dp_process_group
    if not dist.is_initialized():
        return [[0] for _ in process_groups]
    return [dist.get_process_group_ranks(group) for group in process_groups]


def native_state(engine) -> dict:
    """The optimizer's own `state_dict`: ZeRO 1/2's holds this rank's partitions only."""
    return engine.optimizer.state_dict()


def load_native_state(engine, state: dict, world_size: int) -> None:
    """Load what `native_state` saved on the same layout (same world size and ZeRO stage) into this rank."""
    optimizer = engine.optimizer
    if per_parameter(engine):
        optimizer.load_state_dict(state)
        return
    # ZeRO 1/2 takes a list indexed by data-parallel rank; with the same world only our own entry is read.
    parts = [None] * world_size
    parts[dist.get_rank(group=optimizer.dp_process_group) if world_size > 1 else 0] = state
    optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)


def saved_partition(native: dict, index: int) -> Optional[tuple[int, dict[str, Tensor], dict[str, slice]]]:
    """From a ZeRO 1/2 rank's saved `native_state`, its partition of optimizer parameter set `index`: (Adam's step,
    the flat `exp_avg`, `exp_avg_sq` and float32 `master`, {parameter name: its fragment's slice of them}); None
    when the optimizer has not stepped (no moments yet)."""
    adam = native["base_optimizer_state"]["state"].get(index)
    if adam is None:
        return None
    flats = {**{k: adam[k] for k in ADAM_KEYS}, "master": native["single_partition_of_fp32_groups"][index]}
    slices = {
        name: slice(address.start, address.start + address.numel)
        for name, address in native["param_slice_mappings"][index].items()
    }
    return int(adam["step"]), flats, slices


def step_tensor(step: int, param_set: dict, param: Tensor) -> Tensor:
    """Adam's step count as torch keeps it for `param` of `param_set` (its `Optimizer.load_state_dict` rule): a
    float32 tensor on the parameter's device for fused or capturable Adam, whose kernels read it there (on CUDA a
    CPU step would hand the fused kernel a host pointer), else a CPU tensor."""
    if param_set.get("fused") or param_set.get("capturable"):
        return torch.tensor(float(step), dtype=torch.float32, device=param.device)
    return torch.tensor(float(step))


def _set_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict:
    return next(s for s in optimizer.param_groups if any(p is param for p in s["params"]))


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
        return [p for param_set in self.optimizer.param_groups for p in param_set["params"]]

    def step(self) -> int:
        return _step_of(self.optimizer)

    def read(self, p: nn.Parameter) -> dict[str, Tensor]:
        return {k: v for k in ADAM_KEYS if (v := self.optimizer.state.get(p, {}).get(k)) is not None}

    def write(self, p: nn.Parameter, values: dict[str, Tensor], step: int) -> None:
        # The master is the parameter itself, loaded with the module.
        adam = {k: values[k].to(p.device, torch.float32) for k in ADAM_KEYS if values.get(k) is not None}
        if len(adam) == len(ADAM_KEYS):
            self.optimizer.state[p] = {"step": step_tensor(step, _set_of(self.optimizer, p), p), **adam}

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
        for param_set in wrapper.optimizer.param_groups:
            for flat in param_set["params"]:
                state = wrapper.optimizer.state[flat]
                if "exp_avg" not in state:
                    zeros = torch.zeros_like
                    state.update(step=step_tensor(0, param_set, flat), exp_avg=zeros(flat), exp_avg_sq=zeros(flat))
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()

    def step(self) -> int:
        return _step_of(self.wrapper.optimizer)

    def read(self, p: nn.Parameter) -> dict[str, Tensor]:
        # deferred: importing DeepSpeed is slow, and checkpoint code is imported where no engine is built
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        values = {k: v for k in ADAM_KEYS if (v := safe_get_full_optimizer_state(p, k)) is not None}
        if p.dtype != torch.float32:  # a float32 weight is its own master: no collective read of a copy
            values["master"] = safe_get_full_fp32_param(p)
        return values

    def write(self, p: nn.Parameter, values: dict[str, Tensor], step: int) -> None:
        # deferred: importing DeepSpeed is slow, and checkpoint code is imported where no engine is built
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(p, values["master"].to(p.device))
        for k in ADAM_KEYS:
            if values.get(k) is not None:
                safe_set_full_optimizer_state(p, values[k].to(p.device), k)

    def finish(self, step: int) -> None:
        optimizer = self.wrapper.optimizer
        for param_set in optimizer.param_groups:
            for flat in param_set["params"]:
                state = optimizer.state.get(flat, {})
                if "step" in state:
                    state["step"] = step_tensor(step, param_set, flat) if torch.is_tensor(state["step"]) else step


def adam_view(engine) -> TorchAdam | ZeroAdam:
    """The per-parameter view of Adam's state that fits `engine`'s optimizer (see the module doc)."""
    optimizer = engine.optimizer
    if not per_parameter(engine):
        return ZeroAdam(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        return TorchAdam(optimizer)
    raise TypeError(f"no per-parameter view of Adam's state in DeepSpeed's {type(optimizer).__name__}")
