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
