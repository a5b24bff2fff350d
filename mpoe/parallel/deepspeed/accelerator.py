"""The device this process trains on: DeepSpeed's accelerator, which it chooses once, when first used.

The one place the device is decided: the DeepSpeed engine puts the model on its
accelerator's device, so the process group's backend (`process_groups.default_backend`)
and the benchmarks' batches follow it. Nothing here imports DeepSpeed at module level:
importing it fixes the accelerator, which `configure_accelerator` must be able to
choose first.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import torch

from mpoe.config import ConfigError


def chosen_accelerator() -> Optional[str]:
    """The device name of DeepSpeed's accelerator if this process has fixed it already, else None."""
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(real, "ds_accelerator", None)
    return None if chosen is None else chosen.device_name()


def accelerator_name() -> str:
    """The accelerator this process trains on: 'cuda' or 'cpu' (or another name DS_ACCELERATOR gives).

    DeepSpeed fixes its accelerator on first use (`import deepspeed` uses it):
    DS_ACCELERATOR if set, else CUDA when torch sees a device, else the CPU. Before
    that, this predicts the same choice; after it, it reports the choice made.
    """
    chosen = chosen_accelerator()
    if chosen is not None:
        return chosen
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"]
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_accelerator(device: Optional[str] = None) -> None:
    """Fix the accelerator DeepSpeed will use, before it is imported.

    device None (entry points): the CPU when there is no CUDA device, else DS_ACCELERATOR or DeepSpeed's own
    choice. 'cpu' or 'cuda' (benchmarks with --device): that one; a one-line RuntimeError when DeepSpeed
    already runs on another in this process, since it cannot change accelerator once it has chosen.
    """
    if device is None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        want = torch.device(device).type
        chosen = chosen_accelerator()
        if chosen is None:
            os.environ["DS_ACCELERATOR"] = want
        elif chosen != want:
            raise RuntimeError(
                f"device {device} asked for, but DeepSpeed already runs on its {chosen} accelerator in this "
                f"process (it is chosen once, at import): run this in its own process, with DS_ACCELERATOR={want}"
            )
    if accelerator_name() == "cpu":
        keep_freed_cpu_memory()


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
    from deepspeed.accelerator import get_accelerator  # deferred: importing DeepSpeed fixes the accelerator

    accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()
    if not supported:
        other = "bf16 or fp32" if precision == "fp16" else "fp32"
        raise ConfigError(
            f"trainer.precision={precision} is not supported by DeepSpeed's "
            f"{accelerator.device_name()} accelerator on this machine: use trainer.precision={other}"
        )


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_freed_cpu_memory() -> bool:
    """Let glibc reuse freed memory instead of returning it to the OS (no-op elsewhere; MPOE_MALLOC_DEFAULT=1 skips).

    Why: a training step on CPU allocates and frees the same large buffers every
    step (activations, rebuilt MPO weights, expert weight gradients). glibc serves
    each large one by a fresh mmap and unmaps it when freed, so every step
    page-faults and kernel-zeroes all of them again; reusing freed memory avoids
    that, as jemalloc/tcmalloc do by default. The price is that the process keeps
    its peak heap instead of shrinking.
    """
    if os.environ.get("MPOE_MALLOC_DEFAULT") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False
