"""The benchmarks run end to end at toy sizes (their numbers are only meaningful at full size)."""

import pytest

from bench import experts, moe_layer


def test_experts_bench_reports_its_ratios(tmp_path):
    results = experts.main(["--tokens", "64", "--repeats", "1", "--json", str(tmp_path / "e.json")])
    assert set(results) == {
        "experts.mpoe_vs_switch_time",
        "experts.mpoe_vs_switch_params",
        "experts.switch_vs_deepspeed_time",
        "experts.mpoe_vs_switch_time_quarter_tokens",
    }
    assert results["experts.mpoe_vs_switch_params"] < 0.25  # bond 16: a fact of the shapes, not of timing
    assert (tmp_path / "e.json").exists()


@pytest.mark.slow
def test_moe_layer_bench_sends_exactly_the_routed_tokens_over_a_real_all_to_all():
    """ep 2 on 2 gloo processes: the bytes handed to all_to_all_single equal the routed rows.

    Out and back, forward and backward."""
    results = moe_layer.main(["--tokens", "256", "--repeats", "1", "--ep", "1", "2"])
    assert results["dispatch.bytes_vs_routed"] == pytest.approx(1.0, abs=1e-9)
    for key in (
        "moe_layer.vs_floor",
        "moe_layer.vs_floor_ep1",
        "moe_layer.vs_floor_ep2",
        "moe_layer.speedup_vs_deepspeed",
        "moe_layer.speedup_vs_deepspeed_skewed",
        "moe_layer.bank_vs_floor_at_worst",
    ):
        assert results[key] > 0


@pytest.mark.slow
def test_gpu_tables_dry_run_on_the_cpu(tmp_path):
    """The --device cuda code paths, run on the CPU at 1/32 (experts) and 1/64 (layer) of the sizes, in float32:
    they reach the end and report their keys, so GPU minutes are not spent on typos."""
    layer = moe_layer.main(["--gpu-scale", "64", "--repeats", "1", "--json", str(tmp_path / "m.json")])
    assert set(layer) == {
        "gpu.moe_layer.vs_floor",
        "gpu.moe_layer.vs_grouped_ref",
        "gpu.moe_layer.speedup_vs_deepspeed",
    }
    assert all(v is None or v > 0 for v in layer.values())
    banks = experts.main(["--gpu-scale", "32", "--repeats", "1"])
    assert set(banks) == {"gpu.experts.mpoe_vs_switch_time"} and banks["gpu.experts.mpoe_vs_switch_time"] > 0


def test_grouped_reference_moe_equals_our_layer():
    """The bench's 30-line reference computes what our dropless layer computes (same gate and weights)."""
    import torch

    from bench.gpu import GroupedRefMoE
    from mpoe.config import MoEConfig
    from mpoe.models.experts import activation_fn
    from mpoe.models.moe_layer import build_moe_layer
    from mpoe.parallel.groups import ExpertGroups

    torch.manual_seed(0)
    for top_k in (1, 2):
        cfg = MoEConfig(kind="switch", num_experts=4, top_k=top_k, expert_impl="grouped")
        ours = build_moe_layer(cfg, 16, 32, "gelu_new", ExpertGroups(), bias=False)
        b = ours.bank
        ref = GroupedRefMoE(ours.router.gate.weight, b.w_in, b.w_out, top_k, activation_fn("gelu_new"))
        x = torch.randn(40, 16)
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)
