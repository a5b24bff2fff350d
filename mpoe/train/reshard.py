"""Loading a checkpoint on a different layout: another world size, `parallel.ep_size` or ZeRO stage.

A rank file holds the shared parameters and that rank's local experts. Expert
parameters are stacked along a leading local-expert axis, and expert-parallel
rank p holds global experts [p*L, (p+1)*L), so the first ep_size rank files
(ranks 0..P-1, one expert-parallel group) hold every expert once: concatenating
their expert tensors gives all E experts in global order, which a new layout
slices again. Shared parameters are the same on every rank; rank 0's are used.

The optimizer follows its parameters through a *portable* form of Adam's state:
per parameter name, full tensors of `exp_avg`, `exp_avg_sq` and, for a bf16/fp16
model, the float32 master weight, plus the step count (`adam_state.py` reads and
writes it whichever DeepSpeed optimizer holds it). At ZeRO 1/2 it is written next
to the native state at save: DeepSpeed's own ZeRO state is flat, padded
partitions that only fit the layout they were written with. At ZeRO 0 (float32)
the native state is torch's AdamW's, per parameter already, so the checkpoint
stores it once, with the parameter names in the optimizer's order, and the portable form is derived from
it on load (`portable_state`): the same tensors, not a second copy on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mpoe.models.param_tags import is_expert_param
from mpoe.train import adam_state
from mpoe.train.adam_state import ADAM_KEYS
from mpoe.train.rng import set_rng_state


def portable_optimizer_state(engine) -> dict:
    """{"step", "params": {name: {exp_avg, exp_avg_sq[, master]}}} for this rank's parameters, on the CPU.
    The master weight is there only where it is not the module's weight itself (bf16/fp16). Collective at ZeRO 1/2."""
    adam = adam_state.holder(engine)
    per_param = {}
    for name, p in engine.module.named_parameters():
        values = adam.read(p)
        if all(values.get(k) is not None for k in ADAM_KEYS):
            per_param[name] = {k: v.detach().cpu().clone() for k, v in values.items()}
    return {"step": adam.step(), "params": per_param}


def native_is_per_parameter(engine) -> bool:
    """ZeRO 0 (float32, torch's AdamW): the optimizer's state_dict holds Adam's state per parameter."""
    return engine.zero_optimization_stage() == 0


def optimizer_param_names(engine) -> list[str]:
    """Parameter names in the order the native `state_dict` numbers them (groups in order, then params)."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [names[id(p)] for p in adam_state.holder(engine).params_in_order()]


def rank_file_fields(engine, rank: int, ep_size: int) -> dict:
    """The model and optimizer state rank `rank`'s checkpoint file holds. Collective at ZeRO 1/2.

    Data-parallel replicas hold the same weights and, at ZeRO 0, the same optimizer state,
    so only the first replica (ranks 0..ep_size-1, which hold every expert once) stores
    them; a later replica's file holds what is its own (its ZeRO 1/2 partition), and
    `with_replica_fields` fills in the rest from rank % ep_size's file. The portable form
    (ZeRO 1/2) is read by `load_resharded` from ranks 0..ep_size-1 only, and for shared
    parameters from rank 0 only, so that is where it is stored.
    """
    first_replica = rank < ep_size
    if native_is_per_parameter(engine):
        if not first_replica:
            return {}
        return {
            "module": engine.module.state_dict(),
            "optimizer": engine.optimizer.state_dict(),
            "optimizer_param_names": optimizer_param_names(engine),
        }
    portable = portable_optimizer_state(engine)  # every rank takes part in the collective reads
    fields = {"optimizer": engine.optimizer.state_dict()}
    if first_replica:
        experts = _expert_names(engine.module)
        kept = {n: v for n, v in portable["params"].items() if n in experts or rank == 0}
        fields.update(module=engine.module.state_dict(), portable_optimizer={**portable, "params": kept})
    return fields


def with_replica_fields(state: dict, path: Path, rank: int, ep_size: int) -> dict:
    """Rank `rank`'s file `state` completed by what its first-replica twin stored for both (see rank_file_fields)."""
    if "module" in state:
        return state
    twin = torch.load(path / f"rank_{rank % ep_size:05d}.pt", map_location="cpu", weights_only=False, mmap=True)
    return {**twin, **state}


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
    old_ep = meta["ep_size"]
    states = [torch.load(path / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False) for r in range(old_ep)]
    portable = [portable_state(s) for s in states]
    if any(p is None for p in portable):
        raise RuntimeError(
            f"checkpoint {path} has no portable optimizer state: it can only be resumed on its own layout"
        )
    if portable[0]["step"] > 0 and not portable[0]["params"]:  # bf16/fp16 at ZeRO 0 saved none before adam_state.py
        raise RuntimeError(
            f"checkpoint {path} holds no optimizer state by parameter name (a bf16/fp16 ZeRO-0 checkpoint of an "
            "older mpoe), so it cannot be resumed: start a new run (python -m mpoe.tools.export still reads it)"
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
    adam = adam_state.holder(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:  # frozen: not in the optimizer, its weight is the module's
            continue
        values = {
            k: _relayout(
                name, [q["params"].get(name, {}).get(k) for q in portable], name in experts, lo, num_local, num_experts
            )
            for k in (*ADAM_KEYS, "master")
        }
        if values["master"] is None:  # a float32 run's master is its saved weight (not the rounded one loaded into p)
            values["master"] = module_state[name]
        values["master"] = values["master"].to(torch.float32)
        adam.write(p, values, step)
    adam.finish(step)

    if engine.lr_scheduler is not None and states[0]["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(states[0]["lr_scheduler"])
        # The schedule writes the LR into the optimizer only when it steps; the native path gets it
        # from the saved param groups, whose layout is not ours here: write the current LR now.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_lr()):
            group["lr"] = lr
    engine.global_steps = states[0]["global_steps"]
    set_rng_state(states[rank]["rng"] if rank < len(states) else states[0]["rng"])
    return meta
