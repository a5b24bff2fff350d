"""Checkpoints survive faults and resume exactly (CPU, fp32): the loss curve of a run that was
killed and resumed equals the uninterrupted run's, step for step."""

import json
import os

import pytest
from _cli import metrics, summary, train

pytestmark = pytest.mark.slow

COMMON = [
    "moe=mpoe",
    "trainer.max_steps=6",
    "trainer.save_every=2",
    "trainer.keep_last=5",
    "trainer.eval_every=3",
    "logging.wandb.mode=disabled",
    "moe.grad_mask.enabled=true",
    "moe.jitter_eps=0.01",
]


def _by_step(rows):
    return {r["step"]: r for r in rows}  # a resumed run appends; the last row of a step wins


def _killed(run, cache, *overrides, **fault):
    os.environ.update(fault)
    try:
        proc = train(run, cache, *COMMON, *overrides, check=False)
    finally:
        for key in fault:
            os.environ.pop(key)
    assert proc.returncode != 0, "the fault did not fire"


@pytest.fixture(scope="module")
def whole(tmp_path_factory, mpoe_cache):
    """The uninterrupted run of COMMON, which the runs killed and resumed are compared with."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(run, mpoe_cache, *COMMON)
    return run


def _step_seconds(rows: dict, step: int) -> float:
    """How long `step` took, from its own log row (log_every=1): its tokens over its tokens per second."""
    tokens = rows[step]["tokens_seen"] - (rows[step - 1]["tokens_seen"] if step > 1 else 0)
    return tokens / rows[step]["tokens_per_s"]


def test_killed_run_resumes_the_exact_loss_curve_and_a_finished_run_only_evaluates(tmp_path, mpoe_cache, whole):
    resumed = tmp_path / "resumed"
    _killed(resumed, mpoe_cache, MPOE_FAULT_KILL_AT_STEP="6")
    saved = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert saved == ["step_00000002", "step_00000004"]
    train(resumed, mpoe_cache, *COMMON, "trainer.resume=auto")
    a, b = _by_step(metrics(whole)), _by_step(metrics(resumed))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step]["loss"] == a[step]["loss"], step
        assert b[step]["lr"] == a[step]["lr"], step
    assert summary(resumed)["val_loss"] == summary(whole)["val_loss"]

    # Issue 31: wall_s counts the run's whole time, the part before the kill (up to the checkpoint resumed) too.
    meta = json.loads((resumed / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["wall_s"] >= sum(_step_seconds(b, s) for s in (1, 2, 3, 4))
    assert summary(resumed)["wall_s"] >= meta["wall_s"] + _step_seconds(b, 5) + _step_seconds(b, 6)

    # Resuming the finished run evaluates it again and rewrites its summary; nothing is trained twice.
    rows = len(metrics(resumed))
    (resumed / "summary.json").unlink()
    train(resumed, mpoe_cache, *COMMON, "trainer.resume=auto")
    again = summary(resumed)
    assert again["val_loss"] == summary(whole)["val_loss"] and again["steps"] == 6
    assert len(metrics(resumed)) == rows


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, mpoe_cache):
    run = tmp_path / "run"
    _killed(run, mpoe_cache, MPOE_FAULT_KILL_IN_SAVE="4")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step_00000002"]
    assert (ckpts / ".tmp-step_00000004").is_dir()  # the half-written one never took the real name
    train(run, mpoe_cache, *COMMON, "trainer.resume=auto")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    assert summary(run)["steps"] == 6


def test_bad_resume_path_is_one_line(tmp_path, mpoe_cache):
    proc = train(tmp_path / "run", mpoe_cache, *COMMON, f"trainer.resume={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("mpoe-train: error: trainer.resume=")


def test_the_same_command_again_in_a_run_dir_with_checkpoints_stops_in_one_line(tmp_path, mpoe_cache):
    """A requeued job (SLURM requeues by default) without trainer.resume=auto: it used to train from step 0 again
    beside the checkpoints, appending a second curve to metrics.jsonl and skipping every save of an existing step."""
    run = tmp_path / "run"
    _killed(run, mpoe_cache, MPOE_FAULT_KILL_AT_STEP="4")
    before = ((run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir()))
    proc = train(run, mpoe_cache, *COMMON, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mpoe-train: error: {run / 'checkpoints'} already holds checkpoints (the newest: step_00000002) and "
        "trainer.resume=null would start again from step 0 beside them: continue with trainer.resume=auto, or "
        "give a new hydra.run.dir"
    )
    assert ((run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir())) == before


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, mpoe_cache):
    run = tmp_path / "run"
    os.environ["MPOE_FAULT_NAN_AT_STEPS"] = "2,3"
    try:
        train(run, mpoe_cache, *COMMON, "trainer.log_every=1")
    finally:
        os.environ.pop("MPOE_FAULT_NAN_AT_STEPS")
    rows = _by_step(metrics(run))
    assert [rows[s]["steps_skipped"] for s in range(1, 7)] == [0, 1, 2, 2, 2, 2]
    # each row logs the lr its step used: skipped steps 2 and 3 do not move the schedule, so step 4 runs at theirs
    assert rows[2]["lr"] == rows[3]["lr"] == rows[4]["lr"] > rows[1]["lr"]
    stopped = tmp_path / "stopped"
    os.environ["MPOE_FAULT_NAN_AT_STEPS"] = "3,4,5"
    try:
        proc = train(stopped, mpoe_cache, *COMMON, "trainer.max_bad_steps=3", check=False)
    finally:
        os.environ.pop("MPOE_FAULT_NAN_AT_STEPS")
    assert proc.returncode == 2
    assert "trainer.max_bad_steps=3" in proc.stderr.strip().splitlines()[-1]
    meta = json.loads((stopped / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["step"] == 2


def test_data_parallel_zero1_checkpoints_store_replicated_state_once_and_survive_a_killed_rank(tmp_path, mpoe_cache):
    """2 data-parallel ranks at ZeRO 1 (one test, so that the uninterrupted run is shared):
    - rank 1's file holds only its own partition (the weights live in rank 0's file, once);
    - SIGKILL of rank 1 at step 5 under torchrun --max-restarts=1: the restarted group resumes from step 4 on the
      same layout and logs the uninterrupted run's losses and final val_loss exactly."""
    import subprocess
    import sys

    import torch
    from _cli import FAST, env

    layout = ["parallel.ep_size=1", "parallel.zero_stage=1", "trainer.micro_batch_size=4"]
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    train(whole, mpoe_cache, *COMMON, *layout, nproc=2)
    a = _by_step(metrics(whole))

    step2 = whole / "checkpoints" / "step_00000002"
    files = [torch.load(step2 / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False) for r in (0, 1)]
    assert {"module", "optimizer"} <= files[0].keys() and "portable_optimizer" not in files[0]
    assert "module" not in files[1] and "portable_optimizer" not in files[1] and "optimizer" in files[1]

    e = {
        **env(mpoe_cache),
        "MPOE_FAULT_KILL_AT_STEP": "5",
        "MPOE_FAULT_RANK": "1",
        "MPOE_FAULT_ONCE": str(tmp_path / "fired"),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "-m",
        "mpoe.train",
        f"hydra.run.dir={crashed}",
        *FAST,
        *COMMON,
        *layout,
        "trainer.resume=auto",
    ]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fired").exists(), "the fault did not fire"
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    c = _by_step(metrics(crashed))
    assert [c[s]["loss"] for s in range(1, 7)] == [a[s]["loss"] for s in range(1, 7)]
    assert summary(crashed)["val_loss"] == summary(whole)["val_loss"]


def test_a_restarted_worker_continues_the_run_without_a_resume_key(tmp_path, mpoe_cache, whole):
    """Issue 31: `MAX_RESTARTS=1 launch/torchrun.sh` (torchrun --max-restarts 1), the worker SIGKILLed at step 5
    (after the checkpoint of step 4), no trainer.resume given: the restart continues from step 4 (it used to be
    refused, the run directory holding checkpoints, until the restarts were spent), says so, and logs the
    uninterrupted run's losses."""
    import subprocess
    from pathlib import Path

    from _cli import FAST, env

    from mpoe.parallel.process_groups import free_port

    crashed = tmp_path / "crashed"
    e = {
        **env(mpoe_cache),
        "MAX_RESTARTS": "1",
        "MASTER_PORT": str(free_port()),
        "MPOE_FAULT_KILL_AT_STEP": "5",
        "MPOE_FAULT_ONCE": str(tmp_path / "fired"),
    }
    script = Path(__file__).resolve().parents[1] / "launch" / "torchrun.sh"
    cmd = ["bash", str(script), f"hydra.run.dir={crashed}", *FAST, *COMMON]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fired").exists(), "the fault did not fire"
    said = [line for line in proc.stdout.splitlines() if line.startswith("mpoe-train: restart")]
    assert said == [
        "mpoe-train: restart 1 (TORCHELASTIC_RESTART_COUNT=1): continuing from the run's last complete checkpoint "
        "(as trainer.resume=auto does)"
    ]
    assert f"resumed from {crashed / 'checkpoints' / 'step_00000004'} at step 4" in proc.stdout
    a, c = _by_step(metrics(whole)), _by_step(metrics(crashed))
    assert sorted(c) == sorted(a) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert c[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step
    assert summary(crashed)["val_loss"] == pytest.approx(summary(whole)["val_loss"], abs=1e-6)
