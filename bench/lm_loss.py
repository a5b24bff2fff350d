"""LM head + cross-entropy, one forward and backward: mpoe's chunked loss against Hugging Face's.

    python -m bench.lm_loss [--quick] [--device cuda] [--tokens N] [--repeats R] [--json FILE]

The shape is GPT-2 small's head (d_model 768, vocab 50257). HF's way is what GPT2LMHeadModel does: the whole
logits in the training dtype, then transformers' `ForCausalLMLoss` (a float32 copy, log-softmax, mean).
mpoe's is `mpoe.models.lm_loss.linear_cross_entropy` (trainer.lm_loss=chunked, the default). Both compute the
same loss of the same inputs (checked before timing).

- CPU: float32, 2048 tokens (--quick 1024). Time: median of the repeats, the two interleaved
  (bench.interleaved_times). Peak memory: how far one fwd+bwd raises the peak resident set (VmHWM) above what
  its inputs hold, each way in a fresh process (Linux).
- CUDA: bf16, 16 x 1024 tokens (the GPU train-step shape). Time: CUDA-event medians after warm-up; peak memory:
  max_memory_allocated above the inputs (bench.gpu.peer_stats).

--json keys: lm_loss.chunked_vs_hf_time and lm_loss.chunked_vs_hf_peak_memory on the CPU;
gpu.lm_loss.chunked_vs_hf_time and gpu.lm_loss.chunked_vs_hf_peak_memory with --device cuda.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import interleaved_times, json_path, write_json
from bench.gpu import peer_stats
from mpoe.models.lm_loss import IGNORE_INDEX, linear_cross_entropy

D_MODEL, VOCAB = 768, 50257
WAYS = ("chunked", "hf")


def inputs(tokens: int, device: str, dtype: torch.dtype, seed: int = 0) -> tuple:
    """hidden [1, tokens, d] and head weight [V, d], both trainable, and labels [1, tokens]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, D_MODEL, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(VOCAB, D_MODEL, generator=g) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, tokens), generator=g).to(device)
    return hidden, weight, labels


def loss_of(way: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if way == "hf":
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=VOCAB)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # as mpoe's GPT-2 family shifts them
    return linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())


def fwd_bwd(way: str, hidden, weight, labels) -> None:
    loss_of(way, hidden, weight, labels).backward()
    hidden.grad = weight.grad = None


def _vm_mb(key: str) -> float:
    """VmRSS or VmHWM (the peak resident set of this process's memory map) from /proc, in MB."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def _cpu_peak_mb(way: str, tokens: int, queue) -> None:
    """In a fresh process: how many MB one fwd+bwd raises the resident set's peak above what the inputs hold.
    (Not ru_maxrss: a spawned child inherits its parent's through exec; VmHWM is the child's own, and writing 5
    to clear_refs resets it to the current size after the inputs are made.)"""
    hidden, weight, labels = inputs(tokens, "cpu", torch.float32)
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm_mb("VmRSS")
    fwd_bwd(way, hidden, weight, labels)
    queue.put(_vm_mb("VmHWM") - before)


def cpu_peak_mb(way: str, tokens: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_mb, args=(way, tokens, queue))
    proc.start()
    peak = queue.get(timeout=600)
    proc.join()
    return peak


def check_same_loss(tokens: int, device: str, dtype: torch.dtype) -> float:
    with torch.no_grad():
        hidden, weight, labels = inputs(min(tokens, 1024), device, dtype)
        ours, hf = (loss_of(way, hidden, weight, labels).float() for way in WAYS)
    rel = abs((ours - hf) / hf).item()
    if rel > (1e-5 if dtype == torch.float32 else 1e-2):
        raise AssertionError(f"chunked loss {ours.item()} differs from HF's {hf.item()}")
    return rel


def run(device: str, tokens: int, repeats: int, gpu_path: bool = False) -> tuple[dict, dict]:
    """The two keys and the details; `gpu_path` runs the CUDA rows' code on the CPU (a dry run, in float32)."""
    on_gpu = device != "cpu" or gpu_path
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    rel = check_same_loss(tokens, device, dtype)
    print(
        f"bench.lm_loss on {device}: {tokens} tokens x vocab {VOCAB}, d {D_MODEL}, {dtype}; losses agree to {rel:.1e}"
    )
    tensors = inputs(tokens, device, dtype)
    if on_gpu:
        dev = torch.device(device)
        stats = peer_stats({way: (lambda way=way: fwd_bwd(way, *tensors)) for way in WAYS}, dev, repeats)
        for way, s in stats.items():
            if "error" in s:
                raise RuntimeError(f"{way}: {s['error']}")
        ms = {way: s["ms"] for way, s in stats.items()}
        peak = {way: s["peak_mb"] for way, s in stats.items()}
        prefix = "gpu.lm_loss"
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else device
    else:

        def timed(way: str) -> float:
            start = time.perf_counter()
            fwd_bwd(way, *tensors)
            return 1e3 * (time.perf_counter() - start)

        times = interleaved_times({way: (lambda way=way: timed(way)) for way in WAYS}, repeats)
        ms = {way: statistics.median(t) for way, t in times.items()}
        peak = {way: cpu_peak_mb(way, tokens) for way in WAYS}
        prefix = "lm_loss"
        name = "cpu"
    print(f"{'way':<10}{'ms':>10}{'peak MB':>10}   ({name})")
    for way in WAYS:
        print(f"{way:<10}{ms[way]:>10.1f}{'-' if peak[way] is None else f'{peak[way]:.0f}':>10}")
    return {
        f"{prefix}.chunked_vs_hf_time": ms["chunked"] / ms["hf"],
        f"{prefix}.chunked_vs_hf_peak_memory": None if peak["hf"] is None else peak["chunked"] / peak["hf"],
    }, {"device": name, "tokens": tokens, "dtype": str(dtype), "ms": ms, "peak_mb": peak}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.lm_loss", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens on the CPU")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--tokens", type=int, help="tokens per step (default: 16384 on CUDA, 2048 on CPU, 1024 quick)")
    ap.add_argument("--repeats", type=int, help="timed repeats (default: 20 on CUDA, 3 on CPU)")
    ap.add_argument("--json", type=json_path, help="write {'results': {...}, 'config': {...}} here")
    ap.add_argument("--gpu-path", action="store_true", help=argparse.SUPPRESS)  # the CUDA code, dry-run on the CPU
    args = ap.parse_args(argv)
    on_gpu = args.device != "cpu"
    tokens = args.tokens or (16 * 1024 if on_gpu else 1024 if args.quick else 2048)
    results, config = run(args.device, tokens, args.repeats or (20 if on_gpu else 3), gpu_path=args.gpu_path)
    for key, value in results.items():
        print(f"{key} = {'-' if value is None else f'{value:.3f}'}")
    write_json(args.json, {"results": results, "config": config})
    return results


if __name__ == "__main__":
    from mpoe.process import configure_process

    configure_process()
    main()
