"""MoE layer speed: our permutation dispatch vs DeepSpeed's padded einsum MoE vs the dense compute floor.

    python -m bench.moe_layer [--json FILE] [--quick]

One training step (forward + backward of sum(out * g)) of a top-1 Switch layer,
d_model 512, d_ff 2048, single process, fastest of a few repeats (the machine may be shared), for 8 and 32
experts at capacity factor 1.0, dropless, and dropless with skewed routing
(tokens pushed to expert 0 until max/mean expert load is about 3). The floor is one
dense FFN of the same width over all tokens: the FLOPs a top-1 layer must spend.

DeepSpeed's GShard-style layer builds [tokens, experts, capacity] one-hot tensors
and dispatches by matmul against them, so its memory and time grow with
tokens x experts x capacity (quadratic in tokens, and dropless capacity is the
*largest* expert's load). Where those tensors would exceed --ds-max-gb it is not
run, and the report says so rather than guess.

Bytes: an all-to-all sends the dispatch buffer. Ours is the permuted tokens, one
row per kept (token, expert) pair (what multi-process tests check the all-to-all
moves); DeepSpeed's is experts x capacity rows, padding included.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

from mpoe.parallel.groups import configure_accelerator

configure_accelerator()  # before deepspeed is imported (by our layer or here)

from mpoe.config import MoEConfig  # noqa: E402
from mpoe.models.moe_layer import build_moe_layer  # noqa: E402
from mpoe.parallel.groups import ExpertGroups  # noqa: E402

D_MODEL, D_FF = 512, 2048


def step_time(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    g = torch.randn_like(x)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * g).sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)  # the least-disturbed run: this machine's 2 cores are shared


def dense_ffn() -> nn.Module:
    """The same FFN an expert computes (HF gelu_new, as GPT-2 and our banks use), so only dispatch differs."""
    from mpoe.models.experts import activation_fn

    return nn.Sequential(nn.Linear(D_MODEL, D_FF), activation_fn("gelu_new"), nn.Linear(D_FF, D_MODEL))


def skew_tokens(x: torch.Tensor, gate_weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Add to a fraction 2/(E-1) of the tokens a push towards expert 0: load_0 / mean ~= 1 + 2 = 3."""
    n = int(x.shape[0] * 2 / (num_experts - 1))
    w0 = gate_weight[0]
    x = x.clone()
    x[:n] += 20.0 * w0 / w0.pow(2).sum()
    return x[torch.randperm(x.shape[0])]


def ds_capacity_rows(tokens: int, num_experts: int, capacity_factor, counts: torch.Tensor) -> int:
    capacity = int(counts.max()) if capacity_factor is None else math.ceil(tokens / num_experts * capacity_factor)
    return num_experts * capacity


def run_case(tokens: int, num_experts: int, mode: str, repeats: int, ds_max_gb: float) -> dict:
    from deepspeed.moe.layer import MoE

    capacity_factor = 1.0 if mode == "cf1" else None
    torch.manual_seed(0)
    cfg = MoEConfig(kind="switch", num_experts=num_experts, top_k=1, capacity_factor=capacity_factor,
                    aux_loss_coef=0.01, z_loss_coef=0.0)
    ours = build_moe_layer(cfg, D_MODEL, D_FF, "gelu_new", ExpertGroups())
    x = torch.randn(tokens, D_MODEL)
    if mode == "skewed":
        x = skew_tokens(x, ours.router.gate.weight.detach(), num_experts)

    rows = {}
    ours.bank.register_forward_pre_hook(lambda m, args: rows.__setitem__("ours", args[0].shape[0]))
    t_ours = step_time(ours, x, repeats)
    counts = ours.stats.tokens_per_expert
    kept = int(counts.sum()) - ours.stats.tokens_dropped
    t_floor = step_time(dense_ffn(), x, repeats)

    result = dict(tokens=tokens, experts=num_experts, mode=mode, ours_s=t_ours, floor_s=t_floor,
                  load_max_over_mean=float(counts.max() / counts.float().mean()), routed=kept,
                  ours_rows=rows["ours"], tokens_dropped=ours.stats.tokens_dropped)
    ds_rows = ds_capacity_rows(tokens, num_experts, capacity_factor, counts)
    result["ds_rows"] = ds_rows
    ds_gb = tokens * ds_rows * 4 / 1e9  # one [tokens, experts * capacity] float tensor; it builds several
    if ds_gb > ds_max_gb:
        result["ds_s"] = None
        result["ds_skipped"] = f"its [tokens, experts x capacity] tensors need {ds_gb:.1f} GB each (> --ds-max-gb {ds_max_gb})"
    else:
        ds = MoE(D_MODEL, dense_ffn(), num_experts=num_experts, ep_size=1, k=1,
                 capacity_factor=capacity_factor or 1.0, eval_capacity_factor=capacity_factor or 1.0,
                 min_capacity=0, drop_tokens=capacity_factor is not None, use_rts=False)
        with torch.no_grad():
            ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
        result["ds_s"] = step_time(ds, x, repeats)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the headline ratios here")
    parser.add_argument("--quick", action="store_true", help="small token counts (about 2 minutes on 2 cores)")
    parser.add_argument("--tokens", type=int, nargs="*", help="override the token counts")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ds-max-gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    token_counts = args.tokens or ([2048, 4096] if args.quick else [8192, 32768])
    repeats = args.repeats or 3

    rows = []
    print(f"load average at start {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}; top-1, d_model {D_MODEL}, d_ff {D_FF}; seconds per fwd+bwd step")
    print(f"{'tokens':>7} {'E':>3} {'mode':>7} {'load':>5} {'ours':>7} {'floor':>7} {'DS':>7} "
          f"{'ours/floor':>10} {'DS/ours':>8} {'rows ours/routed':>16} {'DS rows/routed':>14}")
    for tokens in token_counts:
        for num_experts in (8, 32):
            for mode in ("cf1", "dropless", "skewed"):
                r = run_case(tokens, num_experts, mode, repeats, args.ds_max_gb)
                rows.append(r)
                ds = "skipped" if r["ds_s"] is None else f"{r['ds_s']:.3f}"
                ds_ratio = "-" if r["ds_s"] is None else f"{r['ds_s'] / r['ours_s']:.2f}"
                print(f"{tokens:>7} {num_experts:>3} {mode:>7} {r['load_max_over_mean']:>5.2f} {r['ours_s']:>7.3f} "
                      f"{r['floor_s']:>7.3f} {ds:>7} {r['ours_s'] / r['floor_s']:>10.2f} {ds_ratio:>8} "
                      f"{r['ours_rows'] / r['routed']:>16.2f} {r['ds_rows'] / r['routed']:>14.2f}", flush=True)
                if r["ds_s"] is None:
                    print(f"        DeepSpeed not run: {r['ds_skipped']}")

    timed = [r for r in rows if r["ds_s"] is not None]
    worst = lambda xs: min(xs) if xs else None
    results = {
        "moe_layer.vs_floor": max(r["ours_s"] / r["floor_s"] for r in rows),
        "moe_layer.speedup_vs_deepspeed": worst([r["ds_s"] / r["ours_s"] for r in timed if r["mode"] != "skewed"]),
        "moe_layer.speedup_vs_deepspeed_skewed": worst([r["ds_s"] / r["ours_s"] for r in timed if r["mode"] == "skewed"]),
        "dispatch.bytes_vs_routed": max(r["ours_rows"] / r["routed"] for r in rows),
    }
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print("headline (worst case over the grid):", json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "rows": rows}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
