"""`mpoe-train` end to end, as a user runs it: one process, and data parallel over 2 real processes."""

import json

import pytest
from _cli import metrics, summary, train

pytestmark = pytest.mark.slow


def test_default_job_writes_the_run_directory(tmp_path, mpoe_cache):
    run = tmp_path / "run"
    train(run, mpoe_cache, "moe=mpoe", "logging.wandb.mode=offline")  # the default's mode
    assert (run / ".hydra" / "config.yaml").is_file()
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "step",
        "loss",
        "lm_loss",
        "aux_loss",
        "z_loss",
        "lr",
        "tokens_per_s",
        "grad_norm",
        "expert_load",
        "tokens_dropped",
        "load_imbalance",
        "router_entropy",
        "mfu",
        "steps_skipped",
        "grad_norm_central",
        "grad_norm_auxiliary",
        "grad_norm_router",
    ):
        assert key in rows[-1], key
    last = rows[-1]
    assert len(last["expert_load"]) == 2 and abs(sum(last["expert_load"][0]) - 1) < 1e-6
    assert last["load_imbalance"][0] == pytest.approx(max(last["expert_load"][0]) * 4)
    assert all(0 < h <= __import__("math").log(4) + 1e-6 for h in last["router_entropy"])
    assert all(0 < r["mfu"] <= 1 for r in rows), [r["mfu"] for r in rows]
    s = summary(run)
    for key in (
        "params_total",
        "params_active",
        "params_embedding",
        "params_expert",
        "params_central",
        "params_auxiliary",
        "val_loss",
        "val_ppl",
        "tokens_seen",
        "wall_s",
    ):
        assert key in s, key
    assert s["tokens_seen"] == 4 * 8 * 64
    assert s["mfu_peak_source"].startswith("measured: cpu fp32 GEMM") and s["mfu_peak_tflops"] > 0
    assert s["val_tokens"] == 2 * 8 * 63 == rows[-1]["val_tokens"]  # eval_batches x micro-batch sequences, 63 targets
    assert s["params_central"] > 0 and s["params_active"] < s["params_total"]
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and (run / "checkpoints" / "step_00000004" / "rank_00000.pt").is_file()
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run"


def test_data_parallel_and_accumulation_match_one_process_and_the_checkpoint_evaluates_anywhere(tmp_path, mpoe_cache):
    """Global batch 8: 2 ranks x 4 sequences and 1 rank accumulating 2 x 4 must give the losses of 1 rank x 8
    sequences. The 2-process checkpoint then evaluates to the same val_loss on 1 process with the same config:
    the validation set is a fixed set of sequences, sharded over whatever ranks exist. (One test, so that the
    runs are shared: each costs seconds of imports.)

    The load-balance loss is computed from each rank's own tokens (Megatron's default), a
    nonlinear function of the batch, so it is switched off here to compare the data-parallel
    mechanics alone; the z-loss, a mean over tokens, stays on.
    """
    one, accum, two, evaluated = (tmp_path / name for name in ("one", "accum", "two", "evaluated"))
    common = [
        "moe=switch",
        "moe.aux_loss_coef=0",
        "trainer.global_batch_size=8",
        "logging.wandb.mode=disabled",
        "trainer.eval_sequences=16",
    ]
    train(one, mpoe_cache, *common, "trainer.micro_batch_size=8")
    train(accum, mpoe_cache, *common, "trainer.micro_batch_size=4")
    train(two, mpoe_cache, *common, "trainer.micro_batch_size=4", nproc=2)
    losses = {run: [r["loss"] for r in metrics(run)] for run in (one, accum, two)}
    assert losses[two] == pytest.approx(losses[one], rel=1e-5)
    assert losses[accum] == pytest.approx(losses[one], rel=1e-5)
    assert summary(one)["val_loss"] == pytest.approx(summary(two)["val_loss"], rel=1e-5)
    assert summary(two)["world_size"] == 2
    assert (
        not list(tmp_path.glob("two/outputs")) and (two / "checkpoints" / "step_00000004" / "rank_00001.pt").is_file()
    )

    resume = f"trainer.resume={two / 'checkpoints' / 'step_00000004'}"
    train(evaluated, mpoe_cache, *common, "trainer.micro_batch_size=4", resume)
    assert summary(evaluated)["val_loss"] == pytest.approx(summary(two)["val_loss"], rel=1e-5)
    assert summary(evaluated)["val_tokens"] == summary(two)["val_tokens"] == 16 * 63


def test_expert_parallel_training_logs_the_losses_of_ep1(tmp_path, mpoe_cache):
    """Same 2 processes, same seed and tokens: experts split over ranks (all-to-all, at ZeRO 2) or replicated
    (ZeRO 0). The gradient norms per role come from param.grad at ZeRO 0 and from each rank's gradient
    partition at ZeRO 2: the same numbers."""
    runs = {}
    for ep in (1, 2):
        runs[ep] = tmp_path / f"ep{ep}"
        train(
            runs[ep],
            mpoe_cache,
            "moe=mpoe",
            f"parallel.ep_size={ep}",
            f"parallel.zero_stage={0 if ep == 1 else 2}",
            "trainer.global_batch_size=8",
            "trainer.micro_batch_size=4",
            "logging.wandb.mode=disabled",
            nproc=2,
        )
    a, b = metrics(runs[1]), metrics(runs[2])
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    # the aux loss is ~0.02: fp32 reduction order (all-to-all vs local) leaves ~3e-7 after a few updates
    assert [r["aux_loss"] for r in a] == pytest.approx([r["aux_loss"] for r in b], rel=1e-5, abs=1e-6)
    for role in ("central", "auxiliary", "router"):
        key = f"grad_norm_{role}"
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5), key


def test_dry_run_writes_counts_and_trains_nothing(tmp_path, mpoe_cache):
    run = tmp_path / "dry"
    proc = train(run, mpoe_cache, "moe=mpoe", "trainer.dry_run=true")
    s = summary(run)
    assert s["dry_run"] is True and s["params_total"] > 0 and "val_loss" not in s
    assert "params_central" in proc.stdout
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("precision", ["fp16"])  # bf16 runs end to end in test_reshard's bf16 test
def test_low_precision_runs_on_cpu(tmp_path, mpoe_cache, precision):
    """The GPU precisions are config choices that must not break the CPU path.

    DeepSpeed's CPU accelerator runs fp16 only where oneDNN has fp16 kernels (AVX512-FP16/AMX
    CPUs); elsewhere the run must stop with one line naming the fix, and write no run directory."""
    from deepspeed.accelerator import get_accelerator

    run = tmp_path / precision
    overrides = ("moe=mpoe", f"trainer.precision={precision}", "trainer.max_steps=2", "logging.wandb.mode=disabled")
    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        proc = train(run, mpoe_cache, *overrides, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if "error" in line]
        assert error == [
            "mpoe-train: error: trainer.precision=fp16 is not supported by DeepSpeed's cpu accelerator "
            "on this machine: use trainer.precision=bf16 or fp32"
        ], proc.stderr[-2000:]
        assert not run.exists()
        return
    train(run, mpoe_cache, *overrides)
    losses = [r["loss"] for r in metrics(run)]
    assert len(losses) == 2 and all(7 < x < 9 for x in losses)  # ~ln(4096) = 8.3 at init


def test_warmup_starts_at_zero_for_one_step_then_climbs_linearly(tmp_path, mpoe_cache):
    """Update k runs at lr * (k - 1) / warmup_steps during warmup (warmup_steps capped at max_steps): only
    the first update has lr 0, so two steps already move the model away from its initial validation loss
    (DeepSpeed's WarmupCosineLR alone gave lr 0 to the first two updates, and the log showed the next lr)."""
    common = ["optim.lr=1e-3", "optim.warmup_steps=3", "trainer.eval_every=2"]
    train(tmp_path / "zero", mpoe_cache, *common, "trainer.max_steps=0")
    train(tmp_path / "three", mpoe_cache, *common, "trainer.max_steps=3")
    rows = metrics(tmp_path / "three")
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3], abs=1e-12)
    after_two = next(r["val_loss"] for r in rows if r["step"] == 2)
    assert after_two != summary(tmp_path / "zero")["val_loss"]
