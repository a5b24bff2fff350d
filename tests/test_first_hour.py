"""Issue 15, a user's first hour: what mpoe-train says and does at the edges a new user meets first.

Each test runs the command as the user did (tests/_cli.py) and checks what they saw:
the exit code, the one line on stderr, what the run directory holds.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import FAST, env, metrics, summary, train

from mpoe.train.runtime import interrupt


def _start(run_dir: Path, cache: str, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mpoe.train", f"hydra.run.dir={run_dir}", *FAST, *overrides]
    return subprocess.Popen(cmd, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 400) -> None:
    """Until metrics.jsonl holds `steps` rows (log_every=1: one per step)."""
    deadline = time.monotonic() + timeout
    file = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if file.is_file() and len(file.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run did not reach its first steps")


def _python_argv(command: str) -> list[str]:
    """A printed `mpoe-train ...` command, run with this interpreter and this worktree's code."""
    argv = shlex.split(command)
    assert argv[0] == "mpoe-train", command
    return [sys.executable, "-m", "mpoe.train", *argv[1:]]


def test_stop_signal_sets_the_flag_and_a_second_is_not_a_traceback():
    """In-process: SIGTERM (a scheduler's preemption notice) only asks the loop to stop."""
    with interrupt.stop_on_signals():
        assert interrupt.requested() is None and not interrupt.stop_agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # ignored while stopping (torchrun forwards one after Ctrl-C)
        assert interrupt.stop_agreed() and interrupt.stopped()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


class _Exited(Exception):
    pass


def _second_sigint(monkeypatch, torchrun: bool, after_s: float) -> None:
    """Two SIGINTs `after_s` apart (the clock moved on by hand); os._exit raises _Exited instead of exiting."""
    monkeypatch.setattr(interrupt.os, "_exit", lambda code: (_ for _ in ()).throw(_Exited(code)))
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    now = [100.0]
    monkeypatch.setattr(interrupt.time, "monotonic", lambda: now[0])
    with interrupt.stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested() == signal.SIGINT
        now[0] += after_s
        os.kill(os.getpid(), signal.SIGINT)


def test_torchruns_copy_of_a_ctrl_c_does_not_quit_at_once(monkeypatch):
    """Under torchrun a terminal's Ctrl-C reaches a worker directly and again from torchrun, ms later."""
    _second_sigint(monkeypatch, torchrun=True, after_s=0.005)  # no _Exited: still stopping with a checkpoint


@pytest.mark.parametrize("torchrun, after_s", [(True, 5.0), (False, 0.005)], ids=["torchrun-later", "alone"])
def test_a_second_ctrl_c_quits_at_once(monkeypatch, torchrun, after_s):
    with pytest.raises(_Exited):
        _second_sigint(monkeypatch, torchrun, after_s)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_checkpoints_and_says_how_to_resume(tmp_path, mpoe_cache):
    """A terminal's Ctrl-C reaches torchrun and both workers (one process group): the workers stop after the same
    step, save one checkpoint and rank 0 says how to resume; torchrun then reports the signal its own way."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mpoe.train"]
    cmd += [f"hydra.run.dir={run}", *FAST, "trainer.max_steps=100000", "trainer.eval_every=100000"]
    proc = subprocess.Popen(
        cmd, env=env(mpoe_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _wait_for_steps(proc, run, 2)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground process group
    out, err = proc.communicate(timeout=300)
    stopped = [line for line in err.splitlines() if line.startswith("mpoe-train: stopped after step")]
    assert len(stopped) == 1, err[-3000:]  # rank 0 only
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert f"checkpoint {run / 'checkpoints' / f'step_{step:08d}'}" in stopped[0]
    assert (run / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()
    assert "trainer.resume=auto" in stopped[0]


@pytest.mark.slow
def test_ctrl_c_checkpoints_says_how_to_resume_and_the_run_ends_with_its_numbers(tmp_path, mpoe_cache):
    """Finding 4 (Ctrl-C: checkpoint, one line, resumable) and finding 9 (the end-of-run block)."""
    run = tmp_path / "run"
    proc = _start(run, mpoe_cache, "trainer.max_steps=100000", "trainer.eval_every=100000")
    _wait_for_steps(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("mpoe-train: stopped after step "), err[-3000:]
    step = int(last.split("stopped after step ")[1].split()[0])
    assert step >= 2
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "meta.json").is_file() and f"checkpoint {ckpt}" in last
    resume = _python_argv(last.split("resume with: ", 1)[1])
    assert f"hydra.run.dir={run}" in resume and "trainer.resume=auto" in resume
    resume = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={step + 2}" for a in resume]
    resume = [a if not a.startswith("trainer.eval_every=") else f"trainer.eval_every={step + 2}" for a in resume]
    done = subprocess.run(resume, env=env(mpoe_cache), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)
    assert rows[-1]["step"] == step + 2 and [r["step"] for r in rows].count(step + 1) == 1  # went on, not over

    s = summary(run)
    block = done.stdout[done.stdout.index("mpoe-train: trained to step") :].splitlines()
    assert block[0].startswith(f"mpoe-train: trained to step {step + 2} ({s['tokens_seen']:,} tokens) in ")
    assert block[0].endswith(" tokens/s")
    assert (
        f"final train loss {s['train_loss']:.4f}; val loss {s['val_loss']:.4f}, val ppl {s['val_ppl']:.2f}"
        in (block[1])
    )
    assert block[2] == f"  run directory: {run}"
    further = _python_argv(block[3].split("train further: ", 1)[1])
    assert f"hydra.run.dir={run}" in further and "trainer.resume=auto" in further
    assert block[4] == f"  report:        mpoe-report {run}"
    sync = shlex.split(block[5].split("W&B upload:", 1)[1])
    assert sync[:2] == ["wandb", "sync"] and len(sync) == 4  # both parts: before Ctrl-C and resumed
    assert all(Path(part).is_dir() and Path(part).parent == run / "wandb" for part in sync[2:])

    # Finding 10: no library notices on the terminal; main.log holds the config, the parameters and each eval.
    for noise in ("Transformer Engine", "Megatron Core", "gcc ", "built successfully", "Warning"):
        assert noise not in done.stdout + done.stderr, noise
    log = (run / "main.log").read_text()
    assert "config: model gpt2_tiny" in log and "params_total" in log and "torch uses" in log
    assert f"step {step + 2}: train loss {s['train_loss']:.4f}, val loss {s['val_loss']:.4f}" in log
    assert "mpoe-train: trained to step" in log  # the end block too


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path, mpoe_cache):
    run = tmp_path / "run"
    proc = _start(run, mpoe_cache, "trainer.max_steps=100000", "logging.wandb.mode=disabled")
    _wait_for_steps(proc, run, 1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


@pytest.mark.slow
def test_evaluate_only_run_prints_its_validation_loss(tmp_path, mpoe_cache):
    run = tmp_path / "run"
    proc = train(run, mpoe_cache, "trainer.max_steps=0", "logging.wandb.mode=disabled")
    s = summary(run)
    assert f"mpoe-train: evaluated at step 0: val loss {s['val_loss']:.4f}, val ppl {s['val_ppl']:.2f}" in proc.stdout
    assert f"  run directory: {run}" in proc.stdout


def _in(cwd: Path, cache: str, *overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """mpoe-train run from `cwd` with Hydra's default run directory (outputs/DATE/TIME under cwd)."""
    cmd = [sys.executable, "-m", "mpoe.train", *FAST, "logging.wandb.mode=disabled", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env(cache), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_resume_auto_finds_the_run_of_the_same_config(tmp_path, mpoe_cache):
    """Finding 3: the same command plus trainer.resume=auto continues the run, not a new one from step 0."""
    first = _in(tmp_path, mpoe_cache, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*")
    again = _in(tmp_path, mpoe_cache, "trainer.max_steps=4", "trainer.resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"mpoe-train: trainer.resume=auto: continuing {run}\n" in again.stdout
    assert list((tmp_path / "outputs").glob("*/*")) == [run]  # no new run directory
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert summary(run)["steps"] == 4
    _check_optimizer_stored_once(run / "checkpoints" / "step_00000004" / "rank_00000.pt")


def _check_optimizer_stored_once(rank_file: Path) -> None:
    """Finding 15: at ZeRO 0 Adam's state is stored once (native, with names); the portable form is derived."""
    import torch

    from mpoe.train.checkpoint import adam_state, reshard

    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    assert "portable_optimizer" not in state and "optimizer" in state
    (portable,) = adam_state.portable_forms(reshard.RankFiles(rank_file.parent), 1)
    assert portable["step"] == 4
    assert portable["params"] and set(portable["params"]) <= set(state["optimizer_param_names"])
    for name, adam in portable["params"].items():  # a shifted name <-> index mapping would mismatch shapes
        assert adam["exp_avg"].shape == adam["exp_avg_sq"].shape == state["module"][name].shape, name


def test_resume_auto_matches_only_runs_of_the_same_config(tmp_path):
    from omegaconf import OmegaConf

    from mpoe.config import TrainConfig
    from mpoe.train import run_keys
    from mpoe.train.checkpoint import autoresume

    def fake_run(name: str, lr: float, max_steps: int, seed: int = 0) -> Path:
        run = tmp_path / "outputs" / "day" / name
        (run / ".hydra").mkdir(parents=True)
        config = OmegaConf.to_container(OmegaConf.structured(TrainConfig()))
        config["optim"]["lr"], config["trainer"]["max_steps"], config["trainer"]["seed"] = lr, max_steps, seed
        (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
        (run / "checkpoints" / "step_00000002").mkdir(parents=True)
        (run / "checkpoints" / "step_00000002" / "meta.json").write_text("{}")
        return run

    other = fake_run("a", 2e-3, 10)
    same = fake_run("b", 1e-3, 10)
    other_seed = fake_run("c", 1e-3, 10, seed=1)  # a seed sweep's other repeat is not this run
    want = OmegaConf.to_container(OmegaConf.structured(TrainConfig()))  # lr 1e-3, max_steps 200, seed 0
    assert autoresume.find_run(want, tmp_path / "outputs") == (same, 3)
    (same / "checkpoints" / "step_00000002" / "meta.json").unlink()  # no complete checkpoint: nothing to resume
    assert autoresume.find_run(want, tmp_path / "outputs") == (None, 3)
    want["trainer"]["seed"] = 1
    assert autoresume.find_run(want, tmp_path / "outputs") == (other_seed, 3)
    want["trainer"]["seed"], want["trainer"]["eval_every"] = 0, 7  # how it is measured: the same run (issue 31)
    (same / "checkpoints" / "step_00000002" / "meta.json").write_text("{}")
    assert autoresume.find_run(want, tmp_path / "outputs") == (same, 3)
    want["optim"]["lr"] = 5e-4
    survey = autoresume.survey(want, tmp_path / "outputs")
    assert survey.found is None and survey.other == same  # the newest checkpoint of another identity
    assert autoresume.changes(survey.other_config, want, run_keys.in_resume_identity) == ["optim.lr: 0.001 -> 0.0005"]
    assert other.exists()
    assert autoresume.outputs_root("outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}") == Path("outputs").absolute()


def test_a_restarted_worker_continues_unless_trainer_resume_is_given(capsys):
    """Issue 31: TORCHELASTIC_RESTART_COUNT / SLURM_RESTART_COUNT > 0 and no trainer.resume on the command line:
    resume as `auto` does, in one line (rank 0 only); trainer.resume=null given: start over, and say so."""
    from mpoe.config import TrainConfig
    from mpoe.train.checkpoint import autoresume

    cfg = TrainConfig()
    assert autoresume.on_restart(cfg, [], {"TORCHELASTIC_RESTART_COUNT": "0"}) is cfg  # a first start
    restarted = autoresume.on_restart(cfg, ["moe=switch"], {"TORCHELASTIC_RESTART_COUNT": "2"})
    assert restarted.trainer.resume == "auto" and cfg.trainer.resume is None
    assert restarted.trainer.max_steps == cfg.trainer.max_steps
    assert capsys.readouterr().out == (
        "mpoe-train: restart 2 (TORCHELASTIC_RESTART_COUNT=2): continuing from the run's last complete checkpoint "
        "(as trainer.resume=auto does)\n"
    )
    requeued = autoresume.on_restart(cfg, [], {"SLURM_RESTART_COUNT": "1", "RANK": "3"})
    assert requeued.trainer.resume == "auto" and capsys.readouterr().out == ""  # rank 3 says nothing
    assert autoresume.on_restart(cfg, ["trainer.resume=null"], {"SLURM_RESTART_COUNT": "1"}) is cfg
    assert capsys.readouterr().out == (
        "mpoe-train: restart 1 (SLURM_RESTART_COUNT=1) with trainer.resume=null: not resuming, as asked (refused "
        "where the run directory holds checkpoints)\n"
    )


def test_fault_injection_is_read_once_into_the_hook_the_step_calls(monkeypatch):
    """Issue 30: the environment is read when the run is set up, not inside the training step."""
    import torch

    from mpoe.train.runtime import faults

    environ = {"MPOE_FAULT_NAN_AT_STEPS": "2,3", "MPOE_FAULT_KILL_AT_STEP": "5", "MPOE_FAULT_RANK": "1"}
    on_rank0, on_rank1 = faults.from_environment(0, environ), faults.from_environment(1, environ)
    assert (on_rank0.kill_at_step, on_rank1.kill_at_step, on_rank0.nan_at_steps) == (None, 5, {2, 3})
    monkeypatch.setenv("MPOE_FAULT_NAN_AT_STEPS", "4")  # read once: a later change is not seen
    assert torch.isnan(on_rank0.loss(3, torch.tensor(1.0))) and on_rank0.loss(4, torch.tensor(1.0)) == 1.0
    assert faults.from_environment(0, {}) == faults.NONE


@pytest.mark.slow
def test_resume_auto_says_when_it_finds_nothing(tmp_path, mpoe_cache):
    proc = _in(tmp_path, mpoe_cache, "trainer.resume=auto", "trainer.dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "outputs"
    line = f"mpoe-train: trainer.resume=auto: no run of this config with a checkpoint under {root} (0 run(s) looked at)"
    assert line in proc.stdout
    given = tmp_path / "given"  # issue 31: with hydra.run.dir it said nothing (the README said it reports that)
    proc = _in(tmp_path, mpoe_cache, "trainer.resume=auto", "trainer.dry_run=true", f"hydra.run.dir={given}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mpoe-train: trainer.resume=auto: no checkpoint in {given / 'checkpoints'}: starting from step 0\n" in (
        proc.stdout
    )


@pytest.mark.slow
def test_resume_auto_continues_a_run_measured_otherwise_but_not_one_trained_otherwise(tmp_path, mpoe_cache):
    """Issue 31: changing how often a run is evaluated made resume=auto start it over at step 0; now it continues
    and names what changed. A changed learning rate is another run, and the line says which key made it one.
    Also: with its output captured (not a terminal) the progress bar is one plain line per logged step."""
    first = _in(tmp_path, mpoe_cache, "trainer.max_steps=2", "logging.progress=true")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*")
    captured = first.stdout + first.stderr
    assert "\r" not in captured
    steps = [line.split(" - ", 1)[1] for line in captured.splitlines() if " - train step " in line]
    assert [s.split(":")[0] for s in steps] == ["train step 1/2", "train step 2/2"]
    rows = metrics(run)
    assert steps[0] == f"train step 1/2: loss {rows[0]['loss']:.3f}, tokens/s {rows[0]['tokens_per_s']:.0f}"

    again = _in(tmp_path, mpoe_cache, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"mpoe-train: trainer.resume=auto: continuing {run} with logging.progress: true -> false; "
        "trainer.eval_every: 4 -> 2\n"
    ) in again.stdout
    assert list((tmp_path / "outputs").glob("*/*")) == [run]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics(run) if "val_loss" in r] == [2, 4]

    other = _in(tmp_path, mpoe_cache, "optim.lr=0.002", "trainer.resume=auto", "trainer.dry_run=true")
    assert other.returncode == 0, other.stderr[-3000:]
    assert (
        f"mpoe-train: trainer.resume=auto: no run of this config with a checkpoint under {tmp_path / 'outputs'} "
        f"(1 run(s) looked at; the newest other, {run}, differs in optim.lr: 0.001 -> 0.002): starting a new run\n"
    ) in other.stdout
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 2


def _files(run: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_checkpoint_of_other_shapes_or_cut_short_is_refused_before_anything_is_written(tmp_path, mpoe_cache):
    """Issue 31: model.d_model changed under resume=auto or a checkpoint path was a 91-line traceback (and the path
    form left a run folder); a rank file cut in half stopped resume=auto although the checkpoint before it was
    intact. Now: one line and no file written or changed; `auto` falls back to the newest readable checkpoint."""
    from mpoe.train.checkpoint import store

    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    train(run, mpoe_cache, "trainer.save_every=2", "logging.wandb.mode=disabled")
    step2, step4 = run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000004"
    before = _files(run)

    proc = train(run, mpoe_cache, "model.d_model=256", "trainer.resume=auto", check=False, timeout=120)
    _one_error_line(
        proc,
        f"mpoe-train: error: trainer.resume=auto: the checkpoints of {run} were trained with model.d_model=128, "
        "this run has model.d_model=256, a shape they fix: resume with model.d_model=128",
    )
    assert _files(run) == before
    proc = train(elsewhere, mpoe_cache, "model.d_model=256", f"trainer.resume={step4}", check=False, timeout=120)
    _one_error_line(proc, f"mpoe-train: error: trainer.resume={str(step4)!r}: the checkpoints of {run} were trained")
    assert not elsewhere.exists()

    rank_file = step4 / "rank_00000.pt"
    os.truncate(rank_file, rank_file.stat().st_size // 2)
    before = _files(run)
    proc = train(elsewhere, mpoe_cache, f"trainer.resume={step4}", check=False, timeout=120)
    _one_error_line(
        proc,
        f"mpoe-train: error: trainer.resume={str(step4)!r}: checkpoint {step4} cannot be read: rank_00000.pt is cut "
        f"short or corrupt (not a complete torch file): give an earlier one ({step2})",
    )
    assert not elsewhere.exists() and _files(run) == before

    proc = train(run, mpoe_cache, "trainer.save_every=2", "trainer.max_steps=6", "trainer.resume=auto")
    assert (
        "mpoe-train: trainer.resume=auto: step_00000004: rank_00000.pt is cut short or corrupt (not a complete torch "
        "file): continuing from step_00000002, the newest checkpoint that can be read\n"
    ) in proc.stdout
    assert f"resumed from {step2} at step 2" in proc.stdout
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert store.unreadable(step4) is None  # saved again, whole


@pytest.mark.slow
def test_bad_resume_path_stops_before_any_setup(tmp_path, mpoe_cache):
    """Finding 16: a wrong trainer.resume path is one line, exit 2, before Hydra makes a run directory."""
    run = tmp_path / "run"
    proc = train(run, mpoe_cache, f"trainer.resume={tmp_path / 'nowhere'}", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mpoe-train: error: trainer.resume={str(tmp_path / 'nowhere')!r} is not a complete checkpoint (no meta.json): "
        "give a step_N directory, a run directory, 'auto' or null"
    ]
    assert not run.exists()
    wrong = tmp_path / "ckpt" / "step_00000002"
    wrong.mkdir(parents=True)
    (wrong / "meta.json").write_text('{"model": "gpt2_tiny", "moe": "switch", "num_experts": 4, "step": 2}')
    proc = train(run, mpoe_cache, f"trainer.resume={wrong}", check=False, timeout=120)
    assert proc.returncode == 2 and not run.exists()
    assert proc.stderr.strip().splitlines()[-1].endswith("this run has moe='mpoe': resume with the same setting")


def _bad_files(tmp_path: Path) -> dict:
    """The three files of finding 5: an empty .txt, a binary file named .txt, a JSONL with one bad line; and issue
    31's: a .txt of whitespace, a JSONL whose text values are numbers, one with a null text value."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"first line\n" + bytes(range(128, 256)) * 8)
    jsonl = tmp_path / "docs.jsonl"
    lines = [f'{{"text": "document number {i} with some words in it"}}' for i in range(2500)]
    lines[1999] = '{"text": "a quote never closed}'
    jsonl.write_text("\n".join(lines) + "\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n\t \n")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(f'{{"text": {i}}}\n' for i in range(100)))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "words in a document"}\n{"text": null}\n')
    return {
        "blank": (blank, f"data.paths entry {str(blank)!r} has no usable text (only whitespace)"),
        "numbers": (numbers, f"data.paths entry {str(numbers)!r} line 1: 'text' is a number (0), not text"),
        "null": (mixed, f"data.paths entry {str(mixed)!r} line 2: 'text' is null, not text"),
        "empty": (empty, f"data.paths entry {str(empty)!r} is empty"),
        "binary": (binary, f"data.paths entry {str(binary)!r} cannot be read as text: line 2 is not UTF-8 text"),
        "jsonl": (jsonl, f"data.paths entry {str(jsonl)!r} cannot be read as json: line 2000 is not JSON"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty", "binary", "jsonl", "blank", "numbers"])
def test_unreadable_data_is_one_line_and_leaves_no_run_directory(tmp_path, mpoe_cache, case):
    """Findings 5 (one line naming the file and line), 13 (data.paths=FILE without brackets), 14 (no half-made
    run directory for mpoe-report to list)."""
    path, message = _bad_files(tmp_path)[case]
    proc = _in(tmp_path, mpoe_cache, "data=text", f"data.paths={path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-3000:]  # one line
    assert proc.stderr.startswith(f"mpoe-train: error: {message}"), proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_unreadable_data_names_the_file_in_process(tmp_path):
    from mpoe.config import ConfigError, DataConfig
    from mpoe.train.data import documents

    for path, message in _bad_files(tmp_path).values():
        with pytest.raises(ConfigError) as e:
            documents.load_documents(DataConfig(name="text", paths=[str(path)]))
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_text_and_json_files_can_be_mixed(tmp_path):
    """Finding 12: the README's data.paths=[a.txt,b.jsonl] works: datasets reads each kind, in the order given."""
    import json

    from mpoe.train.data import documents

    (tmp_path / "a.txt").write_text("alpha line one\nalpha line two\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta document"}) + "\n")
    (tmp_path / "c.txt").write_text("gamma line\n")
    docs = list(documents.local_source([tmp_path / n for n in ("a.txt", "b.jsonl", "c.txt")], "text").documents())
    assert docs == ["alpha line one", "alpha line two", "gamma line", "beta document"]


@pytest.mark.slow
def test_single_data_path_without_brackets_trains(tmp_path, mpoe_cache):
    """Finding 13: data.paths=FILE is the list [FILE]."""
    from mpoe.train.data import corpus

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(corpus.pydoc_topics()[:150]))
    run = tmp_path / "run"
    train(run, mpoe_cache, "data=text", f"data.paths={text}", "trainer.max_steps=1", "logging.wandb.mode=disabled")
    assert summary(run)["steps"] == 1


def _cli(cwd: Path, cache: str, *args: str, module: str = "mpoe.train", timeout: int = 300):
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env(cache), capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_pretrained_without_weights_or_tokenizer_is_one_line(tmp_path, mpoe_cache):
    """Finding 6: config.json alone, then weights without tokenizer files: one line each, before any run dir."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 4096}')
    proc = _in(tmp_path, mpoe_cache, f"model.pretrained={ckpt}")
    line = _one_error_line(proc, f"mpoe-train: error: model.pretrained={str(ckpt)!r} has config.json but no weights")
    assert "save_pretrained" in line
    (ckpt / "model.safetensors").write_bytes(b"weights")
    proc = _in(tmp_path, mpoe_cache, f"model.pretrained={ckpt}")
    line = _one_error_line(proc, f"mpoe-train: error: model.pretrained={str(ckpt)!r} holds no tokenizer")
    assert "data.tokenizer=bpe" in line
    assert not (tmp_path / "outputs").exists()


def test_export_of_a_directory_that_is_not_a_run_is_one_line(tmp_path, mpoe_cache):
    """Finding 7."""
    (tmp_path / "notes").mkdir()
    proc = _cli(tmp_path, mpoe_cache, str(tmp_path / "notes"), str(tmp_path / "out"), module="mpoe.tools.export")
    _one_error_line(proc, f"python -m mpoe.tools.export: error: {tmp_path / 'notes'} is neither a checkpoint")
    proc = _cli(tmp_path, mpoe_cache, str(tmp_path / "gone"), str(tmp_path / "out"), module="mpoe.tools.export")
    _one_error_line(proc, f"python -m mpoe.tools.export: error: {tmp_path / 'gone'} does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sweep_validates_every_job_before_the_first_starts(tmp_path, mpoe_cache):
    """Finding 8: a typo, an unknown +key, and a bad value in job 1 all stop before job 0 runs, in one line."""
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    proc = _cli(tmp_path, mpoe_cache, "-m", "trainer.max_step=5", sweep)
    line = _one_error_line(proc, "mpoe-train: error: ")
    assert "trainer.max_step is not a config key" in line and "+trainer" not in line
    proc = _cli(tmp_path, mpoe_cache, "-m", "+foo=bar", "trainer.max_steps=1", sweep)
    _one_error_line(proc, "mpoe-train: error: +foo=bar: foo is not a config key, so the run would ignore it")
    proc = _cli(tmp_path, mpoe_cache, "-m", "optim.lr=0.001,-1", "trainer.max_steps=1", sweep)
    line = _one_error_line(proc, "mpoe-train: error: sweep job 1 of 2 (optim.lr=-1 trainer.max_steps=1): optim.lr=")
    assert "must be > 0" in line
    assert not (tmp_path / "sweep").exists()  # job 0 never started


def test_unknown_added_key_is_refused_in_a_single_run_too():
    from mpoe.config import ConfigError
    from mpoe.train.compose import check_added_keys

    check_added_keys(["+trainer.max_steps=3", "+experiment=switch_vs_mpoe", "+hydra.job.name=x"])  # real keys
    with pytest.raises(ConfigError, match=r"^\+trainer.max_step=3: trainer.max_step is not a config key"):
        check_added_keys(["+trainer.max_step=3"])


@pytest.mark.slow
def test_help_describes_the_tool(tmp_path, mpoe_cache):
    """Finding 11."""
    proc = _cli(tmp_path, mpoe_cache, "--help")
    assert proc.returncode == 0
    assert "powered by Hydra" not in proc.stdout
    assert proc.stdout.startswith("mpoe-train: pretrain a GPT-2 or T5")
    assert "moe: dense, mpoe, switch" in proc.stdout and "model: gpt2_medium" in proc.stdout
    assert proc.stdout.count("\n  mpoe-train") == 3  # three example commands


def test_torch_threads_fit_the_cpus_of_this_process(monkeypatch):
    """Finding 17: the pool is lowered to the process's share of its CPUs, and the log line says so."""
    import torch

    from mpoe.train.runtime import threads

    assert threads.share(2, 2) == 1 and threads.share(16, 4) == 4 and threads.share(1, 8) == 1
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cpus_available", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    try:
        torch.set_num_threads(3)
        assert threads.fit_threads() == (
            "torch threads lowered from 3 to 1 (4 CPU(s) in this process's affinity, 4 process(es) on this node; "
            "set OMP_NUM_THREADS to choose)"
        )
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert threads.fit_threads().startswith("torch uses 3 thread(s) (OMP_NUM_THREADS=3;")
        assert torch.get_num_threads() == 3  # the user's choice is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setenv("LOCAL_SIZE", "2")  # what DeepSpeed's launcher sets instead
        assert "lowered from 3 to 2" in threads.fit_threads() and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
