"""Loading a checkpoint on a different layout: another world size, `parallel.ep_size` or ZeRO stage.

A rank file holds the shared parameters and that rank's local experts. Expert
parameters are stacked along a leading local-expert axis, and expert-parallel
rank p holds global experts [p*L, (p+1)*L), so the first ep_size rank files
(ranks 0..P-1, one expert-parallel group) hold every expert once: concatenating
their expert tensors gives all E experts in global order, which a new layout
slices again. Shared parameters are the same on every rank; rank 0's are used.

The optimizer follows its parameters through a *portable* form of Adam's state
(`exp_avg`, `exp_avg_sq` per parameter name, full tensors, and the step count).
At ZeRO 1/2 it is written next to the native state at save: DeepSpeed's own
ZeRO state is flat, padded partitions that only fit the layout they were
written with, and DeepSpeed's tensor-fragment API (`safe_get/set_full_*`) reads
and writes them per parameter. At ZeRO 0 with torch's optimizer the native
state is per parameter already, so the checkpoint stores it once, with the
parameter names in the optimizer's order, and the portable form is derived from
it on load (`portable_state`): the same tensors, not a second copy on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mpoe.models.param_tags import is_expert_param
from mpoe.train.rng import set_rng_state

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _zero_partitioned(engine) -> bool:
    return engine.zero_optimization_stage() > 0


def _adam_step(engine) -> int:
    opt = engine.optimizer.optimizer if _zero_partitioned(engine) else engine.optimizer
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _link_optimizer_fragments(engine) -> None:
    """ZeRO 1/2 link each parameter's view of the Adam state lazily, possibly before torch's Adam
    created exp_avg/exp_avg_sq; link again so the tensor-fragment API sees them."""
    optimizer = engine.optimizer
    if _zero_partitioned(engine) and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        for flat in optimizer.single_partition_of_fp32_groups:  # torch Adam's lazy state, made now
            state = optimizer.optimizer.state[flat]
            if "exp_avg" not in state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def portable_optimizer_state(engine) -> dict:
    """{name: {exp_avg, exp_avg_sq}} for this rank's parameters, plus the step. Collective at ZeRO 1/2."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_optimizer_fragments(engine)
    per_param = {}
    for name, p in engine.module.named_parameters():
        if _zero_partitioned(engine):
            values = {k: safe_get_full_optimizer_state(p, k) for k in ADAM_KEYS}
        else:
            values = {k: engine.optimizer.state.get(p, {}).get(k) for k in ADAM_KEYS}
        if all(v is not None for v in values.values()):
            per_param[name] = {k: v.detach().cpu().clone() for k, v in values.items()}
    return {"step": _adam_step(engine), "params": per_param}


def native_is_per_parameter(engine) -> bool:
    """ZeRO 0 with torch's own optimizer (fp32): its state_dict holds Adam's state per parameter."""
    return not _zero_partitioned(engine) and isinstance(engine.optimizer, torch.optim.Optimizer)


def optimizer_param_names(engine) -> list[str]:
    """Parameter names in the order torch's `Optimizer.state_dict` numbers them (groups in order, then params)."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [names[id(p)] for group in engine.optimizer.param_groups for p in group["params"]]


def optimizer_fields(engine) -> dict:
    """What a rank file stores of the optimizer: the native state, and the portable form where it is not the
    same tensors (ZeRO 1/2) or the names that make the native state portable (ZeRO 0). Collective at ZeRO 1/2."""
    fields = {"optimizer": engine.optimizer.state_dict()}
    if native_is_per_parameter(engine):
        fields["optimizer_param_names"] = optimizer_param_names(engine)
    else:
        fields["portable_optimizer"] = portable_optimizer_state(engine)
    return fields


def portable_state(state: dict) -> dict | None:
    """The portable optimizer form of a rank file: stored (ZeRO 1/2), or derived from the native per-parameter
    state and its names (ZeRO 0); None for a file that has neither (an older ZeRO 0 checkpoint has the first)."""
    if "portable_optimizer" in state:
        return state["portable_optimizer"]
    names = state.get("optimizer_param_names")
    if names is None:
        return None
    native = state["optimizer"]
    indices = [i for group in native["param_groups"] for i in group["params"]]
    per_param, step = {}, None
    for index, name in zip(indices, names):
        adam = native["state"].get(index, {})
        if all(adam.get(k) is not None for k in ADAM_KEYS):
            per_param[name] = {k: adam[k] for k in ADAM_KEYS}
            if step is None and "step" in adam:
                step = int(adam["step"])
    return {"step": step or 0, "params": per_param}


def _expert_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if is_expert_param(p)}


def _relayout(name: str, saved: list, expert: bool, lo: int, count: int, num_experts: int):
    """The tensor for `name` in the new layout, from the saved ep group's values (None if absent)."""
    if saved[0] is None:
        return None
    if not expert:
        return saved[0]
    full = torch.cat(saved, dim=0)
    if full.shape[0] != num_experts:
        raise RuntimeError(f"{name}: {full.shape[0]} stacked experts in the checkpoint, expected {num_experts}")
    return full[lo : lo + count]


def load_resharded(engine, path: Path, meta: dict, ep_rank: int, num_local: int, num_experts: int, rank: int) -> dict:
    """Restore module, optimizer, schedule and RNG from a checkpoint written on another layout."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    old_ep = meta["ep_size"]
    states = [torch.load(path / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False) for r in range(old_ep)]
    portable = [portable_state(s) for s in states]
    if any(p is None for p in portable):
        raise RuntimeError(
            f"checkpoint {path} has no portable optimizer state: it can only be resumed on its own layout"
        )
    experts = _expert_names(engine.module)
    lo = ep_rank * num_local

    module_state = {}
    for name in engine.module.state_dict():
        module_state[name] = _relayout(
            name, [s["module"].get(name) for s in states], name in experts, lo, num_local, num_experts
        )
    engine.module.load_state_dict(module_state)

    step = portable[0]["step"]
    _link_optimizer_fragments(engine)
    for name, p in engine.module.named_parameters():
        adam = {
            k: _relayout(
                name,
                [p["params"].get(name, {}).get(k) for p in portable],
                name in experts,
                lo,
                num_local,
                num_experts,
            )
            for k in ADAM_KEYS
        }
        if _zero_partitioned(engine):
            safe_set_full_fp32_param(p, p.data)  # the optimizer's fp32 master partition, from the loaded weight
            for k, v in adam.items():
                if v is not None:
                    safe_set_full_optimizer_state(p, v, k)
        elif adam["exp_avg"] is not None:
            engine.optimizer.state[p] = {"step": torch.tensor(float(step)), **adam}
    if _zero_partitioned(engine):
        for state in engine.optimizer.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step)) if torch.is_tensor(state["step"]) else step

    if engine.lr_scheduler is not None and states[0]["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(states[0]["lr_scheduler"])
        # The schedule writes the LR into the optimizer only when it steps; the native path gets it
        # from the saved param groups, whose layout is not ours here: write the current LR now.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_lr()):
            group["lr"] = lr
    engine.global_steps = states[0]["global_steps"]
    set_rng_state(states[rank]["rng"] if rank < len(states) else states[0]["rng"])
    return meta
