"""What the `--device cuda` benchmarks share: timing by CUDA events, peak memory, and the grouped-GEMM reference.

On a CPU device the same functions time with perf_counter and report no peak
memory, so the GPU code paths can be dry-run on a CPU with small sizes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mpoe.models.experts_grouped import GROUPED_MM

# Ops that allocate without writing: no kernel runs. (Views are recognised by their schema: `OpOverload.is_view`.)
_NO_KERNEL = {
    torch.ops.aten._unsafe_view.default,  # a view whose schema does not say so
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
}
_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "_grouped_mm", "_scaled_grouped_mm"}


class DeviceOps(TorchDispatchMode):
    """Counts, while active, the ops that run a kernel (every aten op but views and bare allocations), and the
    bytes the ones other than matrix products read and write (their tensor arguments and results, each once).

    On a GPU each op is at least one kernel launch, and the other ops are bound by memory bandwidth: where a
    step is launch-bound its time follows the count, and outside the GEMMs it follows the bytes. Any machine
    measures both: the CPU counts what a GPU would run, give or take a fallback or a CPU-only copy."""

    def __init__(self):
        super().__init__()
        self.count, self.other_bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func not in _NO_KERNEL:
            self.count += 1
            if func.overloadpacket.__name__ not in _MATMULS:
                # Each tensor once: an in-place op's target is its output too (index_copy_ writes it, not reads it).
                tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
                self.other_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return out


def device_ops(step: Callable[[], None]) -> DeviceOps:
    """What one call of `step` dispatches: `.count` kernel-running ops, `.other_bytes` moved outside GEMMs."""
    with DeviceOps() as ops:
        step()
    return ops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_stats(
    step: Callable[[], None],
    device: torch.device,
    repeats: int,
    warmup: int = 3,
    module: nn.Module = None,
    count_ops: bool = False,
) -> dict:
    """{'ms': median over repeats, 'peak_mb': peak allocated by the timed steps, 'ops' and 'other_mb':
    `device_ops` of one untimed step if count_ops (eager steps: a compiled one would recompile under the
    counting mode)} of one fwd+bwd `step`.

    Warm-up first (the first GEMMs of a shape are far slower; allocator pools fill).
    CUDA: one pair of events per step, read after the last one (no sync in between).
    peak_mb counts what a step adds (activations, gradients) above what was allocated
    before it (all modules' weights, inputs): `module`'s gradients are dropped first.
    """
    for _ in range(warmup):
        step()
    ops = device_ops(step) if count_ops else None
    counted = {"ops": ops.count, "other_mb": ops.other_bytes / 2**20} if ops else {"ops": None, "other_mb": None}
    if module is not None:
        module.zero_grad(set_to_none=True)
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - start))
        return {"ms": statistics.median(times), "peak_mb": None, **counted}
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    ms = statistics.median(s.elapsed_time(e) for s, e in events)
    return {"ms": ms, "peak_mb": peak / 2**20, **counted}


def fwd_bwd_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """One training step of `module` on x: forward, backward of sum(out * g), gradients dropped."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * g).sum().backward()

    return step


class GroupedRefMoE(nn.Module):
    """The 30-line reference: a dropless top-k MoE that sorts (token, expert) pairs by expert and calls
    `torch._grouped_mm` twice. Same gate and expert weights as the layer it is compared with (no biases)."""

    def __init__(self, gate: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, top_k: int, act: nn.Module):
        super().__init__()
        self.gate = nn.Parameter(gate.detach().clone())  # [E, d]
        self.w_in = nn.Parameter(w_in.detach().clone())  # [E, d, f]
        self.w_out = nn.Parameter(w_out.detach().clone())  # [E, f, d]
        self.top_k, self.act = top_k, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        probs = torch.softmax((x @ self.gate.t()).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k
        # Counts by scatter_add into a fixed-size buffer: torch.bincount sizes its output by reading the max to the
        # host, a sync per call that would slow the reference (our layer has none) and flatter vs_grouped_ref.
        counts = torch.zeros(self.w_in.shape[0], dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = self.act(GROUPED_MM(x.index_select(0, token), self.w_in, offs=offs))
        y = GROUPED_MM(h, self.w_out, offs=offs) * weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)
