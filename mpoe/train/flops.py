"""Model FLOPs utilisation: the model's useful FLOP/s over the GEMM rate this machine reaches.

Model FLOPs per token for a training step (forward + backward), as in the
PaLM paper's appendix: 6 * N + 12 * L * T * d, where N counts the parameters a
token multiplies with (active, non-embedding, plus the LM-head projection,
which is a matmul even when tied), L the attention layers, T the sequence
length and d the model width. Rematerialisation and MoE routing overheads are
deliberately not counted: MFU measures useful work.

The reference rate is measured, not looked up: a square GEMM in the training
dtype on this device, the best of a few repeats, so MFU on a CPU is as
meaningful as on a GPU.
"""

from __future__ import annotations

import time

import torch


def flops_per_token(
    params_active: int, params_embedding: int, vocab_size: int, d_model: int, attention_layers: int, seq_len: int
) -> float:
    matmul_params = params_active - params_embedding + vocab_size * d_model
    return 6.0 * matmul_params + 12.0 * attention_layers * seq_len * d_model


def gemm_flops_per_s(
    size: int = 1024, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5
) -> float:
    g = torch.Generator().manual_seed(0)  # its own generator: the training RNG stream stays untouched (exact resume)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
