"""The world started through DeepSpeed, and DeepSpeed's expert-parallel process groups.

DeepSpeed owns the expert-parallel and expert-data-parallel process groups
(`deepspeed.utils.groups`): its engine reduces expert gradients over the ones it
made, so we dispatch over the same. It offers them only through private functions,
and caches them in module globals; both are used here only.
"""

from __future__ import annotations

from datetime import timedelta

# DeepSpeed itself is imported inside each function, on purpose: importing it fixes the accelerator, and the
# entry points import this module (through process_groups) before they configure the accelerator.


def start_world(backend: str, timeout: timedelta) -> None:
    """DeepSpeed's `init_distributed`: starts the world process group, or adopts one already started."""
    import deepspeed  # deferred: see the module note

    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def expert_parallel_group(ep_size: int) -> tuple[str, int, object]:
    """(name, this rank's position, all-to-all process group) of DeepSpeed's expert-parallel group of `ep_size`,
    created on first use (with its expert-data-parallel twins)."""
    from deepspeed.utils import groups  # deferred: see the module note

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name, groups._get_expert_parallel_rank(name), groups._get_expert_parallel_group(name)


def forget_process_groups() -> None:
    """DeepSpeed caches its expert/data process groups in module globals; those of an earlier, destroyed world
    (the previous job of a Hydra multirun in this process) must not be reused by the new one."""
    from deepspeed.utils import groups  # deferred: see the module note

    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_ALL_TO_ALL_GROUP",
    ):
        getattr(groups, name).clear()
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
        setattr(groups, name, None)
