"""`mpoe-train` on one CUDA GPU, as a user runs it (`pytest -m gpu`; skipped without CUDA).

Each test is a real run in a subprocess with DeepSpeed's CUDA accelerator and NCCL.
"""

import math
import os

import pytest
import torch
from _cli import metrics, summary, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gpu_env(cache: str, cpu_only: bool = False) -> dict:
    env = dict(os.environ, MPOE_CACHE=cache, WANDB_MODE="disabled", WANDB_SILENT="true")
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed picks CUDA by itself
    if cpu_only:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def run(run_dir, cache, *overrides, cpu_only=False, nproc=1, check=True, fast=True):
    return train(
        run_dir,
        cache,
        *overrides,
        "logging.progress=false",
        nproc=nproc,
        timeout=900,
        check=check,
        fast=fast,
        environment=gpu_env(cache, cpu_only),
    )


def _mfu_is_possible(run_dir):
    assert all(0 < r["mfu"] <= 1 for r in metrics(run_dir)), [r["mfu"] for r in metrics(run_dir)]
    assert summary(run_dir)["mfu_peak_source"]


def test_default_job(tmp_path, mpoe_cache):
    run(tmp_path / "run", mpoe_cache, fast=False)
    s = summary(tmp_path / "run")
    assert s["steps"] == 500 and math.isfinite(s["val_loss"]) and s["val_tokens"] > 0
    _mfu_is_possible(tmp_path / "run")


STEPS = 30


def _bf16_steps(model: str, moe: str) -> tuple:
    """STEPS bf16 steps of 16 x 128 tokens, evaluated at the end."""
    return (
        f"model={model}",
        f"moe={moe}",
        "trainer.precision=bf16",
        f"trainer.max_steps={STEPS}",
        f"trainer.eval_every={STEPS}",
        "trainer.micro_batch_size=16",
        "trainer.seq_len=128",
        "optim.lr=3e-4",
    )


def _loss_falls(run_dir) -> list[float]:
    losses = [r["loss"] for r in metrics(run_dir)]
    assert len(losses) == STEPS and all(map(math.isfinite, losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    _mfu_is_possible(run_dir)
    return losses


@pytest.mark.parametrize("model", ["gpt2_small", "t5_small"])
@pytest.mark.parametrize("moe", ["dense", "switch", "mpoe"])
def test_published_shapes_train_in_bf16(tmp_path, mpoe_cache, model, moe):
    run(tmp_path / "run", mpoe_cache, *_bf16_steps(model, moe))
    _loss_falls(tmp_path / "run")


def test_a_gpu_checkpoint_evaluates_on_the_cpu_and_back(tmp_path, mpoe_cache):
    gpu, on_cpu, cpu, on_gpu = (tmp_path / n for n in ("gpu", "on_cpu", "cpu", "on_gpu"))
    common = ("moe=mpoe", "trainer.precision=fp32")
    run(gpu, mpoe_cache, *common)
    run(on_cpu, mpoe_cache, *common, f"trainer.resume={gpu / 'checkpoints' / 'step_00000004'}", cpu_only=True)
    assert summary(on_cpu)["val_loss"] == pytest.approx(summary(gpu)["val_loss"], rel=1e-5)
    run(cpu, mpoe_cache, *common, cpu_only=True)
    run(on_gpu, mpoe_cache, *common, f"trainer.resume={cpu / 'checkpoints' / 'step_00000004'}")
    assert summary(on_gpu)["val_loss"] == pytest.approx(summary(cpu)["val_loss"], rel=1e-5)


def test_resume_on_the_gpu_continues_the_loss_curve(tmp_path, mpoe_cache):
    """fp32; CUDA kernels may choose other reduction orders between processes, so 1e-5, not bitwise."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("moe=mpoe", "moe.jitter_eps=0.01", "trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=6")
    run(full, mpoe_cache, *common)
    run(resumed, mpoe_cache, *common, f"trainer.resume={full / 'checkpoints' / 'step_00000003'}")
    want = {r["step"]: r["loss"] for r in metrics(full)}
    got = {r["step"]: r["loss"] for r in metrics(resumed)}
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-5)
    print("bitwise equal:", [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)])


def test_a_checkpoint_resumes_on_the_gpu_at_another_zero_stage(tmp_path, mpoe_cache):
    """Resharding writes Adam's state itself (`optimizer_state.adam_view`): on CUDA torch's fused AdamW must find its
    step on the GPU. bf16 ZeRO 1 (DeepSpeed's BF16_Optimizer) -> ZeRO 2 continues the loss curve; fp32 ZeRO 0 ->
    bf16."""
    common = ("moe=mpoe", "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=4")
    zero1, zero2, fp32, to_bf16 = (tmp_path / n for n in ("zero1", "zero2", "fp32", "to_bf16"))
    step = "checkpoints/step_00000002"
    run(zero1, mpoe_cache, *common, "trainer.precision=bf16", "parallel.zero_stage=1")
    run(zero2, mpoe_cache, *common, "trainer.precision=bf16", "parallel.zero_stage=2", f"trainer.resume={zero1 / step}")
    want = {r["step"]: r["loss"] for r in metrics(zero1)}
    got = {r["step"]: r["loss"] for r in metrics(zero2)}
    assert sorted(got) == [3, 4] and [got[3], got[4]] == pytest.approx([want[3], want[4]], rel=1e-2)
    run(fp32, mpoe_cache, *common, "trainer.precision=fp32")
    run(to_bf16, mpoe_cache, *common, "trainer.precision=bf16", f"trainer.resume={fp32 / step}")
    rows = metrics(to_bf16)
    assert [r["step"] for r in rows] == [3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] == pytest.approx({r["step"]: r["loss"] for r in metrics(fp32)}[4], rel=5e-2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("moe", ["switch", "mpoe"])
def test_low_precision_on_one_gpu_at_ep1(tmp_path, mpoe_cache, precision, moe):
    run(
        tmp_path / "run",
        mpoe_cache,
        f"moe={moe}",
        f"trainer.precision={precision}",
        "parallel.ep_size=1",
        "trainer.max_steps=8",
        "trainer.eval_every=8",
    )
    rows = metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in rows) and math.isfinite(summary(tmp_path / "run")["val_loss"])


def test_two_nccl_processes_take_one_gpu_each(tmp_path, mpoe_cache):
    """With 2+ GPUs, expert parallelism over NCCL trains; with one, the second process is refused in one line
    before any process group starts (it would otherwise share GPU 0 with the first)."""
    proc = run(
        tmp_path / "run",
        mpoe_cache,
        "moe=switch",
        "parallel.ep_size=2",
        "trainer.global_batch_size=16",
        nproc=2,
        check=False,
    )
    if torch.cuda.device_count() >= 2:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(metrics(tmp_path / "run")) == 4
    else:
        assert proc.returncode != 0
        assert "LOCAL_RANK=1 has no GPU: this node has 1 CUDA device(s)" in proc.stderr


def test_compiled_blocks_train_in_bf16(tmp_path, mpoe_cache):
    """`trainer.compile` with inductor on the GPU path (grouped MPOE experts, sync-free dispatch): the run that
    `python -m bench.train_step --device cuda --compile` times. Its losses follow the eager run's: the same data,
    init and routing, with bf16 rounding that fused kernels change."""
    run(tmp_path / "eager", mpoe_cache, *_bf16_steps("gpt2_small", "mpoe"))
    run(tmp_path / "compiled", mpoe_cache, *_bf16_steps("gpt2_small", "mpoe"), "trainer.compile=true")
    eager = [r["loss"] for r in metrics(tmp_path / "eager")]
    losses = _loss_falls(tmp_path / "compiled")
    assert losses[0] == pytest.approx(eager[0], rel=1e-2)  # the same model and batch, before any update
    assert sum(losses[-5:]) == pytest.approx(sum(eager[-5:]), rel=0.05), (losses, eager)
