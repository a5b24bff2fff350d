"""All benchmarks in one process, one table of ratios against their peers.

    python -m bench [--quick] [--json FILE] [--only experts moe_layer hf_switch train_step lm_loss] [--device cuda]

Runs, in this order, each module's own `main`/`run` (their printed detail first):
  bench.experts     MPOE vs Switch expert bank (and Switch vs DeepSpeed's Experts)
  bench.moe_layer   our Switch MoE layer vs DeepSpeed's MoE layer and the dense floor
  bench.hf_switch   our Switch MoE layer vs HF SwitchTransformersSparseMLP
  bench.train_step  GPT-2-small-shaped MoE training step: model FLOPs utilisation
  bench.lm_loss     LM head + cross-entropy: mpoe's chunked loss vs HF's (time, peak memory)
How long they take: docs/benchmarks.md, and --json's "seconds".
--device cuda passes the device to every benchmark (their GPU tables, bf16, keys gpu.*);
the default, cpu, runs the CPU rows and keys as before.
--json writes {"results": {name: value}, "load_average": {...}, "seconds": {...}}.
The machine may be shared: the load average before and after is printed;
times are fastest-of or median-of repeats (see each module).
"""

from __future__ import annotations

import argparse
import math
import os
import time

from bench import json_path, write_json

# name: (what it compares, how to read it, target or None)
ROWS = {
    "experts.mpoe_vs_switch_time": ("MPOE bank fwd+bwd time / Switch bank", "lower is better", "<= 1.10"),
    "experts.mpoe_vs_switch_params": ("MPOE bank params / Switch bank", "lower is better", "<= 0.25"),
    "experts.switch_vs_deepspeed_time": ("Switch bank time / DeepSpeed Experts", "lower is better", None),
    "experts.mpoe_vs_switch_time_quarter_tokens": (
        "  ... MPOE / Switch time at a quarter of the tokens",
        "lower is better",
        None,
    ),
    "moe_layer.vs_floor": (
        "our MoE layer time / dense FFN floor (worst case, ep 1 and 2)",
        "lower is better",
        "<= 1.05",
    ),
    "moe_layer.vs_floor_ep1": ("  ... single process", "lower is better", None),
    "moe_layer.vs_floor_ep2": ("  ... 2 processes, expert parallel", "lower is better", None),
    "moe_layer.bank_vs_floor_at_worst": (
        "  ... its expert bank alone / floor (per-expert GEMMs)",
        "lower is better",
        None,
    ),
    "moe_layer.speedup_vs_deepspeed": ("DeepSpeed MoE time / ours (worst, balanced)", "higher is better", ">= 1.0"),
    "moe_layer.speedup_vs_deepspeed_skewed": (
        "DeepSpeed MoE time / ours (worst, skewed)",
        "higher is better",
        ">= 1.5",
    ),
    "dispatch.bytes_vs_routed": ("all-to-all bytes / routed tokens' bytes", "1.00 = no padding", "<= 1.0"),
    "hf_switch.speedup": ("HF SwitchTransformersSparseMLP time / ours", "higher is better", None),
    "train_step.mfu": ("model FLOPs utilisation, worst MoE kind", "fraction of GEMM rate", ">= 0.40"),
    "train_step.mfu_switch": ("  ... GPT-2-small Switch model", "fraction of GEMM rate", None),
    "train_step.mfu_mpoe": ("  ... GPT-2-small MPOE model (full bonds)", "fraction of GEMM rate", None),
    "train_step.gemm_gflops": ("fp32 GEMM rate measured (denominator)", "GFLOP/s", None),
    "gpu.experts.mpoe_vs_switch_time": ("GPU bf16: MPOE bank time / Switch bank (worse of 8, 64 E)", "lower", "<= 1.2"),
    "gpu.experts.mpoe_recompute_vs_switch_time": ("  ... MPOE with W recomputed in backward / Switch", "lower", None),
    "gpu.experts.mpoe_recompute_vs_mpoe_peak": ("  ... its peak memory / MPOE's (larger of 8, 64 E)", "lower", None),
    "gpu.moe_layer.vs_floor": ("GPU bf16: our MoE layer / dense floor (worst row)", "lower is better", None),
    "gpu.moe_layer.vs_grouped_ref": ("GPU bf16: ours / 30-line grouped_mm MoE (worst row)", "lower", "<= 1.0"),
    "gpu.moe_layer.speedup_vs_deepspeed": ("GPU bf16: DeepSpeed MoE time / ours (worst)", "higher", ">= 1.0"),
    "train_step.gpu_mfu_dense": ("GPU bf16 GPT-2-small dense step: MFU vs datasheet peak", "higher", ">= 0.35"),
    "train_step.gpu_mfu_switch": ("  ... Switch (8 experts every 2nd layer)", "higher is better", None),
    "train_step.gpu_mfu_mpoe": ("  ... MPOE", "higher is better", None),
    "train_step.gpu_switch_vs_dense": ("GPU bf16: Switch tokens/s / dense tokens/s", "higher", ">= 0.85"),
    "train_step.gpu_mpoe_vs_switch": ("GPU bf16: MPOE tokens/s / Switch tokens/s", "higher", ">= 0.8"),
    "train_step.gpu_compiled_mfu_dense": ("  ... dense, blocks compiled (train_step --compile)", "higher", None),
    "train_step.gpu_compiled_switch_vs_dense": ("  ... Switch / dense, both compiled", "higher is better", None),
    "train_step.gpu_compiled_mpoe_vs_switch": ("  ... MPOE / Switch, both compiled", "higher is better", None),
    "train_step.gpu_compile_speedup_dense": ("GPU bf16: compiled / eager tokens/s, dense", "higher is better", None),
    "train_step.gpu_compile_speedup_switch": ("  ... Switch", "higher is better", None),
    "train_step.gpu_compile_speedup_mpoe": ("  ... MPOE", "higher is better", None),
    "gpu.hf_switch.speedup": ("GPU bf16: HF SwitchTransformersSparseMLP time / ours", "higher is better", None),
    "lm_loss.chunked_vs_hf_time": ("LM head + loss fwd+bwd: chunked time / HF's", "lower is better", None),
    "lm_loss.chunked_vs_hf_peak_memory": ("  ... peak memory added, chunked / HF's", "lower is better", None),
    "gpu.lm_loss.chunked_vs_hf_time": ("GPU bf16 LM head + loss: chunked time / HF's", "lower", "<= 1.0"),
    "gpu.lm_loss.chunked_vs_hf_peak_memory": ("  ... peak memory added, chunked / HF's", "lower", "<= 0.25"),
}
BENCHES = ("experts", "moe_layer", "hf_switch", "train_step", "lm_loss")


def _banner(name: str) -> None:
    print(f"\n=== bench.{name} " + "=" * max(0, 60 - len(name)), flush=True)


def run_bench(name: str, quick: bool, device: str = "cpu") -> dict:
    flag = ["--quick"] if quick else []
    on = [] if device == "cpu" else ["--device", device]  # the CPU runs keep exactly their old arguments
    if name == "experts":
        from bench import experts

        return experts.main(flag + on)
    if name == "moe_layer":
        from bench import moe_layer

        return moe_layer.main(flag + on)
    if name == "hf_switch":
        from bench import hf_switch

        return hf_switch.run(quick, device=device)["results"]
    if name == "train_step":
        from bench import train_step

        return train_step.main(flag + on) if on else train_step.run(quick)["results"]
    if name == "lm_loss":
        from bench import lm_loss

        return lm_loss.main(flag + on)
    raise ValueError(name)


def _target_met(value: float, target: str) -> str:
    op, bound = target.split()
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return "met" if ok else "NOT met"


def table(results: dict) -> str:
    lines = [f"{'result':<40}{'value':>9}  {'what':<66}{'target':>16}"]
    for key, value in results.items():
        what, how, target = ROWS.get(key, ("", "", None))
        shown = "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"
        tgt = "" if target is None or shown == "-" else f"{target} {_target_met(value, target)}"
        lines.append(f"{key:<40}{shown:>9}  {(what + ' (' + how + ')'):<66}{tgt:>16}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (docs/benchmarks.md says how long they take)")
    ap.add_argument("--json", type=json_path, help="write {'results': {...}} here")
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES), help="a subset of the benchmarks")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: passed to every benchmark")
    args = ap.parse_args(argv)
    # DeepSpeed picks its accelerator once per process, at first use: fix it to the asked device before a benchmark
    # imports DeepSpeed. Otherwise the CPU tables on a GPU machine run it on CUDA, and bench.train_step, which
    # builds its CPU engine on DeepSpeed's CPU accelerator, cannot start.
    from mpoe.parallel.deepspeed.accelerator import configure_accelerator

    configure_accelerator(args.device)
    load_start = os.getloadavg()[0]
    print(
        f"python -m bench{' --quick' if args.quick else ''}: load average at start {load_start:.1f} "
        f"(2 cores shared: ratios are more trustworthy than absolute times)",
        flush=True,
    )
    results, seconds, failed = {}, {}, {}
    for name in args.only:
        _banner(name)
        start = time.perf_counter()
        try:
            results.update(run_bench(name, args.quick, args.device))
        except Exception as e:  # one benchmark failing should not lose the others' numbers
            failed[name] = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"bench.{name} failed: {failed[name]}", flush=True)
        seconds[name] = time.perf_counter() - start
    ordered = {k: results[k] for k in ROWS if k in results}
    ordered.update({k: v for k, v in results.items() if k not in ordered})
    load_end = os.getloadavg()[0]
    print(
        f"\n=== summary ({', '.join(f'{n} {s:.0f}s' for n, s in seconds.items())}; "
        f"load average {load_start:.1f} -> {load_end:.1f}) ==="
    )
    print(table(ordered))
    for name, why in failed.items():
        print(f"bench.{name} did not run to the end: {why}")
    write_json(
        args.json,
        {
            "results": ordered,
            "load_average": {"start": load_start, "end": load_end},
            "seconds": seconds,
            "quick": args.quick,
            "device": args.device,
            "failed": failed,
        },
    )
    if failed:
        raise SystemExit(1)
    return ordered


if __name__ == "__main__":
    from mpoe.process import configure_process

    configure_process()
    main()
