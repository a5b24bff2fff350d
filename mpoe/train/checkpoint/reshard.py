"""Loading a checkpoint on a different layout: another world size, `parallel.ep_size` or ZeRO stage.

A rank file holds the shared parameters and that rank's local experts. Expert
parameters are stacked along a leading local-expert axis, and expert-parallel
rank p holds global experts [p*L, (p+1)*L), so the first ep_size rank files
(ranks 0..P-1, one expert-parallel group) hold every expert once: concatenating
their expert tensors gives all E experts in global order, which a new layout
slices again. Shared parameters are the same on every rank; rank 0's are used.

The optimizer follows its parameters through Adam's state by parameter name
(`adam_state.portable_forms`), written into whichever DeepSpeed optimizer holds it
(`mpoe.parallel.deepspeed.optimizer_state.adam_view`). Rank files store the
optimizer's native state only: at ZeRO 1/2 each rank writes what it holds (no
gather to rank 0), with the ranks each partition is spread over, so the optimizer
state is on disk once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mpoe.models.param_tags import is_expert_param
from mpoe.parallel.deepspeed import optimizer_state
from mpoe.parallel.deepspeed.engine import load_schedule
from mpoe.parallel.deepspeed.optimizer_state import ADAM_KEYS, ZERO_GROUPS_KEY
from mpoe.train.checkpoint.adam_state import portable_forms
from mpoe.train.checkpoint.rng import set_rng_state


def optimizer_param_names(engine) -> list[str]:
    """Parameter names in the order the native `state_dict` numbers them (parameter sets in order, then params)."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [names[id(p)] for p in optimizer_state.adam_view(engine).params_in_order()]


def rank_file_fields(engine, rank: int, ep_size: int) -> dict:
    """The model and optimizer state rank `rank`'s checkpoint file holds.

    Data-parallel replicas hold the same weights and, at ZeRO 0, the same optimizer state,
    so only the first replica (ranks 0..ep_size-1, which hold every expert once) stores
    them; a later replica's file holds what is its own (its ZeRO 1/2 partition), and
    `with_replica_fields` fills in the rest from rank % ep_size's file.
    """
    first_replica = rank < ep_size
    if optimizer_state.per_parameter(engine):
        if not first_replica:
            return {}
        return {
            "module": engine.module.state_dict(),
            "optimizer": optimizer_state.native_state(engine),
            "optimizer_param_names": optimizer_param_names(engine),
        }
    fields = {
        "optimizer": optimizer_state.native_state(engine),
        ZERO_GROUPS_KEY: optimizer_state.partition_ranks(engine),
    }
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
    if portable[0]["step"] > 0 and not portable[0]["params"]:  # an older bf16/fp16 ZeRO-0 checkpoint saved none
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
    adam = optimizer_state.adam_view(engine)
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

    load_schedule(engine, states[0]["lr_scheduler"])
    engine.global_steps = states[0]["global_steps"]
    set_rng_state(states[rank]["rng"] if rank < len(states) else states[0]["rng"])
    return meta
