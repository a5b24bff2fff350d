"""The DeepSpeed engine for our model: its JSON config from ours, and `deepspeed.initialize`.

DeepSpeed builds the optimizer (torch's AdamW, fused on CUDA: `torch_adam` keeps
it off DeepSpeed's own FusedAdam, an op built at run time with nvcc), the warmup + cosine schedule,
gradient clipping and accumulation, ZeRO, and precision. Because our MoE layers
are `deepspeed.moe.layer.MoE` instances, the engine also splits expert
parameters into their own optimizer groups and reduces their gradients over the
expert-data-parallel group only.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from mpoe.config import ConfigError, TrainConfig, global_batch_size, grad_accum_steps
from mpoe.parallel.collectives import all_reduce


def check_precision_supported(precision: str) -> None:
    """One-line ConfigError when this machine's DeepSpeed accelerator cannot run `precision`.

    Why here and not in `config.validate`: it is a property of the hardware, not of
    the config, and the launch host that pre-checks a config may not be a compute
    node. DeepSpeed's CPU accelerator allows fp16 only where oneDNN has fp16
    kernels (e.g. Intel CPUs with AVX512-FP16/AMX, which many other CPUs lack),
    and otherwise fails inside `deepspeed.initialize`, after the process group
    started, with a traceback per rank.
    """
    if precision == "fp32":
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()
    if not supported:
        other = "bf16 or fp32" if precision == "fp16" else "fp32"
        raise ConfigError(
            f"trainer.precision={precision} is not supported by DeepSpeed's "
            f"{accelerator.device_name()} accelerator on this machine: use trainer.precision={other}"
        )


def zero_stage(cfg: TrainConfig) -> int:
    """The ZeRO stage DeepSpeed runs: `parallel.zero_stage`, but at least 1 for bf16 and fp16.

    Why: at stage 0 DeepSpeed 0.19.8 trains bf16/fp16 with `FP16_UnfusedOptimizer`
    around our AdamW, which (a) steps AdamW once with zero gradients when it is built:
    one decoupled weight decay of every master weight and Adam's bias correction one
    step ahead, so early updates are smaller than fp32's; (b) in fp16, divides the
    gradients by a loss scale that `engine.backward` never multiplied in (upstream PR
    deepspeedai/DeepSpeed#8393); (c) clips against a norm that leaves out expert
    parameters. ZeRO 1 is DeepSpeed's mainstream mixed-precision optimizer (float32
    master partitions, loss scaling, a norm over all parameters; for bf16 its
    BF16_Optimizer, see `deepspeed_config`); on one process it partitions nothing, so
    it is the same training as stage 0 would be.
    """
    if cfg.trainer.precision != "fp32":
        return max(cfg.parallel.zero_stage, 1)
    return cfg.parallel.zero_stage


def deepspeed_config(cfg: TrainConfig, world_size: int, device_type: str = "cpu") -> dict:
    """DeepSpeed's JSON config for our config on `world_size` processes whose accelerator is `device_type`."""
    t, o = cfg.trainer, cfg.optim
    total = max(t.max_steps, 1)
    # On CUDA, torch's fused AdamW: one kernel per group of tensors for the whole update, where the default
    # (foreach) runs a dozen multi-tensor kernels, each a pass over the parameters and both moments. What it
    # steps is on the GPU (bf16/fp16: DeepSpeed's float32 master copies and moments). The CPU keeps the default.
    fused = {"fused": True} if device_type == "cuda" else {}
    config = {
        "train_batch_size": global_batch_size(cfg, world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
                **fused,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": max(1, min(o.warmup_steps, total)),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": o.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": o.grad_clip,
        # overlap_comm: nothing to overlap on CPU, and with gloo it has aborted processes at exit.
        "zero_optimization": {"stage": zero_stage(cfg), "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # bf16 gradients are summed in float32, over micro-batches and over ranks, as Megatron does for bf16:
        # a bf16 sum keeps 8 significant bits, so each addition rounds away part of what came before. DeepSpeed
        # then runs ZeRO 1 as its BF16_Optimizer (float32 gradient buffers) and ZeRO 2 with float32 gradient
        # partitions; without `communication_data_type` it would still round them to bf16 to reduce them.
        config.update(data_types={"grad_accum_dtype": "fp32"}, communication_data_type="fp32")
    return config


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not biases, norms or 1-d tensors (the usual GPT recipe)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def initialize(model: nn.Module, cfg: TrainConfig, world_size: int):
    import deepspeed

    from mpoe.parallel.groups import accelerator_name  # (groups imports this module)
    from mpoe.process import library_stdout_to_log

    with library_stdout_to_log():  # BF16_Optimizer prints memory usage
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=deepspeed_config(cfg, world_size, accelerator_name()),
            dist_init_required=False,
        )
    # WarmupCosineLR starts at iteration -1 (lr 0) and its iteration 0 has lr 0 as well, so the first two
    # updates would both have lr 0. One step here makes update k run at iteration k-1: the first update has
    # lr 0 (as HF's and Megatron's warmups start), the second lr / warmup_steps. A resumed run loads the
    # scheduler's iteration from its checkpoint afterwards.
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    return engine


def global_grad_norm(engine) -> float:
    """DeepSpeed's norm of the last step's gradients (before clipping); read once per logged step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


# The workarounds below reach into DeepSpeed's engine and optimizer internals; they are kept
# together so that a DeepSpeed upgrade is checked in one place.


def gradients_finite(engine) -> bool:
    """At ZeRO 0 (fp32 only: see `zero_stage`), after the reduction: are all gradients finite on every rank?

    DeepSpeed steps our bare torch AdamW there, which has no overflow check (its ZeRO 1/2
    optimizers have one, and skip the step themselves). The answer decides, on the host, whether the
    step runs, so this reads one flag per optimizer step.
    """
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return True
    bad = torch.logical_not(torch.stack([g.isfinite().all() for g in grads]).all()).to(torch.float32)
    return all_reduce(bad).item() == 0  # any rank's NaN reaches all ranks


def loss_scale(engine) -> float:
    """The loss scale this step's gradients carry until `engine.step()` divides it out: fp16's dynamic scale
    (DeepSpeed's public `loss_scale` of its optimizer), 1.0 otherwise. A host float: no device read."""
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0


def local_grad_fragment(param: nn.Parameter) -> Optional[torch.Tensor]:
    """ZeRO 1/2, after the last backward of a step and before `engine.step()`: the part of `param`'s reduced
    gradient that this rank's optimizer partition owns (None if it owns none). Every entry of every
    parameter is owned by exactly one rank of its data-parallel group (experts: of their expert-data-parallel
    group), so squares summed over these fragments and over the world give the global squared norm.
    DeepSpeed's `safe_get_full_grad` would all-reduce a full gradient per parameter instead."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
    owned = mapping.lp_fragment_address
    if grad.numel() != owned.numel:  # BF16_Optimizer (bf16 ZeRO 1) keeps the whole gradient on every rank
        grad = grad.reshape(-1).narrow(0, owned.start, owned.numel)
    return grad


@contextlib.contextmanager
def skipped_step(optimizer):
    """ZeRO 0: let DeepSpeed run `engine.step()` as a skipped step, as it does for an fp16 overflow.

    The engine, seeing `optimizer.overflow`, neither steps the LR schedule nor counts the
    step as applied (it increments `skipped_steps`), as ZeRO 1/2 do by themselves; the
    gradients are zeroed (so clipping sees finite numbers) and the optimizer's own step,
    which would still move the weights through momentum and weight decay, is not run.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.zero_()
    optimizer.overflow = True
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step
        optimizer.overflow = False


def deepspeed_expert_group(ep_size: int) -> tuple[str, int, object]:
    """(name, this rank's position, all-to-all group) of DeepSpeed's expert-parallel group of `ep_size`,
    created on first use. DeepSpeed owns these groups (its engine reduces expert gradients over their
    expert-data-parallel twins), but offers them only through private functions."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name, groups._get_expert_parallel_rank(name), groups._get_expert_parallel_group(name)


def forget_deepspeed_groups() -> None:
    """DeepSpeed caches its expert/data groups in module globals; groups of an earlier, destroyed world
    (the previous job of a Hydra multirun in this process) must not be reused by the new one."""
    from deepspeed.utils import groups

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
