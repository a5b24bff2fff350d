"""End-to-end MoE training step, GPT-2-small shaped: model FLOPs utilisation against this machine's GEMM rate.

    python -m bench.train_step [--json FILE] [--quick] [--kinds switch mpoe] [--layers L] [--seq S] [--batch B]
    python -m bench.train_step --device cuda [--json FILE]     # the GPU row (see `run_device`)
    python -m bench.train_step --device cuda --compile         # and the same models with trainer.compile

One optimizer step = forward + backward + AdamW step (DeepSpeed engine, as
`mpoe-train` runs it) of our LanguageModel from `mpoe.models.build.build_model`:
d_model 768, d_ff 3072, 12 heads, vocabulary 50257 (tied head), an MoE FFN in
every 2nd layer (8 experts, top-1, dropless). Full: 12 layers, 8 x 512 tokens;
--quick: 2 layers, 8 x 128 tokens. Time is the fastest of a few steps after one
warm-up (the machine is shared).

Model FLOPs per step (the PaLM convention; recomputation and MPO rebuilding
are not counted, they are overhead):

    FLOPs = tokens * (6 * N_matmul + 12 * L * d_model * S)

    N_matmul = L * 4 * d_model^2                      attention q, k, v, output projections
             + sum over layers of the FFN one token uses: 2 * d_model * d_ff
               (MoE layer: top_k experts' 2 * d_model * d_ff + the router's d_model * E)
             + V * d_model                             LM head (tied to the token table)

i.e. 6 x the active matmul parameters per token, plus 12 * L * d_model * S for
attention scores and values (S = sequence length). For MPOE an expert counts as
the dense d_model x d_ff matrices it applies, not its (smaller) MPO parameter
count. MFU = (FLOPs / step time) / the fp32 GEMM rate measured in the same run
(torch.mm of [tokens, d_model] x [d_model, d_ff], fastest of several).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Optional

import torch

from mpoe.parallel.deepspeed.accelerator import configure_accelerator

configure_accelerator()

from bench import interleaved_times, json_path, write_json  # noqa: E402
from bench.gpu import step_peak_mb  # noqa: E402
from mpoe.config import ModelConfig, MoEConfig, OptimConfig, TrainConfig, TrainerConfig  # noqa: E402

D_MODEL, D_FF, HEADS, VOCAB = 768, 3072, 12, 50257


def make_config(
    kind: str, layers: int, seq: int, batch: int, experts: int = 8, bond_dim=None, vocab: int = VOCAB
) -> TrainConfig:
    model = ModelConfig(
        family="gpt2",
        name="gpt2_small_bench",
        d_model=D_MODEL,
        d_ff=D_FF,
        num_layers=layers,
        num_heads=HEADS,
        vocab_size=vocab,
        max_position_embeddings=1024,
        dropout=0.0,
    )
    moe = MoEConfig(kind=kind, num_experts=experts, top_k=1, every=2, bond_dim=bond_dim if kind == "mpoe" else None)
    trainer = TrainerConfig(
        max_steps=1000,
        micro_batch_size=batch,
        global_batch_size=batch,
        seq_len=seq,
        log_every=1 << 30,
        eval_every=1 << 30,
    )
    return TrainConfig(model=model, moe=moe, optim=OptimConfig(warmup_steps=1), trainer=trainer)


def model_flops_per_step(cfg: TrainConfig) -> float:
    """The formula in the module docstring."""
    m, moe, t = cfg.model, cfg.moe, cfg.trainer
    d, L, S = m.d_model, m.num_layers, t.seq_len
    n = L * 4 * d * d + m.vocab_size * d
    for layer in range(L):
        if moe.kind != "dense" and (layer + 1) % moe.every == 0:
            n += moe.top_k * 2 * d * m.d_ff + d * moe.num_experts
        else:
            n += 2 * d * m.d_ff
    tokens = t.global_batch_size * S
    return tokens * (6 * n + 12 * L * d * S)


def gemm_rate(tokens: int, repeats: int = 5) -> float:
    """fp32 FLOP/s of one torch.mm of the FFN's shape, fastest of `repeats` after a warm-up."""
    a, b = torch.randn(tokens, D_MODEL), torch.randn(D_MODEL, D_FF)
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * tokens * D_MODEL * D_FF / best


def measure(cfg: TrainConfig, repeats: int) -> dict:
    """Build, wrap in the DeepSpeed engine and time `repeats` optimizer steps (after one warm-up)."""
    from mpoe.models.accounting import count_params
    from mpoe.models.build import build_model
    from mpoe.models.gpt2 import FAMILY as GPT2
    from mpoe.parallel.deepspeed import engine as ds_engine
    from mpoe.parallel.deepspeed.accelerator import configure_accelerator
    from mpoe.parallel.expert_placement import expert_placement
    from mpoe.parallel.process_groups import init_distributed

    configure_accelerator("cpu")  # the CPU rows, also on a GPU machine (see `run_device`)
    init_distributed()
    model = build_model(cfg, cfg.model.vocab_size, 0, 0, expert_placement(1))
    counts = count_params(model, GPT2.embedding_params(model.backbone), cfg.moe.top_k, 1)
    engine = ds_engine.initialize(model, cfg, 1)
    t = cfg.trainer
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), generator=gen).to(engine.device)
        for _ in range(2)
    ]
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = engine(input_ids=batches[i % 2])
        engine.backward(out.loss)
        engine.step()
        if i:
            times.append(time.perf_counter() - start)
    del engine, model
    return {"step_s": min(times), "params_total": counts["params_total"], "params_active": counts["params_active"]}


def run(
    quick: bool = False, kinds=("switch", "mpoe"), layers=None, seq=None, batch=None, repeats=None, bond_dim=None
) -> dict:
    layers = layers or (2 if quick else 12)
    seq = seq or (128 if quick else 512)
    batch = batch or 8
    repeats = repeats or 3
    tokens = batch * seq
    print(
        f"train step: GPT-2-small shape (d_model {D_MODEL}, d_ff {D_FF}, {HEADS} heads, vocab {VOCAB}), "
        f"{layers} layers, {batch} x {seq} tokens, MoE every 2nd layer (8 experts, top-1); "
        f"load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    rate_before = gemm_rate(tokens)
    rows = {}
    for kind in kinds:
        cfg = make_config(kind, layers, seq, batch, bond_dim=bond_dim)
        r = measure(cfg, repeats)
        r["model_flops"] = model_flops_per_step(cfg)
        rows[kind] = r
    rate = max(rate_before, gemm_rate(tokens))  # the best GEMM rate seen: the conservative denominator
    print(
        f"GEMM rate (fp32 torch.mm [{tokens}, {D_MODEL}] x [{D_MODEL}, {D_FF}], best of before/after): "
        f"{rate / 1e9:.1f} GFLOP/s"
    )
    print(f"{'moe':<8}{'params total':>14}{'active':>13}{'step s':>9}{'model TFLOP':>13}{'GFLOP/s':>9}{'MFU':>7}")
    for kind, r in rows.items():
        r["achieved_flops"] = r["model_flops"] / r["step_s"]
        r["mfu"] = r["achieved_flops"] / rate
        print(
            f"{kind:<8}{r['params_total']:>14,}{r['params_active']:>13,}{r['step_s']:>9.3f}"
            f"{r['model_flops'] / 1e12:>13.3f}{r['achieved_flops'] / 1e9:>9.1f}{r['mfu']:>7.3f}"
        )
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    results = {f"train_step.mfu_{kind}": r["mfu"] for kind, r in rows.items()}
    headline = min(rows, key=lambda k: rows[k]["mfu"])  # the worst kind, as bench.moe_layer's headlines
    results["train_step.mfu"] = rows[headline]["mfu"]
    results["train_step.gemm_gflops"] = rate / 1e9
    return {
        "results": results,
        "rows": rows,
        "config": {"layers": layers, "seq": seq, "batch": batch, "repeats": repeats, "headline": headline},
    }


def timed_step(engine, batches: list, device: torch.device) -> Callable[[], float]:
    """One optimizer step as a callable returning its seconds (CUDA events on a GPU, so no host timer
    measures launch latency instead of the kernels)."""
    state = {"i": 0}

    def step() -> float:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        out = engine(input_ids=batch)
        engine.backward(out.loss)
        engine.step()
        if device.type == "cuda":
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return time.perf_counter() - t0

    return step


def run_device(
    device: str = "cuda",
    kinds=("dense", "switch", "mpoe"),
    layers: int = 12,
    seq: int = 1024,
    batch: int = 16,
    repeats: int = 10,
    bond_dim=None,
    precision: str = "bf16",
    vocab: int = VOCAB,
    compile: Optional[str] = None,
) -> dict:
    """The GPU row: dense, Switch and MPOE training steps taking turns (`interleaved_times`), bf16,
    tokens/s and MFU against the device's peak (`mpoe.train.metrics.flops.device_peak`: datasheet for known GPUs).
    With `compile` (a torch.compile backend: inductor from the command line), each model also runs with its
    blocks compiled (`trainer.compile`), in the same rotation."""
    from mpoe.models.accounting import count_params
    from mpoe.models.build import build_model
    from mpoe.models.experts import resolve_expert_backends
    from mpoe.models.gpt2 import FAMILY as GPT2
    from mpoe.models.regional_compile import compile_blocks
    from mpoe.parallel.deepspeed import engine as ds_engine
    from mpoe.parallel.deepspeed.accelerator import configure_accelerator
    from mpoe.parallel.expert_placement import expert_placement
    from mpoe.parallel.process_groups import init_distributed
    from mpoe.train.metrics.flops import device_peak

    dev = torch.device(device)
    # DeepSpeed puts the model on the accelerator it chose at import, whatever `device` says: make that `device`.
    # It cannot change once chosen, so a process that already runs DeepSpeed elsewhere gets one line saying so
    # (configure_accelerator's RuntimeError) rather than a subprocess: the command line runs one device per
    # process, so only a caller mixing devices in one process meets it, and it can start a process per device.
    configure_accelerator(device)
    init_distributed()  # the backend follows the accelerator: nccl on CUDA, gloo on the CPU
    peak = device_peak(precision, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(
        f"train step on {name}: GPT-2-small shape, {layers} layers, {batch} x {seq} tokens, {precision}, "
        f"MoE every 2nd layer (8 experts, top-1, dropless); peak {peak.flops_per_s / 1e12:.1f} TFLOP/s ({peak.source})",
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(2)]
    steps, rows = {}, {}
    for kind, compiled in [(k, False) for k in kinds] + [(k, True) for k in kinds if compile]:
        cfg = make_config(kind, layers, seq, batch, bond_dim=bond_dim, vocab=vocab)
        cfg.trainer.precision = precision
        model = build_model(cfg, vocab, 0, 0, expert_placement(1))
        counts = count_params(model, GPT2.embedding_params(model.backbone), cfg.moe.top_k, 1)
        if compiled:
            compile_blocks(model, compile)
        engine = ds_engine.initialize(model, cfg, 1)
        row = f"{kind}+compile" if compiled else kind
        experts = resolve_expert_backends(model, engine.device)  # moe.expert_impl=auto, now for the engine's device
        if experts:
            print(f"{row}: {experts}", flush=True)
        steps[row] = timed_step(engine, [b.to(engine.device) for b in batches], dev)
        rows[row] = {"params_total": counts["params_total"], "model_flops": model_flops_per_step(cfg)}
    failed = {}

    def drop(row: str, when: str, e: Exception) -> None:
        """A row that fails (a compile error, an OOM) is left out; the rows beside it are still measured."""
        failed[row] = f"{when}: {type(e).__name__}: {e}".splitlines()[0]
        print(f"{row}: left out, {failed[row]}", flush=True)
        steps.pop(row, None)
        rows.pop(row, None)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    for row, step in list(steps.items()):  # the first step compiles: its time is reported, not timed
        t0 = time.perf_counter()
        try:
            step()
        except Exception as e:
            drop(row, "first step", e)
            continue
        rows[row]["first_step_s"] = time.perf_counter() - t0
        print(f"{row}: first step {rows[row]['first_step_s']:.1f} s", flush=True)
    for round_ in range(2):  # warm-up beyond interleaved_times' own round: cuBLAS heuristics, allocator, autotuning
        for row, step in list(steps.items()):
            try:
                if round_ == 1 and dev.type == "cuda":  # this row's own peak: what its step adds to all models
                    rows[row]["step_peak_gib"] = step_peak_mb(step, dev) / 2**10
                else:
                    step()
            except Exception as e:
                drop(row, "warm-up", e)

    def guarded(row: str, step: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            if row in failed:
                return math.nan
            try:
                return step()
            except Exception as e:
                drop(row, "timed step", e)
                return math.nan

        return run

    times = interleaved_times({row: guarded(row, step) for row, step in steps.items()}, repeats)
    tokens = batch * seq
    print(f"{'moe':<16}{'params total':>14}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>7}{'first s':>9}")
    for row, r in rows.items():
        r["step_s"] = statistics.median(times[row])
        r["tokens_per_s"] = tokens / r["step_s"]
        r["achieved_flops"] = r["model_flops"] / r["step_s"]
        r["mfu"] = r["achieved_flops"] / peak.flops_per_s
        print(
            f"{row:<16}{r['params_total']:>14,}{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
            f"{r['achieved_flops'] / 1e12:>10.1f}{r['mfu']:>7.3f}{r['first_step_s']:>9.1f}"
        )
    if dev.type == "cuda":
        all_models = torch.cuda.memory_allocated(dev) / 2**30
        steps_gib = ", ".join(f"{row} {r['step_peak_gib']:.1f}" for row, r in rows.items())
        print(
            f"memory: all models resident (weights, optimizer, gradient buffers) {all_models:.1f} GiB; "
            f"a step adds (GiB) {steps_gib}"
        )
    results = {}
    for prefix, suffix in [("train_step.gpu_", "")] + ([("train_step.gpu_compiled_", "+compile")] if compile else []):
        mine = {kind: rows[kind + suffix] for kind in kinds if kind + suffix in rows}
        results.update({f"{prefix}mfu_{kind}": r["mfu"] for kind, r in mine.items()})
        results.update({f"{prefix}tokens_per_s_{kind}": r["tokens_per_s"] for kind, r in mine.items()})
        if "dense" in mine and "switch" in mine:
            results[f"{prefix}switch_vs_dense"] = mine["switch"]["tokens_per_s"] / mine["dense"]["tokens_per_s"]
        if "switch" in mine and "mpoe" in mine:
            results[f"{prefix}mpoe_vs_switch"] = mine["mpoe"]["tokens_per_s"] / mine["switch"]["tokens_per_s"]
    for kind in kinds:
        if kind + "+compile" in rows and kind in rows:
            speedup = rows[kind + "+compile"]["tokens_per_s"] / rows[kind]["tokens_per_s"]
            results[f"train_step.gpu_compile_speedup_{kind}"] = speedup
    config = {
        "device": name,
        "layers": layers,
        "seq": seq,
        "batch": batch,
        "repeats": repeats,
        "precision": precision,
        "peak_source": peak.source,
        "compile_backend": compile,
        "failed": failed,
        "compile_failed": {row: why for row, why in failed.items() if row.endswith("+compile")},
    }
    return {"results": results, "rows": rows, "config": config}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=json_path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="2 layers, 8 x 128 tokens")
    ap.add_argument(
        "--kinds", nargs="+", choices=["dense", "switch", "mpoe"], help="default: switch mpoe on cpu, all on cuda"
    )
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument(
        "--bond-dim", type=int, default=None, help="MPOE bond cap (default: full, as mpoe/conf/moe/mpoe.yaml)"
    )
    ap.add_argument("--compile", action="store_true", help="--device cuda: also time each model with trainer.compile")
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu: the fp32 MFU rows above; cuda: the GPU row (bf16, dense/Switch/MPOE, 16 x 1024 tokens)",
    )
    args = ap.parse_args(argv)
    if args.device == "cpu":
        kinds = args.kinds or ["switch", "mpoe"]
        out = run(args.quick, kinds, args.layers, args.seq, args.batch, args.repeats, args.bond_dim)
    else:
        sizes = {
            "layers": args.layers or (2 if args.quick else 12),
            "seq": args.seq or (128 if args.quick else 1024),
            "batch": args.batch or (4 if args.quick else 16),
            "repeats": args.repeats or (3 if args.quick else 10),
        }
        kinds = args.kinds or ["dense", "switch", "mpoe"]
        backend = "inductor" if args.compile else None
        out = run_device(args.device, kinds, bond_dim=args.bond_dim, compile=backend, **sizes)
    print("headline:", json.dumps(out["results"]))
    write_json(args.json, out)
    return out["results"]


if __name__ == "__main__":
    main()
