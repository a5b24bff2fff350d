"""The benchmarks run end to end at toy sizes (their numbers are only meaningful at full size)."""

import json

import pytest
import torch

from bench import experts, lm_loss, moe_layer


def test_experts_bench_reports_its_ratios(tmp_path):
    """--json's folders are made (issue 31: a benchmark's results were lost at its end for want of one)."""
    results = experts.main(["--tokens", "64", "--repeats", "1", "--json", str(tmp_path / "new" / "e.json")])
    assert set(results) == {
        "experts.mpoe_vs_switch_time",
        "experts.mpoe_vs_switch_params",
        "experts.switch_vs_deepspeed_time",
        "experts.mpoe_vs_switch_time_quarter_tokens",
    }
    assert results["experts.mpoe_vs_switch_params"] < 0.25  # bond 16: a fact of the shapes, not of timing
    assert json.loads((tmp_path / "new" / "e.json").read_text())["results"] == results


def test_an_unwritable_json_path_stops_before_the_benchmark_runs(tmp_path, capsys, monkeypatch):
    """Issue 31: in one line, before the benchmark's minutes are spent."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ran = []
    monkeypatch.setattr(experts, "interleaved_times", lambda *a, **k: ran.append(1))  # what times the banks
    with pytest.raises(SystemExit) as stop:
        experts.main(["--tokens", "64", "--repeats", "1", "--json", str(blocker / "e.json")])
    assert stop.value.code == 2 and not ran
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"bench: error: --json {blocker / 'e.json'}: cannot write there")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]  # nothing else written


@pytest.mark.slow
def test_lm_loss_bench_reports_its_ratios(tmp_path):
    """Both ways at toy size on the CPU (peak memory from fresh processes), and the CUDA rows' code dry-run here."""
    cpu = lm_loss.main(["--tokens", "64", "--repeats", "1", "--json", str(tmp_path / "l.json")])
    assert set(cpu) == {"lm_loss.chunked_vs_hf_time", "lm_loss.chunked_vs_hf_peak_memory"}
    assert all(v > 0 for v in cpu.values()) and (tmp_path / "l.json").exists()
    gpu = lm_loss.main(["--tokens", "64", "--repeats", "1", "--gpu-path"])
    assert gpu["gpu.lm_loss.chunked_vs_hf_time"] > 0 and gpu["gpu.lm_loss.chunked_vs_hf_peak_memory"] is None


@pytest.mark.slow
def test_moe_layer_bench_sends_exactly_the_routed_tokens_over_a_real_all_to_all():
    """ep 2 on 2 gloo processes: the bytes handed to all_to_all_single equal the routed rows.

    Out and back, forward and backward."""
    results = moe_layer.main(["--tokens", "256", "--experts", "8", "--repeats", "1", "--ep", "1", "2"])
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
    assert set(banks) == {
        "gpu.experts.mpoe_vs_switch_time",
        "gpu.experts.mpoe_recompute_vs_switch_time",
        "gpu.experts.mpoe_recompute_vs_mpoe_peak",
    }
    assert banks["gpu.experts.mpoe_vs_switch_time"] > 0 and banks["gpu.experts.mpoe_recompute_vs_switch_time"] > 0
    assert banks["gpu.experts.mpoe_recompute_vs_mpoe_peak"] is None  # peak memory is measured on CUDA only


def test_grouped_reference_moe_equals_our_layer():
    """The bench's 30-line reference computes what our dropless layer computes (same gate and weights)."""
    import torch

    from bench.gpu import GroupedRefMoE
    from mpoe.config import MoEConfig
    from mpoe.models.experts import activation_fn
    from mpoe.models.moe_builder import build_moe_layer
    from mpoe.parallel.expert_placement import ExpertPlacement

    torch.manual_seed(0)
    for top_k in (1, 2):
        cfg = MoEConfig(kind="switch", num_experts=4, top_k=top_k, expert_impl="grouped")
        ours = build_moe_layer(cfg, 16, 32, "gelu_new", ExpertPlacement(), bias=False)
        b = ours.bank
        ref = GroupedRefMoE(ours.router.gate.weight, b.w_in, b.w_out, top_k, activation_fn("gelu_new"))
        x = torch.randn(40, 16)
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_train_step_rows_refuse_a_device_deepspeed_does_not_run_on(monkeypatch, device):
    """DeepSpeed puts the model on the accelerator it chose at import: a row asked for another device says so in
    one line before building anything (before: the CPU row on a GPU machine crashed on CPU batches, CUDA model)."""
    from deepspeed.accelerator import real_accelerator

    from bench import train_step

    other = "cuda" if device == "cpu" else "cpu"

    class Chosen:
        def device_name(self, device_index=None):
            return other

    monkeypatch.setattr(real_accelerator, "ds_accelerator", Chosen())
    match = f"device {device} asked for, but DeepSpeed already runs on its {other} accelerator.*DS_ACCELERATOR={device}"
    with pytest.raises(RuntimeError, match=match):
        train_step.run_device(device, kinds=("dense",), layers=2, seq=8, batch=1, repeats=1)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=match):
            train_step.measure(train_step.make_config("switch", 2, 8, 1), repeats=1)


def _reference_and_input(device, dtype=torch.float32, top_k=2):
    from bench.gpu import GroupedRefMoE
    from mpoe.models.experts import activation_fn

    g = torch.Generator().manual_seed(0)
    E, d, f = 4, 16, 32
    ref = GroupedRefMoE(
        torch.randn(E, d, generator=g),
        torch.randn(E, d, f, generator=g) * 0.3,
        torch.randn(E, f, d, generator=g) * 0.3,
        top_k,
        activation_fn("gelu_new"),
    ).to(device, dtype)
    return ref, torch.randn(64, d, generator=g).to(device, dtype)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped_mm")
def test_grouped_reference_counts_without_bincount(monkeypatch):
    """bincount reads its max to the host on CUDA (a sync the reference must not have). Truth: each token's
    top-2 experts applied one token at a time with their normalised gate weights."""
    ref, x = _reference_and_input("cpu")
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("torch.bincount syncs on CUDA"))
    out = ref(x)
    probs = torch.softmax(x @ ref.gate.t(), -1)
    w, e = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    act = ref.act
    want = sum(
        w[:, j : j + 1] * (act(x.unsqueeze(1) @ ref.w_in[e[:, j]]) @ ref.w_out[e[:, j]]).squeeze(1) for j in range(2)
    )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_reference_runs_without_host_sync_on_the_gpu():
    ref, x = _reference_and_input("cuda", torch.bfloat16)
    x.requires_grad_()
    ref(x).float().pow(2).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ref(x).float().pow(2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_peers_take_turns_and_a_failing_one_leaves_the_others_measured():
    """The GPU tables time their peers in rotating turns, and a peer that fails (an OOM) costs only its column."""
    from bench.gpu import peer_stats

    calls = []

    def peer(name, fails_at=None):
        def step():
            calls.append(name)
            if calls.count(name) == fails_at:
                raise MemoryError("CUDA out of memory (a stand-in)")

        return step

    steps = {"a": peer("a"), "b": peer("b"), "c": peer("c", fails_at=4), "d": peer("d", fails_at=1)}
    stats = peer_stats(steps, torch.device("cpu"), repeats=4, warmup=1)
    assert calls[:4] == ["a", "b", "c", "d"]  # warm-up; d fails there
    assert calls[4:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b"]  # c fails in round 3
    assert stats["c"] == stats["d"] == {"error": "MemoryError: CUDA out of memory (a stand-in)"}
    assert stats["a"]["ms"] >= 0 and stats["b"]["ms"] >= 0 and stats["a"]["peak_mb"] is None
