"""Adam's state by parameter name (the *portable* form), derived from a checkpoint's rank files.

A rank file stores the optimizer's native state, whichever shape DeepSpeed keeps
it in (`mpoe.parallel.deepspeed.optimizer_state`), and no second copy. Loading on
another layout (`reshard.py`) and export's float32 masters need it per parameter
name instead: full tensors of `exp_avg`, `exp_avg_sq` and, for a bf16/fp16 model,
the float32 master weight, plus the step count. That is derived here:

- ZeRO 0 (float32): torch AdamW's state, per parameter already; the file stores the
  parameter names in the optimizer's order beside it (`optimizer_param_names`).
- ZeRO 1/2: each rank stores its own flat partitions, with the ranks each optimizer
  parameter set is partitioned over. A parameter's flat values are its fragments in
  partition order, which is how DeepSpeed's universal checkpoint conversion
  (`ds_to_universal`) joins them.

Checkpoints written before this stored the ZeRO 1/2 portable form itself
(`portable_optimizer`); they still load.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch

from mpoe.parallel.deepspeed.optimizer_state import ADAM_KEYS, ZERO_GROUPS_KEY, saved_partition

RankFile = Callable[[int], dict]  # rank -> that rank's file, loaded (reshard.RankFiles)


def portable_forms(file: RankFile, ep_size: int, wanted=lambda rank, name: True) -> list[Optional[dict]]:
    """The portable optimizer form of ranks 0..ep_size-1 (the first replica, which holds every expert once),
    restricted to the parameters `wanted(rank, name)`; None for a rank whose file has no optimizer state by name
    (an older bf16/fp16 ZeRO-0 checkpoint has an empty one)."""
    forms = []
    for rank in range(ep_size):
        state = file(rank)
        if "portable_optimizer" in state:  # ZeRO 1/2 checkpoints of an older mpoe stored it
            form = state["portable_optimizer"]
        elif ZERO_GROUPS_KEY in state:
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
    indices = [i for param_set in native["param_groups"] for i in param_set["params"]]
    per_param, step = {}, None
    for index, name in zip(indices, state["optimizer_param_names"]):
        adam = native["state"].get(index, {})
        if all(adam.get(k) is not None for k in ADAM_KEYS):
            per_param[name] = {k: adam[k] for k in ADAM_KEYS}
            if step is None and "step" in adam:
                step = int(adam["step"])
    return {"step": step or 0, "params": per_param}


def _from_zero_partitions(file: RankFile, rank: int, wanted) -> dict:
    """ZeRO 1/2: rank `rank`'s parameters, each joined from its fragments in the partitions of the ranks its
    optimizer parameter set is spread over. A float32 weight is its own master: none is kept."""
    module = file(rank)["module"]
    per_param, step = {}, 0
    for index, members in enumerate(file(rank)[ZERO_GROUPS_KEY]):
        pieces: dict[str, dict[str, list]] = {}
        for member in members:  # partition order
            partition = saved_partition(file(member)["optimizer"], index)
            if partition is None:  # the optimizer has not stepped: no moments yet
                continue
            step, flats, slices = partition
            for name, at in slices.items():
                if wanted(name):
                    for key, flat in flats.items():
                        pieces.setdefault(name, {}).setdefault(key, []).append(flat[at])
        for name, values in pieces.items():
            weight = module[name]
            keys = ADAM_KEYS if weight.dtype == torch.float32 else (*ADAM_KEYS, "master")
            per_param[name] = {k: torch.cat(values[k]).view(weight.shape) for k in keys}
    return {"step": step, "params": per_param}
