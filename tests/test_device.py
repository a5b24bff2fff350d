"""What GPU runs depend on, checked on the CPU: float32 routing in a bf16 model, where collectives put their
tensors, which GPU a process takes, the MFU peak, SDPA attention, and a validation set that does not depend on
the number of processes."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from deepspeed.accelerator import real_accelerator
from transformers import GPT2LMHeadModel, T5ForConditionalGeneration

import bench.__main__ as runner
from mpoe.config import ConfigError, ModelConfig, MoEConfig
from mpoe.models import gpt2, t5
from mpoe.models.router import TopKRouter
from mpoe.parallel import process_groups
from mpoe.parallel.collectives import all_reduce_floats, comm_device
from mpoe.parallel.deepspeed import accelerator
from mpoe.parallel.local_world import spawn_world
from mpoe.parallel.process_groups import cuda_device_for_rank
from mpoe.train.data.sequences import eval_batches
from mpoe.train.metrics.flops import (
    Peak,
    datasheet_peak,
    device_peak,
    flops_per_token,
    gemm_flops_per_s,
    raised_to_cover,
)


def _bf16_router_and_tokens(n=8192, d=768, experts=8):
    g = torch.Generator().manual_seed(0)
    router = TopKRouter(MoEConfig(kind="switch", num_experts=experts), d)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(experts, d, generator=g) * 0.02)
    tokens = torch.randn(n, d, generator=g).to(torch.bfloat16)
    return router.to(torch.bfloat16), tokens


def test_router_logits_are_float32_math_on_the_bf16_values():
    router, tokens = _bf16_router_and_tokens()
    # The truth: float64 math on the very bf16 values the model holds, rounded to float32.
    truth = (tokens.double() @ router.gate.weight.double().t()).float()
    logits = router.gate_logits(tokens)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, truth, rtol=1e-5, atol=1e-6)
    # bf16 matmul logits (what the router computed before) are measurably further off the truth
    bf16 = F.linear(tokens, router.gate.weight).float()
    assert (bf16 - truth).abs().max() > 10 * (logits - truth).abs().max()


def test_router_logits_stay_float32_under_autocast():
    router, tokens = _bf16_router_and_tokens(n=256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router.gate_logits(tokens)
    truth = (tokens.double() @ router.gate.weight.double().t()).float()
    torch.testing.assert_close(logits, truth, rtol=1e-5, atol=1e-6)


def test_router_statistics_are_device_tensors_not_host_numbers():
    router, tokens = _bf16_router_and_tokens(n=64)
    out = router(tokens)
    assert isinstance(out.tokens_dropped, torch.Tensor) and isinstance(out.entropy, torch.Tensor)
    assert out.entropy.dtype == torch.float32 and 0 < out.entropy.item() <= torch.log(torch.tensor(8.0)).item()


def test_a_process_takes_the_gpu_of_its_local_rank():
    assert cuda_device_for_rank(0, 1) == 0
    assert cuda_device_for_rank(3, 8) == 3
    with pytest.raises(ConfigError, match="LOCAL_RANK=1 has no GPU.*1 CUDA device.*--nproc_per_node 1"):
        cuda_device_for_rank(1, 1)
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs CUDA devices.*parallel.backend=gloo"):
        cuda_device_for_rank(0, 0)


class _Accelerator:
    """What `accelerator` reads of DeepSpeed's chosen accelerator."""

    def __init__(self, name: str):
        self.name = name

    def device_name(self, device_index=None):
        return self.name


@pytest.fixture
def machine(monkeypatch):
    """A machine: whether torch sees CUDA, DS_ACCELERATOR, and the accelerator DeepSpeed chose (None: not yet)."""

    def setup(cuda: bool, ds_env=None, chosen=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        if ds_env is None:
            monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        else:
            monkeypatch.setenv("DS_ACCELERATOR", ds_env)
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None if chosen is None else _Accelerator(chosen))
        monkeypatch.setattr(accelerator, "keep_freed_cpu_memory", lambda: True)

    return setup


@pytest.mark.parametrize(
    "cuda, ds_env, chosen, backend",
    [
        (True, "cpu", None, "gloo"),  # the CLI tests on a GPU machine: DeepSpeed on the CPU, so gloo
        (True, None, None, "nccl"),  # DeepSpeed will pick CUDA by itself
        (True, "cuda", None, "nccl"),
        (False, None, None, "gloo"),
        (False, "cpu", None, "gloo"),
        (True, "cuda", "cpu", "gloo"),  # DeepSpeed already runs on the CPU: that is where the model goes
        (True, "cpu", "cuda", "nccl"),
    ],
)
def test_the_backend_follows_deepspeeds_accelerator(machine, cuda, ds_env, chosen, backend):
    machine(cuda, ds_env, chosen)
    assert process_groups.default_backend() == backend
    assert accelerator.accelerator_name() == ("cuda" if backend == "nccl" else "cpu")


def test_configure_accelerator_makes_deepspeed_use_the_device_asked_for(machine):
    machine(cuda=True)
    accelerator.configure_accelerator()  # a GPU machine, nothing asked: DeepSpeed's own choice, CUDA
    assert "DS_ACCELERATOR" not in os.environ and process_groups.default_backend() == "nccl"
    accelerator.configure_accelerator("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu" and process_groups.default_backend() == "gloo"
    machine(cuda=False)
    accelerator.configure_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    machine(cuda=True, ds_env="cpu", chosen="cuda")
    with pytest.raises(RuntimeError, match="already runs on its cuda accelerator.*DS_ACCELERATOR=cpu"):
        accelerator.configure_accelerator("cpu")
    accelerator.configure_accelerator("cuda")  # what it already runs on: fine


def test_nccl_asked_for_with_deepspeed_on_the_cpu_is_one_line(machine):
    machine(cuda=True, ds_env="cpu")
    assert process_groups.resolve_backend(None) == "gloo" and process_groups.resolve_backend("gloo") == "gloo"
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs DeepSpeed's CUDA accelerator.*gloo"):
        process_groups.resolve_backend("nccl")
    machine(cuda=True, ds_env="cuda")
    assert process_groups.resolve_backend("nccl") == "nccl" and process_groups.resolve_backend(None) == "nccl"


def _collective_devices(rank: int, out_dir: str) -> None:
    torch.save({"device": str(comm_device()), "sum": all_reduce_floats([rank, 1.0])}, f"{out_dir}/{rank}.pt")


@pytest.mark.slow
def test_gloo_collectives_take_cpu_tensors(tmp_path):
    spawn_world(_collective_devices, 2, str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got == {"device": "cpu", "sum": [1.0, 2.0]}


def test_mfu_peak_comes_from_the_datasheet_for_known_gpus():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert datasheet_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert datasheet_peak("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert datasheet_peak("NVIDIA H200 NVL", "bf16") == pytest.approx(835.5e12)  # not the SXM part's
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert datasheet_peak("Tesla V100-SXM2-16GB", "bf16") is None  # V100 has no bf16 tensor cores
    assert datasheet_peak("Some Future GPU", "bf16") is None


def test_cpu_peak_is_measured_and_says_so():
    peak = device_peak("fp32", torch.device("cpu"))
    assert peak.flops_per_s > 1e8 and peak.source.startswith("measured: cpu fp32")


def test_the_gemm_probe_tries_growing_sizes_until_one_call_would_exceed_its_budget(monkeypatch):
    """bf16 on a CPU without bf16 units runs ~1 GFLOP/s: the probe must not spend seconds on 1024^3 calls there."""
    sizes = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: sizes.append(a.shape[0]) or real(a, b))
    assert gemm_flops_per_s(1024, torch.float32, "cpu", repeats=1, call_budget_s=0.0) > 0
    assert set(sizes) == {128}
    sizes.clear()
    gemm_flops_per_s(1024, torch.float32, "cpu", repeats=1, call_budget_s=1e9)
    assert sorted(set(sizes)) == [128, 256, 512, 1024]


def test_a_measured_peak_below_an_achieved_rate_is_measured_again():
    """A probe taken while other processes held the cores reads low; a later interval beating it re-probes."""
    true = device_peak("fp32", torch.device("cpu"))
    busy = dataclasses.replace(true, flops_per_s=1.0)  # as if the first probe had been starved
    assert raised_to_cover(busy, 0.5) is busy  # below the peak: no probe
    raised = raised_to_cover(busy, 2.0)
    assert raised.flops_per_s > 1e8 and raised.source == busy.source
    listed = Peak(989.4e12, "datasheet: NVIDIA H100 bf16")
    assert raised_to_cover(listed, 2e15) is listed  # a datasheet peak is the device's, whatever a step measured


@pytest.mark.parametrize("n, world, micro", [(64, 1, 8), (64, 2, 8), (64, 3, 8), (20, 4, 8), (3, 4, 2), (10, 2, 4)])
def test_the_validation_set_is_the_same_sequences_whatever_the_world(n, world, micro):
    sequences = torch.arange(100).view(100, 1)
    shards = [eval_batches(sequences, micro, n, world, rank) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1, "every rank runs as many forwards (expert parallelism)"
    counted = sorted(int(i) for shard in shards for batch, count in shard for i in batch[:count, 0])
    assert counted == list(range(n))
    assert all(len(batch) <= micro for shard in shards for batch, _ in shard)


def test_a_validation_split_smaller_than_a_batch_is_evaluated_not_skipped():
    sequences = torch.arange(3).view(3, 1)
    ((batch, count),) = eval_batches(sequences, 8, 64, 1, 0)
    assert count == 3 and batch[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_sdpa_attention_gives_the_eager_results(family):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = ModelConfig(d_model=64, d_ff=128, num_layers=2, num_heads=4, vocab_size=100)
        config = gpt2.FAMILY.hf_config(cfg, 100, 0, 0)
        model_cls = GPT2LMHeadModel
    else:
        cfg = ModelConfig(
            family="t5", d_model=64, d_ff=128, num_layers=2, num_heads=4, vocab_size=100, activation="relu"
        )
        config = t5.FAMILY.hf_config(cfg, 200, 0, 0)
        model_cls = T5ForConditionalGeneration
    assert config._attn_implementation == "sdpa"
    sdpa = model_cls(config).eval()
    eager = model_cls(config.__class__(**{**config.to_dict(), "attn_implementation": "eager"})).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config._attn_implementation == "eager"
    ids = torch.randint(0, 100, (2, 16))
    kwargs = {"input_ids": ids} if family == "gpt2" else {"input_ids": ids, "labels": ids[:, :8].contiguous()}
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**kwargs).logits, eager(**kwargs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_gpu_train_step_row_runs_through_on_the_cpu():
    """`python -m bench.train_step --device cuda`'s code path, small and on the CPU, so GPU minutes go to numbers.

    In its own process with DS_ACCELERATOR=cpu: on a GPU machine DeepSpeed in this pytest process runs on CUDA,
    and cannot be moved to the CPU once chosen."""
    code = (
        "import json; from bench.train_step import run_device; "
        "print(json.dumps(run_device('cpu', layers=2, seq=32, batch=2, repeats=1, precision='fp32', vocab=512))); "
        # --compile's rows (aot_eager: inductor's kernels would take minutes to generate on this CPU)
        "print(json.dumps(run_device('cpu', kinds=('dense',), layers=1, seq=16, batch=1, repeats=1, "
        "precision='fp32', vocab=512, compile='aot_eager')))"
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, compiled = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    results = out["results"]
    for key in ("train_step.gpu_mfu_dense", "train_step.gpu_switch_vs_dense", "train_step.gpu_mpoe_vs_switch"):
        assert results[key] > 0, key
    assert out["config"]["peak_source"].startswith("measured: cpu fp32")
    for key in ("gpu_mfu_dense", "gpu_compiled_mfu_dense", "gpu_compile_speedup_dense"):
        assert compiled["results"][f"train_step.{key}"] > 0, key
    assert out["config"]["device"] == compiled["config"]["device"] == "cpu"
    assert compiled["config"]["compile_failed"] == {}


def test_the_cpu_benchmarks_on_a_gpu_machine_run_deepspeed_on_the_cpu(machine, monkeypatch, tmp_path):
    """`python -m bench` (the CPU tables) on a GPU machine: DeepSpeed would pick CUDA at its first import, and the
    CPU train_step, which needs its CPU accelerator, could not start."""
    machine(cuda=True)
    seen = []
    monkeypatch.setattr(
        runner, "run_bench", lambda name, quick, device: seen.append(accelerator.accelerator_name()) or {}
    )
    runner.main(["--only", "train_step", "--json", str(tmp_path / "out.json")])
    assert seen == ["cpu"]


def test_model_flops_count_the_lm_head_once_tied_or_not():
    """An untied head is among the active parameters and is the head's matmul: counted once, as a tied one."""
    vocab, d, blocks = 10, 5, 1000
    tied = flops_per_token(blocks + vocab * d, vocab * d, vocab, d, attention_layers=0, seq_len=1)
    untied = flops_per_token(blocks + 2 * vocab * d, vocab * d, vocab, d, 0, 1, params_lm_head=vocab * d)
    assert tied == untied == 6 * (blocks + vocab * d)
