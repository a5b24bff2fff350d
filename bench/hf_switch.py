"""Our Switch MoE layer vs Hugging Face's `SwitchTransformersSparseMLP`, same shape, same weights, same routing.

    python -m bench.hf_switch [--json FILE] [--quick]

Top-1, 8 experts, d_model 768, d_ff 3072, tanh-GELU, no biases (as HF's experts),
one fwd+bwd of sum(out * g) (bench.moe_layer.step_times: fastest of 5 rounds
in which the two layers take turns, after a warm-up round). HF's capacity is
counted per sequence; it is set to the sequence length, and ours is dropless, so neither drops a token and both
compute the
same function (checked: outputs agree). HF loops over experts with a boolean
mask and index_add per expert; ours permutes once and runs one grouped GEMM
per weight. hf_switch.speedup = HF time / our time.
"""

from __future__ import annotations

import argparse
import os

import torch

from mpoe.parallel.deepspeed.accelerator import configure_accelerator

configure_accelerator()

from bench import json_path, write_json  # noqa: E402
from bench.moe_layer import step_times  # noqa: E402
from mpoe.config import MoEConfig  # noqa: E402
from mpoe.models.experts import resolve_expert_backends  # noqa: E402
from mpoe.models.moe_builder import build_moe_layer  # noqa: E402
from mpoe.parallel.expert_placement import ExpertPlacement  # noqa: E402

D_MODEL, D_FF, EXPERTS = 768, 3072, 8


def build_pair(seq_len: int, experts: int = EXPERTS):
    """(ours, HF's), HF's router and experts holding our layer's weights."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    torch.manual_seed(0)
    ours = build_moe_layer(
        MoEConfig(kind="switch", num_experts=experts, top_k=1, capacity_factor=None, z_loss_coef=0.0),
        D_MODEL,
        D_FF,
        "gelu_new",
        ExpertPlacement(),
        bias=False,
    )
    config = SwitchTransformersConfig(
        d_model=D_MODEL,
        d_ff=D_FF,
        num_experts=experts,
        expert_capacity=seq_len,
        dense_act_fn="gelu_new",
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        router_bias=False,
        router_dtype="float32",
    )
    hf = SwitchTransformersSparseMLP(config)
    with torch.no_grad():
        hf.router.classifier.weight.copy_(ours.router.gate.weight)
        for e in range(experts):
            hf.experts[f"expert_{e}"].wi.weight.copy_(ours.bank.w_in[e].t())
            hf.experts[f"expert_{e}"].wo.weight.copy_(ours.bank.w_out[e].t())
    return ours, hf


def run(quick: bool = False, repeats: int = 5, device: str = "cpu") -> dict:
    """device cuda: bf16, medians of CUDA-event timings after warm-up, key gpu.hf_switch.speedup."""
    batch, seq = (4, 256) if quick else (8, 512)
    ours, hf = build_pair(seq)
    if device != "cpu":
        return _run_gpu(ours, hf, batch, seq, repeats, torch.device(device))
    x = torch.randn(batch, seq, D_MODEL)
    with torch.no_grad():
        max_diff = float((ours(x) - hf(x)).abs().max())
    print(
        f"HF SwitchTransformersSparseMLP vs ours: {EXPERTS} experts, {D_MODEL}x{D_FF}, {batch}x{seq} tokens, "
        f"top-1, no drops; load average {os.getloadavg()[0]:.1f}; max |out diff| {max_diff:.1e}",
        flush=True,
    )
    times = step_times({"ours": (ours, x), "hf": (hf, x)}, repeats)
    t_ours, t_hf = times["ours"], times["hf"]
    print(f"fwd+bwd s: ours {t_ours:.3f}, HF {t_hf:.3f}; speedup {t_hf / t_ours:.2f}x")
    return {
        "results": {"hf_switch.speedup": t_hf / t_ours},
        "config": {"batch": batch, "seq": seq, "ours_s": t_ours, "hf_s": t_hf, "max_out_diff": max_diff},
    }


def _run_gpu(ours, hf, batch: int, seq: int, repeats: int, device: torch.device) -> dict:
    from bench.gpu import fwd_bwd_step, peer_stats

    ours, hf = ours.to(device, torch.bfloat16), hf.to(device, torch.bfloat16)
    print(resolve_expert_backends(ours), flush=True)  # moe.expert_impl=auto, now for the GPU
    x = torch.randn(batch, seq, D_MODEL, device=device, dtype=torch.bfloat16)
    g = torch.randn_like(x)
    modules = {"ours": ours, "hf": hf}
    times = peer_stats({name: fwd_bwd_step(m, x, g) for name, m in modules.items()}, device, repeats, modules=modules)
    for name, stats in times.items():
        if "error" in stats:
            raise RuntimeError(f"{name}: {stats['error']}")
    speedup = times["hf"]["ms"] / times["ours"]["ms"]
    print(
        f"{device} bf16 fwd+bwd ms: ours {times['ours']['ms']:.2f}, HF {times['hf']['ms']:.2f}; speedup {speedup:.2f}x"
    )
    return {"results": {"gpu.hf_switch.speedup": speedup}, "config": {"batch": batch, "seq": seq, **times}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=json_path, help="write the result here")
    ap.add_argument("--quick", action="store_true", help="4 x 256 tokens instead of 8 x 512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16)")
    args = ap.parse_args(argv)
    out = run(args.quick, args.repeats, args.device)
    write_json(args.json, out)
    return out["results"]


if __name__ == "__main__":
    main()
