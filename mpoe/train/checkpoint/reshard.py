"""Loading a checkpoint on a different layout: another world size, `parallel.ep_size` or ZeRO stage.

A rank file holds the shared parameters and that rank's local experts. Expert
parameters are stacked along a leading local-expert axis, and expert-parallel
rank p holds global experts [p*L, (p+1)*L), so the first ep_size rank files
(ranks 0..P-1, one expert-parallel group) hold every expert once: concatenating
their expert tensors gives all E experts in global order, which a new layout
slices again. Shared parameters are the same on every rank; rank 0's are used.

The optimizer follows its parameters through a *portable* form of Adam's state:
per parameter name, full tensors of `exp_avg`, `exp_avg_sq` and, for a bf16/fp16
model, the float32 master weight, plus the step count (`adam_state.py` writes it
into whichever DeepSpeed optimizer holds it). Rank files store no second copy of
it: the portable form is derived on load from the native state (`portable_forms`).
- ZeRO 0 (float32): the native state is torch's AdamW's, per parameter already;
  the file stores the parameter names in the optimizer's order beside it.
- ZeRO 1/2: each rank stores DeepSpeed's own flat partitions, with the ranks each
  optimizer group is partitioned over (`zero_groups`: the data-parallel group, or
  for expert parameters the expert-data-parallel group). DeepSpeed's
  `param_slice_mappings` say where each parameter's fragment lies in a partition;
  a parameter's flat values are its fragments in partition order, which is how
  DeepSpeed's universal checkpoint conversion (`ds_to_universal`) joins them.
  Saving is then each rank writing what it holds (no gather to rank 0) and the
  optimizer state is on disk once.
Checkpoints written before this stored the ZeRO 1/2 portable form itself
(`portable_optimizer`); they still load.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from mpoe.models.param_tags import is_expert_param
from mpoe.train.checkpoint import adam_state
from mpoe.train.checkpoint.adam_state import ADAM_KEYS
from mpoe.train.checkpoint.rng import set_rng_state


def zero_groups(engine) -> list[list[int]]:
    """Per optimizer group, the global ranks its ZeRO 1/2 partitions are spread over, in partition order."""
    if not dist.is_initialized():
        return [[0] for _ in engine.optimizer.real_dp_process_group]
    return [dist.get_process_group_ranks(group) for group in engine.optimizer.real_dp_process_group]


def native_is_per_parameter(engine) -> bool:
    """ZeRO 0 (float32, torch's AdamW): the optimizer's state_dict holds Adam's state per parameter."""
    return engine.zero_optimization_stage() == 0


def optimizer_param_names(engine) -> list[str]:
    """Parameter names in the order the native `state_dict` numbers them (groups in order, then params)."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [names[id(p)] for p in adam_state.holder(engine).params_in_order()]


def rank_file_fields(engine, rank: int, ep_size: int) -> dict:
    """The model and optimizer state rank `rank`'s checkpoint file holds.

    Data-parallel replicas hold the same weights and, at ZeRO 0, the same optimizer state,
    so only the first replica (ranks 0..ep_size-1, which hold every expert once) stores
    them; a later replica's file holds what is its own (its ZeRO 1/2 partition), and
    `with_replica_fields` fills in the rest from rank % ep_size's file.
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
    fields = {"optimizer": engine.optimizer.state_dict(), "zero_groups": zero_groups(engine)}
    if first_replica:
        fields["module"] = engine.module.state_dict()
    return fields


def with_replica_fields(state: dict, path: Path, rank: int, ep_size: int) -> dict:
    """Rank `rank`'s file `state` completed by what its first-replica twin stored for both (see rank_file_fields)."""
    if "module" in state:
        return state
    twin = torch.load(path / f"rank_{rank % ep_size:05d}.pt", map_location="cpu", weights_only=False, mmap=True)
    return {**twin, **state}


class RankFiles:
    """A checkpoint's rank files, each read once, memory-mapped: tensors are read where they are used."""

    def __init__(self, path: Path):
        self.path, self._loaded = path, {}

    def __call__(self, rank: int) -> dict:
        if rank not in self._loaded:
            file = self.path / f"rank_{rank:05d}.pt"
            self._loaded[rank] = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        return self._loaded[rank]


def portable_forms(file: RankFiles, ep_size: int, wanted=lambda rank, name: True) -> list[dict | None]:
    """The portable optimizer form of ranks 0..ep_size-1 (the first replica, which holds every expert once),
    restricted to the parameters `wanted(rank, name)`; None for a rank whose file has no optimizer state by name
    (an older bf16/fp16 ZeRO-0 checkpoint has an empty one)."""
    forms = []
    for rank in range(ep_size):
        state = file(rank)
        if "portable_optimizer" in state:  # ZeRO 1/2 checkpoints of an older mpoe stored it
            form = state["portable_optimizer"]
        elif "zero_groups" in state:
            form = _from_zero_partitions(file, rank, functools.partial(wanted, rank))
        elif "optimizer_param_names" in state:
            form = _from_per_parameter(state)
        else:
            form = None
        forms.append(form)
    return forms


def _from_per_parameter(state: dict) -> dict:
    """ZeRO 0: torch AdamW's state, numbered in the optimizer's order, named by `optimizer_param_names`."""
    native = state["optimizer"]
    indices = [i for group in native["param_groups"] for i in group["params"]]
    per_param, step = {}, None
    for index, name in zip(indices, state["optimizer_param_names"]):
        adam = native["state"].get(index, {})
        if all(adam.get(k) is not None for k in ADAM_KEYS):
            per_param[name] = {k: adam[k] for k in ADAM_KEYS}
            if step is None and "step" in adam:
                step = int(adam["step"])
    return {"step": step or 0, "params": per_param}


def _from_zero_partitions(file, rank: int, wanted) -> dict:
    """ZeRO 1/2: rank `rank`'s parameters, each joined from its fragments in the partitions of the ranks its
    optimizer group is spread over (see the module doc). A float32 weight is its own master: none is kept."""
    module = file(rank)["module"]
    per_param, step = {}, 0
    for group, members in enumerate(file(rank)["zero_groups"]):
        pieces: dict[str, dict[str, list]] = {}
        for member in members:  # partition order
            native = file(member)["optimizer"]
            adam = native["base_optimizer_state"]["state"].get(group)
            if adam is None:  # the optimizer has not stepped: no moments yet
                continue
            step = int(adam["step"])
            flats = {**{k: adam[k] for k in ADAM_KEYS}, "master": native["single_partition_of_fp32_groups"][group]}
            for name, address in native["param_slice_mappings"][group].items():
                if wanted(name):
                    at = slice(address.start, address.start + address.numel)
                    for key, flat in flats.items():
                        pieces.setdefault(name, {}).setdefault(key, []).append(flat[at])
        for name, values in pieces.items():
            weight = module[name]
            keys = ADAM_KEYS if weight.dtype == torch.float32 else (*ADAM_KEYS, "master")
            per_param[name] = {k: torch.cat(values[k]).view(weight.shape) for k in keys}
    return {"step": step, "params": per_param}


def _expert_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if is_expert_param(p)}


def join_ep_group(name: str, saved: list, expert: bool):
    """One name's full tensor from the values the first expert-parallel group's ranks saved (None if absent):
    an expert tensor is theirs concatenated (every expert once, in global order), a shared one is rank 0's."""
    if not expert:
        return saved[0]
    missing = sum(value is None for value in saved)
    if missing == len(saved):
        return None
    if missing:
        raise RuntimeError(
            f"{name}: saved by {len(saved) - missing} of the {len(saved)} expert-parallel ranks' files, so part of "
            "its experts is missing: the checkpoint is incomplete"
        )
    return torch.cat(saved, dim=0)


def _relayout(name: str, saved: list, expert: bool, lo: int, count: int, num_experts: int):
    """The tensor for `name` in the new layout, from the saved ep group's values (None if absent)."""
    full = join_ep_group(name, saved, expert)
    if full is None or not expert:
        return full
    if full.shape[0] != num_experts:
        raise RuntimeError(f"{name}: {full.shape[0]} stacked experts in the checkpoint, expected {num_experts}")
    return full[lo : lo + count]


def load_resharded(engine, path: Path, meta: dict, ep_rank: int, num_local: int, num_experts: int, rank: int) -> dict:
    """Restore module, optimizer, schedule and RNG from a checkpoint written on another layout."""
    old_ep = meta["ep_size"]
    file = RankFiles(path)
    states = [file(r) for r in range(old_ep)]
    experts = _expert_names(engine.module)
    # A shared parameter is taken from rank 0's form, an expert one from every first-replica rank's (`_relayout`).
    portable = portable_forms(file, old_ep, lambda r, name: r == 0 or name in experts)
    if any(p is None for p in portable):
        raise RuntimeError(
            f"checkpoint {path} has no portable optimizer state: it can only be resumed on its own layout"
        )
    if portable[0]["step"] > 0 and not portable[0]["params"]:  # bf16/fp16 at ZeRO 0 saved none before adam_state.py
        raise RuntimeError(
            f"checkpoint {path} holds no optimizer state by parameter name (a bf16/fp16 ZeRO-0 checkpoint of an "
            "older mpoe), so it cannot be resumed: start a new run (python -m mpoe.tools.export still reads it)"
        )
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
