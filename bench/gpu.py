"""What the `--device cuda` benchmarks share: timing by CUDA events, peak memory, and the grouped-GEMM reference.

On a CPU device the same functions time with perf_counter and report no peak
memory, so the GPU code paths can be dry-run on a CPU with small sizes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mpoe.models.experts.grouped import GROUPED_MM

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


def peer_stats(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    repeats: int,
    warmup: int = 3,
    modules: Optional[dict[str, nn.Module]] = None,
    count_ops: bool = False,
) -> dict[str, dict]:
    """Per peer (fwd+bwd steps compared by a ratio): {'ms': median over repeats, 'peak_mb': what one step adds
    to the memory allocated before it (CUDA), 'ops', 'other_mb': `device_ops` of one untimed step if count_ops
    (eager steps: a compiled one would recompile under the counting mode)}; {'error': one line} for a peer
    whose step raised (an OOM, say), which is then left out while the others are measured.

    Warm-up first (the first GEMMs of a shape are far slower; allocator pools fill), then the peers take turns:
    in round r the order is rotated by r, as `bench.interleaved_times` does on the CPU, so neither clock drift
    nor a cache warmed by a peer's own previous step favours one of them. CUDA: one pair of events per step,
    read after the last round (no sync in between). `modules[name]`'s gradients are dropped before its peak step.
    """
    stats: dict[str, dict] = {}
    for name, step in steps.items():
        try:
            for _ in range(warmup):
                step()
            ops = device_ops(step) if count_ops else None
            stats[name] = {
                "ops": ops.count if ops else None,
                "other_mb": ops.other_bytes / 2**20 if ops else None,
                "peak_mb": step_peak_mb(step, device, (modules or {}).get(name)),
            }
        except Exception as e:  # one peer failing must not lose the others' numbers
            stats[name] = {"error": _one_line(e)}
            _release(device, (modules or {}).get(name))
    names = [name for name in steps if "error" not in stats[name]]
    times: dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % max(len(names), 1) :] + names[: r % max(len(names), 1)]:
            if "error" in stats[name]:
                continue
            try:
                times[name].append(_timed(steps[name], device))
            except Exception as e:
                stats[name] = {"error": _one_line(e)}
                _release(device, (modules or {}).get(name))
    sync(device)
    for name in names:
        if "error" not in stats[name]:
            stats[name]["ms"] = statistics.median(t() if callable(t) else t for t in times[name])
    return stats


def _timed(step: Callable[[], None], device: torch.device):
    """The step's milliseconds: a float on the CPU; on CUDA a callable that reads its events (after a sync)."""
    if device.type != "cuda":
        start = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - start)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    return lambda: start.elapsed_time(end)


def step_peak_mb(step: Callable[[], None], device: torch.device, module: Optional[nn.Module] = None) -> Optional[float]:
    """One step, and what it adds above what was allocated before it (all peers' weights, inputs), `module`'s
    gradients dropped first; None off CUDA, where the step is not run."""
    if device.type != "cuda":
        return None
    if module is not None:
        module.zero_grad(set_to_none=True)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _release(device: torch.device, module: Optional[nn.Module]) -> None:
    if module is not None:
        module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(e: Exception) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0][:300]


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
