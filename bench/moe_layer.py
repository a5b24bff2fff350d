"""MoE layer speed: our permutation dispatch vs DeepSpeed's padded einsum MoE vs the dense compute floor.

    python -m bench.moe_layer [--json FILE] [--quick] [--ep 1 2]
    python -m bench.moe_layer --device cuda [--json FILE] [--quick]

--device cuda runs the GPU table instead (`run_gpu`, below): one GPU, bf16, the
grouped expert backend, our layer against the dense floor, a 30-line
`torch._grouped_mm` reference (`bench.gpu.GroupedRefMoE`) and DeepSpeed's layer.
What follows describes the CPU table.

One training step (forward + backward of sum(out * g)) of a top-1 Switch layer,
d_model 512, d_ff 2048, fastest of 3 rounds in which ours, the floor, the bank alone
and DeepSpeed's layer take turns (the machine may be shared; see step_times), for 8 and 32
experts (--experts) at capacity factor 1.0, dropless, and dropless with skewed routing
(tokens pushed to expert 0 until max/mean expert load is about 3). The floor is one
dense FFN of the same width over all tokens: the FLOPs a top-1 layer must spend.

ep 1: one process. ep 2: a real gloo world of 2 processes (1 thread each, the 2
cores of this machine), each holding half of the tokens and half of the experts,
tokens exchanged by all-to-all; the floor is the dense FFN over each process's
half, run at the same time on both. A step's time is the slower rank's, and
the all-to-all bytes are counted where the all-to-all ops are dispatched
(`CountAllToAll`: forward and backward, both layers alike;
token payload only: our per-expert count exchange is reported apart, a few hundred bytes).

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
import tempfile
import time
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mpoe.parallel.deepspeed.accelerator import configure_accelerator

configure_accelerator()  # before deepspeed is imported (by our layer or here)

from bench import interleaved_times, json_path, write_json  # noqa: E402
from mpoe.config import MoEConfig  # noqa: E402
from mpoe.models.moe_builder import build_moe_layer  # noqa: E402
from mpoe.parallel.collectives import all_reduce, all_reduce_floats  # noqa: E402
from mpoe.parallel.expert_placement import ExpertPlacement  # noqa: E402

D_MODEL, D_FF = 512, 2048


def step_times(runs: dict, repeats: int) -> dict:
    """Fastest fwd+bwd seconds of each {name: (module, input)}, the modules taking turns (`interleaved_times`).

    The fastest is the least-disturbed run. In a world, every step starts
    together (barrier) and counts the slower rank; all ranks walk the same order.
    """
    import torch.distributed as dist

    world = dist.is_available() and dist.is_initialized()

    def step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
        module.zero_grad(set_to_none=True)
        if world:
            dist.barrier()
        start = time.perf_counter()
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * g).sum().backward()
        return _over_ranks(time.perf_counter() - start, "max")

    grads = {name: torch.randn_like(x) for name, (_, x) in runs.items()}
    steps = {name: (lambda m=module, x=x, g=grads[name]: step(m, x, g)) for name, (module, x) in runs.items()}
    return {name: min(ts) for name, ts in interleaved_times(steps, repeats).items()}


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


class CountAllToAll(TorchDispatchMode):
    """Bytes handed to an all-to-all while active, counted where the op is dispatched: torch's functional
    all-to-all (ours, forward and backward) and c10d's `alltoall_base_` (`torch.distributed.all_to_all_single`,
    which DeepSpeed's layer calls both ways).

    `bytes`: token payload (floating-point tensors); `metadata_bytes`: integer tensors
    (our per-expert token counts, P x L int64 per rank and layer, a few hundred bytes).
    A dispatch mode sees the backward's ops only where backward runs on this thread, as on the CPU: this
    counts the CPU table's rows (the GPU table does not count bytes).
    """

    def __enter__(self) -> CountAllToAll:
        self.bytes, self.metadata_bytes = 0, 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sent = _ALL_TO_ALL_INPUT.get(func)
        if sent is not None:
            tensor = args[sent]
            size = tensor.numel() * tensor.element_size()
            if tensor.is_floating_point():
                self.bytes += size
            else:
                self.metadata_bytes += size
        return func(*args, **kwargs)


# The all-to-all ops, and where their input (what this rank sends) is among the arguments.
_ALL_TO_ALL_INPUT = {
    torch.ops._c10d_functional.all_to_all_single.default: 0,  # (input, output splits, input splits, group)
    torch.ops.c10d.alltoall_base_.default: 1,  # (output, input, process group, splits..., timeout)
}


def _over_ranks(value: float, op: str = "sum") -> float:
    """value reduced over the world ("sum" or "max"); as it is without a process group."""
    return all_reduce_floats([float(value)], op)[0]


class _BankOnly(nn.Module):
    def __init__(self, bank: nn.Module, counts):
        super().__init__()
        self.bank, self.counts = bank, counts

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.bank(rows, self.counts)


def _one_step(module: nn.Module, x: torch.Tensor) -> None:
    out = module(x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    module.zero_grad(set_to_none=True)


def run_case(tokens: int, num_experts: int, mode: str, repeats: int, ds_max_gb: float, ep: int = 1) -> dict:
    """One row of the table. With ep > 1 every rank of the world calls this; `tokens` is the global count."""
    from deepspeed.moe.layer import MoE

    from mpoe.parallel.expert_placement import expert_placement
    from mpoe.parallel.process_groups import rank_world

    rank, world = rank_world()
    placement = expert_placement(ep) if ep > 1 else ExpertPlacement()
    capacity_factor = 1.0 if mode == "cf1" else None
    torch.manual_seed(0)  # the same router and global experts on every rank
    cfg = MoEConfig(
        kind="switch",
        num_experts=num_experts,
        top_k=1,
        capacity_factor=capacity_factor,
        aux_loss_coef=0.01,
        z_loss_coef=0.0,
    )
    ours = build_moe_layer(cfg, D_MODEL, D_FF, "gelu_new", placement)
    x = torch.randn(tokens, D_MODEL)
    if mode == "skewed":
        x = skew_tokens(x, ours.router.gate.weight.detach(), num_experts)
    x = x.chunk(world)[rank].contiguous().requires_grad_()  # each rank its share; inside a model x needs grad too

    rows = {}
    hook = ours.bank.register_forward_pre_hook(lambda m, args: rows.update(ours=args[0].shape[0], bank_args=args))
    with CountAllToAll() as ours_comm:
        _one_step(ours, x)
    hook.remove()  # the bank's rows of this step are what the bank-alone timing reuses
    counts = all_reduce(ours.stats.tokens_per_expert.double())  # every rank's tokens, before dropping
    routed = _over_ranks(ours.dispatcher.stats.routed_tokens)  # kept (token, expert) pairs, all ranks
    # The expert bank alone on its sorted rows: per-expert GEMMs + activation, no routing or dispatch.
    bank_rows, bank_counts = rows["bank_args"]
    runs = {
        "ours": (ours, x),
        "floor": (dense_ffn(), x),
        "bank": (_BankOnly(ours.bank, bank_counts), bank_rows.detach().requires_grad_()),
    }

    row_bytes = D_MODEL * x.element_size()
    result = dict(
        tokens=tokens,
        experts=num_experts,
        mode=mode,
        ep=ep,
        load_max_over_mean=float(counts.max() / counts.mean()),
        routed=int(routed),
        ours_rows=int(_over_ranks(rows["ours"])),
        tokens_dropped=int(_over_ranks(ours.stats.tokens_dropped)),
    )
    # What must cross the all-to-all at least: every kept (token, expert) row, out and back, forward and backward.
    minimum_bytes = 4 * routed * row_bytes
    if ep > 1:
        # Expert parallelism cannot balance what routing did not: the busiest rank's rows bound the step.
        result["rank_rows_max_over_mean"] = _over_ranks(rows["ours"], "max") * world / result["ours_rows"]
        result["ours_bytes_vs_routed"] = _over_ranks(ours_comm.bytes) / minimum_bytes
        result["ours_metadata_bytes"] = int(_over_ranks(ours_comm.metadata_bytes))
    if capacity_factor:
        capacity = math.ceil(x.shape[0] / num_experts * capacity_factor)
    else:  # DeepSpeed's dropless capacity: the largest local expert load over the ranks
        with torch.no_grad():
            capacity = int(_over_ranks(float(ours.router(x).tokens_per_expert.max()), "max"))
    result["ds_rows"] = int(_over_ranks(num_experts * capacity))
    ds_gb = (
        x.shape[0] * num_experts * capacity * 4 / 1e9
    )  # one [tokens, experts * capacity] float tensor; it builds several
    if ds_gb > ds_max_gb:
        result["ds_s"] = None
        result["ds_skipped"] = (
            f"its [tokens, experts x capacity] tensors need {ds_gb:.1f} GB each (> --ds-max-gb {ds_max_gb})"
        )
    else:
        ds = MoE(
            D_MODEL,
            dense_ffn(),
            num_experts=num_experts,
            ep_size=ep,
            k=1,
            capacity_factor=capacity_factor or 1.0,
            eval_capacity_factor=capacity_factor or 1.0,
            min_capacity=0,
            drop_tokens=capacity_factor is not None,
            use_rts=False,
        )
        if ep > 1:
            ds.set_deepspeed_parallelism()
        with torch.no_grad():
            ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
        runs["ds"] = (ds, x)
        if ep > 1:
            with CountAllToAll() as ds_comm:
                _one_step(ds, x)
            result["ds_bytes_vs_routed"] = _over_ranks(ds_comm.bytes) / minimum_bytes
    result.update({f"{name}_s": t for name, t in step_times(runs, repeats).items()})
    return result


def _ep_worker(rank: int, ep: int, cases: list, repeats: int, ds_max_gb: float, out_path: str) -> None:
    """Runs in each process of the ep world (see mpoe.parallel.local_world); rank 0 prints and saves the rows."""
    results = []
    for tokens, num_experts, mode in cases:
        r = run_case(tokens, num_experts, mode, repeats, ds_max_gb, ep=ep)
        results.append(r)
        if rank == 0:
            print_row(r)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def print_row(r: dict) -> None:
    ds = "skipped" if r["ds_s"] is None else f"{r['ds_s']:.3f}"
    ds_ratio = "-" if r["ds_s"] is None else f"{r['ds_s'] / r['ours_s']:.2f}"
    if r["ep"] > 1:  # bytes handed to the all-to-all / routed rows' bytes
        ours_b, ds_b = (
            f"{r['ours_bytes_vs_routed']:.2f}",
            "-" if r["ds_s"] is None else f"{r['ds_bytes_vs_routed']:.2f}",
        )
    else:  # no all-to-all: the dispatch buffer's rows / routed rows
        ours_b, ds_b = f"{r['ours_rows'] / r['routed']:.2f}", f"{r['ds_rows'] / r['routed']:.2f}"
    print(
        f"{r['ep']:>3} {r['tokens']:>7} {r['experts']:>3} {r['mode']:>8} {r['load_max_over_mean']:>5.2f} "
        f"{r['ours_s']:>7.3f} "
        f"{r['floor_s']:>7.3f} {ds:>7} {r['ours_s'] / r['floor_s']:>10.2f} {r['bank_s'] / r['floor_s']:>10.2f} "
        f"{ds_ratio:>8} {ours_b:>12} {ds_b:>10}",
        flush=True,
    )
    if r["ds_s"] is None:
        print(f"        DeepSpeed not run: {r['ds_skipped']}", flush=True)
    if r.get("rank_rows_max_over_mean", 1.0) > 1.05:
        print(
            f"        the busiest rank's experts hold {r['rank_rows_max_over_mean']:.2f}x the mean rank's rows "
            f"(the floor's ranks are balanced)",
            flush=True,
        )


# The GPU table: (tokens, experts, top_k, capacity factor or None = dropless, d_model, d_ff)
GPU_ROWS = [
    (16384, 8, 1, 1.0, 1024, 4096),
    (16384, 8, 1, None, 1024, 4096),
    (16384, 64, 1, None, 1024, 4096),
    (65536, 64, 1, None, 1024, 4096),
    (65536, 8, 2, None, 1024, 4096),
    (65536, 64, 2, None, 2048, 8192),
]


def _ds_layer(ours, d_model: int, d_ff: int, num_experts: int, top_k: int, capacity_factor, device, dtype):
    """DeepSpeed's MoE with our router's gate (its gate computes in fp32, as DeepSpeed keeps it)."""
    from deepspeed.moe.layer import MoE

    from mpoe.models.experts import activation_fn

    expert = nn.Sequential(
        nn.Linear(d_model, d_ff, bias=False), activation_fn("gelu_new"), nn.Linear(d_ff, d_model, bias=False)
    )
    ds = MoE(
        d_model,
        expert,
        num_experts=num_experts,
        ep_size=1,
        k=top_k,
        capacity_factor=capacity_factor or 1.0,
        eval_capacity_factor=capacity_factor or 1.0,
        min_capacity=0,
        drop_tokens=capacity_factor is not None,
        use_rts=False,
    ).to(device, dtype)
    gate = ds.deepspeed_moe.gate.wg
    gate.float()
    with torch.no_grad():
        gate.weight.copy_(ours.router.gate.weight.float())
    return ds


def gpu_case(row: tuple, device: torch.device, dtype: torch.dtype, repeats: int, ds_max_gb: float) -> dict:
    """One row of the GPU table: ours (grouped backend, sync-free dispatch), floor, grouped reference, DeepSpeed."""
    from bench.gpu import GroupedRefMoE, fwd_bwd_step, peer_stats
    from mpoe.models.experts import activation_fn

    tokens, num_experts, top_k, capacity_factor, d_model, d_ff = row
    torch.manual_seed(0)
    cfg = MoEConfig(
        kind="switch",
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        z_loss_coef=0.0,
        expert_impl="grouped",
    )
    ours = build_moe_layer(cfg, d_model, d_ff, "gelu_new", ExpertPlacement(), bias=False).to(device, dtype)
    ours.dispatcher.sync_free = True  # what CUDA gets by default; forced so that a CPU dry run takes the same path
    act = activation_fn("gelu_new")
    floor = nn.Sequential(  # the active FLOPs of a top-k layer: one FFN k times as wide
        nn.Linear(d_model, top_k * d_ff, bias=False), act, nn.Linear(top_k * d_ff, d_model, bias=False)
    ).to(device, dtype)
    bank = ours.bank
    ref = GroupedRefMoE(ours.router.gate.weight, bank.w_in, bank.w_out, top_k, act).to(device, dtype)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype).requires_grad_()
    g = torch.randn_like(x)
    modules = {"ours": ours, "floor": floor, "ref": ref}
    with torch.no_grad():
        counts = ours.router(x).tokens_per_expert
    load = float(counts.max()) / float(counts.float().mean())
    capacity = math.ceil(tokens * top_k / num_experts * capacity_factor) if capacity_factor else int(counts.max())
    ds_gb = tokens * num_experts * capacity * 4 / 1e9  # one of its [tokens, experts, capacity] fp32 tensors
    result = dict(
        tokens=tokens, experts=num_experts, top_k=top_k, capacity_factor=capacity_factor, d_model=d_model, d_ff=d_ff
    )
    result.update(load_max_over_mean=load, ds_skipped=None)
    if ds_gb > ds_max_gb:
        result["ds_skipped"] = f"[tokens, experts, capacity] tensors of {ds_gb:.1f} GB each (> --ds-max-gb)"
    else:
        try:
            modules["ds"] = _ds_layer(ours, d_model, d_ff, num_experts, top_k, capacity_factor, device, dtype)
        except Exception as e:  # report, keep the other columns
            result["ds_skipped"] = f"{type(e).__name__}: {e}".splitlines()[0]
    steps = {name: fwd_bwd_step(module, x, g) for name, module in modules.items()}
    for name, stats in peer_stats(steps, device, repeats, modules=modules, count_ops=True).items():
        if "error" in stats:  # the row keeps the peers that ran; one without ours, floor or ref has no ratio
            result["ds_skipped" if name == "ds" else "failed"] = f"{name}: {stats['error']}"
            continue
        result.update({f"{name}_{key}": stats[key] for key in ("ms", "peak_mb", "ops", "other_mb")})
    del modules, ours, floor, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_gpu_row(r: dict) -> None:
    if not all(f"{name}_ms" in r for name in ("ours", "floor", "ref")):
        print(f"{str(r.get('row', r.get('tokens', '?'))):>6} row failed: {r['failed']}", flush=True)
        return
    mb = lambda name: "-" if r.get(f"{name}_peak_mb") is None else f"{r[f'{name}_peak_mb']:.0f}"
    ms = lambda name: "-" if f"{name}_ms" not in r else f"{r[f'{name}_ms']:.2f}"
    routing = "dropless" if r["capacity_factor"] is None else f"cf {r['capacity_factor']}"
    ds_ratio = f"{r['ds_ms'] / r['ours_ms']:.2f}" if "ds_ms" in r else "-"
    print(
        f"{r['tokens']:>6} {r['d_model']:>5}/{r['d_ff']:<5} {r['experts']:>3} {r['top_k']:>2} {routing:>9} "
        f"{r['load_max_over_mean']:>5.2f} {ms('ours'):>8} {ms('floor'):>8} {ms('ref'):>8} {ms('ds'):>8} "
        f"{r['ours_ms'] / r['floor_ms']:>7.2f} {r['ours_ms'] / r['ref_ms']:>7.2f} {ds_ratio:>7} "
        f"{mb('ours'):>8} {mb('floor'):>8} {mb('ref'):>8} {mb('ds'):>8} {r['ours_ops']:>8} {r['ref_ops']:>7} "
        f"{r['ours_other_mb']:>13.0f} {r['ref_other_mb']:>6.0f}",
        flush=True,
    )
    if r["ds_skipped"]:
        print(f"        DeepSpeed not run: {r['ds_skipped']}", flush=True)


def run_gpu(device: str, quick: bool, repeats: Optional[int], ds_max_gb: float, scale: int = 1, dtype=None) -> dict:
    """The GPU table (bf16). scale > 1 divides tokens and widths: a dry run of the same code on a CPU."""
    dev = torch.device(device)
    dtype = dtype or torch.bfloat16
    repeats = repeats or (5 if quick else 10)
    rows = [(t // scale, e, k, cf, d // scale, f // scale) for t, e, k, cf, d, f in GPU_ROWS]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    print(f"MoE layer fwd+bwd on {name}, {dtype}, median of {repeats} after warm-up; peak MB = what a step adds;")
    print(
        "ops = kernel-running ops one step dispatches (GPU launches), other MB = what those outside the matrix\n"
        "products read and write (bandwidth-bound on a GPU): both counted by the ops themselves, on any device"
    )
    print(
        f"{'tokens':>6} {'d/d_ff':>11} {'E':>3} {'k':>2} {'routing':>9} {'load':>5} {'ours':>8} {'floor':>8} "
        f"{'ref':>8} {'DS':>8} {'/floor':>7} {'/ref':>7} {'DS/ours':>7} {'ours MB':>8} {'floor MB':>8} "
        f"{'ref MB':>8} {'DS MB':>8} {'ops ours':>8} {'ops ref':>7} {'other MB ours':>13} {'ref':>6}"
    )
    results_rows = []
    for row in rows:
        try:
            results_rows.append(gpu_case(row, dev, dtype, repeats, ds_max_gb))
        except Exception as e:  # building the row failed (an OOM, say): the other rows still run
            results_rows.append({"row": row, "failed": f"{type(e).__name__}: {e}".splitlines()[0]})
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        print_gpu_row(results_rows[-1])
    done = [r for r in results_rows if all(f"{name}_ms" in r for name in ("ours", "floor", "ref"))]
    worst = lambda f, values: f(values) if values else None  # the headlines cover the rows that ran whole
    with_ds = [r["ds_ms"] / r["ours_ms"] for r in done if "ds_ms" in r]
    results = {
        "gpu.moe_layer.vs_floor": worst(max, [r["ours_ms"] / r["floor_ms"] for r in done]),
        "gpu.moe_layer.vs_grouped_ref": worst(max, [r["ours_ms"] / r["ref_ms"] for r in done]),
        "gpu.moe_layer.speedup_vs_deepspeed": worst(min, with_ds),
    }
    if len(done) < len(results_rows):
        print(f"headline over the {len(done)} of {len(results_rows)} rows that ran whole", flush=True)
    print("headline (worst over the table):", json.dumps(results))
    return {"results": results, "rows": results_rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=json_path, help="write the headline ratios here")
    parser.add_argument("--device", default="cpu", help="cpu (the CPU table) or cuda (the GPU table, bf16)")
    parser.add_argument("--gpu-scale", type=int, default=1, help=argparse.SUPPRESS)  # dry run: GPU table / N
    parser.add_argument("--quick", action="store_true", help="small token counts (about 2 minutes on 2 cores)")
    parser.add_argument("--tokens", type=int, nargs="*", help="override the token counts (global, for every ep)")
    parser.add_argument(
        "--ep", type=int, nargs="+", default=[1, 2], help="expert-parallel sizes; ep > 1 spawns that many processes"
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32], help="expert counts of the CPU table")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ds-max-gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.device != "cpu" or args.gpu_scale > 1:
        dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
        out = run_gpu(args.device, args.quick, args.repeats, args.ds_max_gb, args.gpu_scale, dtype)
        write_json(args.json, out)
        return out["results"]
    repeats = args.repeats or 3
    modes = ("cf1", "dropless", "skewed")

    rows = []
    print(
        f"load average at start {os.getloadavg()[0]:.1f}; "
        f"torch threads {torch.get_num_threads()} (ep > 1: 1 per process); "
        f"top-1, d_model {D_MODEL}, d_ff {D_FF}; seconds per fwd+bwd step"
    )
    print(
        f"{'ep':>3} {'tokens':>7} {'E':>3} {'mode':>8} {'load':>5} {'ours':>7} {'floor':>7} {'DS':>7} "
        f"{'ours/floor':>10} {'bank/floor':>10} {'DS/ours':>8} {'ours bytes':>12} {'DS bytes':>10}"
    )
    print(
        "    (bank/floor: the expert bank alone on its sorted rows, i.e. the per-expert GEMMs' own cost;\n"
        "     bytes: ep 1 = dispatch buffer rows / routed rows; "
        "ep > 1 = bytes handed to all_to_all / routed rows' bytes x 4)"
    )
    for ep in args.ep:
        if ep == 1:
            token_counts = args.tokens or ([2048, 4096] if args.quick else [8192, 32768])
            for tokens in token_counts:
                for num_experts in args.experts:
                    for mode in modes:
                        rows.append(run_case(tokens, num_experts, mode, repeats, args.ds_max_gb))
                        print_row(rows[-1])
        else:
            from mpoe.parallel.local_world import spawn_world

            token_counts = args.tokens or ([4096] if args.quick else [8192])
            cases = [(t, e, m) for t in token_counts for e in args.experts for m in modes]
            with tempfile.TemporaryDirectory() as tmp:
                out_path = os.path.join(tmp, "rows.json")
                spawn_world(_ep_worker, ep, ep, cases, repeats, args.ds_max_gb, out_path)
                with open(out_path) as f:
                    rows.extend(json.load(f))

    timed = [r for r in rows if r["ds_s"] is not None]
    worst = lambda xs: min(xs) if xs else None
    bytes_ratio = lambda r: r["ours_bytes_vs_routed"] if r["ep"] > 1 else r["ours_rows"] / r["routed"]
    results = {
        "moe_layer.vs_floor": max(r["ours_s"] / r["floor_s"] for r in rows),
        "moe_layer.speedup_vs_deepspeed": worst([r["ds_s"] / r["ours_s"] for r in timed if r["mode"] != "skewed"]),
        "moe_layer.speedup_vs_deepspeed_skewed": worst(
            [r["ds_s"] / r["ours_s"] for r in timed if r["mode"] == "skewed"]
        ),
        "dispatch.bytes_vs_routed": max(bytes_ratio(r) for r in rows),
    }
    for ep in sorted({r["ep"] for r in rows}):
        results[f"moe_layer.vs_floor_ep{ep}"] = max(r["ours_s"] / r["floor_s"] for r in rows if r["ep"] == ep)
    # Where the worst case's time goes: its expert bank alone against the floor (GEMMs split per expert)
    worst_row = max(rows, key=lambda r: r["ours_s"] / r["floor_s"])
    results["moe_layer.bank_vs_floor_at_worst"] = worst_row["bank_s"] / worst_row["floor_s"]
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print("headline (worst case over the grid):", json.dumps(results))
    write_json(args.json, {"results": results, "rows": rows})
    return results


if __name__ == "__main__":
    main()
