"""Model FLOPs utilisation: the model's useful FLOP/s over the peak rate of the device it runs on.

Model FLOPs per token for a training step (forward + backward), as in the
PaLM paper's appendix: 6 * N + 12 * L * T * d, where N counts the parameters a
token multiplies with (active, non-embedding, plus the LM-head projection,
which is a matmul even when tied), L the attention layers, T the sequence
length and d the model width. Rematerialisation and MoE routing overheads are
deliberately not counted: MFU measures useful work.

The peak: for a GPU the datasheet's dense (no sparsity) tensor-core rate in the
training dtype, looked up by `torch.cuda.get_device_name()`, as MFU is usually
quoted; for a GPU not in the table and for a CPU, the best rate of square GEMMs in
that dtype measured on the device after warm-up (a cold GPU GEMM runs an order of
magnitude below peak, which is how an MFU above 1 can be reported). `Peak.source`
says which of the two a run used.

A measured peak is only as good as the moment it was measured in: processes
that share a CPU's cores slow the probe and the training step alike, but not at
the same moments. When an interval's achieved rate exceeds the measured peak,
the probe saw a busier device than the step did, so `raised_to_cover` measures
again and keeps the better rate (a peak is the best rate the device showed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

# Dense peak TFLOP/s by (device-name fragment, dtype), from NVIDIA's datasheets. Fragments are
# matched in order against torch.cuda.get_device_name(), so more specific names come first.
# fp32 means what a float32 matmul runs at by default in torch (no TF32): the plain FP32 rate.
DATASHEET_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Peak:
    flops_per_s: float
    source: str  # "datasheet: <device> <dtype>" or "measured: <device> <dtype> GEMM"
    probe: Optional[tuple[int, torch.dtype, torch.device]] = None  # how a measured peak is measured again


def raised_to_cover(peak: Peak, achieved_flops_per_s: float) -> Peak:
    """This peak, or, when it is a measured one below a rate the run achieved, the better of it and a new probe."""
    if peak.probe is None or achieved_flops_per_s <= peak.flops_per_s:
        return peak
    return replace(peak, flops_per_s=max(peak.flops_per_s, gemm_flops_per_s(*peak.probe)))


def flops_per_token(
    params_active_compute: int,
    params_embedding: int,
    vocab_size: int,
    d_model: int,
    attention_layers: int,
    seq_len: int,
    params_lm_head: int = 0,
) -> float:
    """Model FLOPs of one token, forward and backward (PaLM's): 6 per weight its matmuls use (embedding lookups
    are not matmuls; the LM head is, once, tied or not) plus attention's 12 * layers * seq_len * d_model."""
    matmul_params = params_active_compute - params_embedding - params_lm_head + vocab_size * d_model
    return 6.0 * matmul_params + 12.0 * attention_layers * seq_len * d_model


def datasheet_peak(device_name: str, precision: str):
    """The table's peak FLOP/s for this device and precision, or None when the device is not listed."""
    for fragment, peaks in DATASHEET_TFLOPS:
        if fragment in device_name and precision in peaks:
            return peaks[precision] * 1e12
    return None


def device_peak(precision: str, device: torch.device) -> Peak:
    """The peak a run's MFU is measured against (see the module doc)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name, precision)
        if peak is not None:
            return Peak(peak, f"datasheet: {name} {precision}")
        largest = 8192
    else:
        name, largest = "cpu", 1024
    probe = (largest, DTYPES[precision], device)
    return Peak(gemm_flops_per_s(*probe), f"measured: {name} {precision} GEMM, best of sizes up to {largest}^3", probe)


def gemm_flops_per_s(
    largest: int = 1024, dtype: torch.dtype = torch.float32, device="cpu", repeats: int = 5, call_budget_s: float = 0.1
) -> float:
    """Best rate of square GEMMs of sizes 128, 256, ... up to `largest`, each after warm-up (on a GPU, ten warm-up
    calls: its clocks and kernels start cold). Sizes are tried in turn because the fastest is not always the
    largest (a CPU's caches), and a size is skipped once one call of it would take over `call_budget_s` at the
    best rate so far: a CPU without bf16/fp16 units multiplies those dtypes so slowly that 1024^3 calls would
    spend seconds of every run's start (docs/metrics.md says what the probe reads on a 2-vCPU machine)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)  # its own generator: the training RNG stream stays untouched (exact resume)
    cuda = device.type == "cuda"
    best_rate, size = 0.0, 128
    while size <= largest:
        flops = 2.0 * size**3
        if best_rate and flops / best_rate > call_budget_s:
            break
        a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        for _ in range(10 if cuda else 1):
            torch.mm(a, b)
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            if cuda:
                torch.cuda.synchronize(device)
            best_rate = max(best_rate, flops / (time.perf_counter() - start))
        size *= 2
    return best_rate
