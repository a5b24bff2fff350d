"""The DeepSpeed engine for our model: its JSON config from ours, `deepspeed.initialize`, and the LR schedule.

DeepSpeed builds the optimizer (torch's AdamW, fused on CUDA: `torch_adam` keeps
it off DeepSpeed's own FusedAdam, an op built at run time with nvcc), the warmup + cosine schedule,
gradient clipping and accumulation, ZeRO, and precision. Because our MoE layers
are `deepspeed.moe.layer.MoE` instances, the engine also splits expert
parameters into their own optimizer parameter sets and reduces their gradients over the
expert-data-parallel process group only. The MPOE central tensors get sets of their own when
optim.central_lr_scale gives them another learning rate (`optimizer_param_sets`).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from mpoe.config import OptimConfig, TrainConfig, global_batch_size, grad_accum_steps
from mpoe.models.interfaces import ExpertBankLike
from mpoe.parallel.deepspeed.accelerator import accelerator_name
from mpoe.process import library_stdout_to_log


def zero_stage(cfg: TrainConfig) -> int:
    """The ZeRO stage DeepSpeed runs: `parallel.zero_stage`, but at least 1 for bf16 and fp16.

    Why: at stage 0 DeepSpeed trains bf16/fp16 with `FP16_UnfusedOptimizer`
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
    # On CUDA, torch's fused AdamW: one kernel per parameter set for the whole update, where the default
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
                # The schedule starts at the iteration of the first update (see `start_schedule`). Built at its
                # default, -1, it would ask itself for an LR before it has started and warn about it.
                "last_batch_iteration": 0,
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
        # The throughput timer synchronizes the device at the start and end of every micro-step to time it;
        # we time steps ourselves (metrics.writer.Interval), without a sync per micro-step.
        "timers": {"throughput": {"enabled": False}},
    }
    if t.precision == "bf16":
        # bf16 gradients are summed in float32, over micro-batches and over ranks, as Megatron does for bf16:
        # a bf16 sum keeps 8 significant bits, so each addition rounds away part of what came before. DeepSpeed
        # then runs ZeRO 1 as its BF16_Optimizer (float32 gradient buffers) and ZeRO 2 with float32 gradient
        # partitions; without `communication_data_type` it would still round them to bf16 to reduce them.
        config.update(data_types={"grad_accum_dtype": "fp32"}, communication_data_type="fp32")
    return config


def weight_decay_sets(
    params: list[nn.Parameter], weight_decay: float, name: str = "", lr: Optional[float] = None
) -> list[dict]:
    """The optimizer's parameter sets (torch's `param_groups`) for `params`: decay matrices, not biases, norms or
    1-d tensors (the usual GPT recipe). Named `decay` and `no_decay`, or `name` and `name_no_decay`; with `lr`,
    the sets' own learning rate (the schedule scales each set's own)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    own_lr = {} if lr is None else {"lr": lr}
    sets = [{"params": decay, "weight_decay": weight_decay, "name": name or "decay", **own_lr}]
    if no_decay:
        no_decay_name = f"{name}_no_decay" if name else "no_decay"
        sets.append({"params": no_decay, "weight_decay": 0.0, "name": no_decay_name, **own_lr})
    return sets


def central_params(model: nn.Module) -> list[nn.Parameter]:
    """The MPOE central tensors of every expert bank in `model` (none in a dense or Switch model)."""
    return [p for m in model.modules() if isinstance(m, ExpertBankLike) for p in m.param_roles().central]


def optimizer_param_sets(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """The trainable parameters' optimizer sets: `decay` and `no_decay`, and the MPOE central tensors in sets of
    their own at lr x optim.central_lr_scale (`central`, `central_no_decay`).

    At scale 1 the central tensors stay in `decay`: the sets, the training and the checkpoints' optimizer layout
    are those of runs before the key existed (their checkpoints resume). Frozen ones (scale 0,
    `freeze_central`) are in no set.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    scale = optim.central_lr_scale
    own = {id(p) for p in central_params(model)} if scale != 1.0 else set()
    sets = weight_decay_sets([p for p in trainable if id(p) not in own], optim.weight_decay)
    central = [p for p in trainable if id(p) in own]
    if central:
        sets += weight_decay_sets(central, optim.weight_decay, "central", optim.lr * scale)
    return sets


def freeze_central(model: nn.Module, central_lr_scale: float) -> None:
    """optim.central_lr_scale=0: the central tensors need no gradient, so autograd computes none, the optimizer
    holds no state for them and they keep their initial (upcycled) values bit for bit. Before the engine is
    built: DeepSpeed gives every parameter that requires a gradient a place in its reductions and partitions."""
    if central_lr_scale == 0:
        for p in central_params(model):
            p.requires_grad_(False)


def central_layout(central_lr_scale: float) -> Optional[str]:
    """How `optimizer_param_sets` holds the MPOE central tensors, for a checkpoint to record: None = with the other
    parameters (what checkpoints saved before optim.central_lr_scale existed hold), else apart or frozen."""
    if central_lr_scale == 1.0:
        return None
    return "frozen" if central_lr_scale == 0.0 else "own learning rate"


def initialize(model: nn.Module, cfg: TrainConfig, world_size: int):
    """The DeepSpeed engine around `model` (the process group must exist), its schedule at the first update.
    optim.central_lr_scale=0 freezes the model's MPOE central tensors first (`freeze_central`)."""
    import deepspeed  # deferred: importing DeepSpeed fixes the accelerator (see accelerator.py)

    freeze_central(model, cfg.optim.central_lr_scale)
    with library_stdout_to_log():  # BF16_Optimizer prints memory usage
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=optimizer_param_sets(model, cfg.optim),
            config=deepspeed_config(cfg, world_size, accelerator_name()),
            dist_init_required=False,
        )
    start_schedule(engine)
    return engine


def start_schedule(engine) -> None:
    """Write the LR of the schedule's iteration 0 into the optimizer: the first update's.

    WarmupCosineLR's iteration 0 has lr 0, as HF's and Megatron's warmups start; the
    engine steps the schedule after each update, so update k runs at iteration k-1 and
    the second has lr / warmup_steps (DeepSpeed warms up over at least 2). The schedule
    is built at iteration 0 (`deepspeed_config`), which writes no LR; a resumed run loads
    the schedule's iteration from its checkpoint afterwards.
    """
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step(0)


def load_schedule(engine, saved: dict) -> None:
    """Restore the LR schedule from its `state_dict` and write each parameter set's LR into the optimizer now
    (the schedule scales each set's own initial LR: the central sets' keep their optim.central_lr_scale).

    The schedule writes the LR only when it steps; a checkpoint loaded into the
    optimizer's own `load_state_dict` brings the LR in its saved parameter sets, but
    a resharded one is written parameter by parameter and does not.
    """
    if engine.lr_scheduler is None or saved is None:
        return
    engine.lr_scheduler.load_state_dict(saved)
    for param_set, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_lr()):
        param_set["lr"] = lr
