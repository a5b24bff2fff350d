"""Bad input stops before any process group with one line naming the key, the value and the fix; the config is
composed once, validated once, and read-only after; a refused start changes nothing."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import train

from mpoe.config import ConfigError, GradMaskConfig, MoEConfig, ParallelConfig, TrainConfig, TrainerConfig, derive
from mpoe.train.compose import compose_and_validate


@pytest.mark.parametrize(
    "overrides, world, key",
    [
        (["optim.lr=-0.001"], 1, "optim.lr"),
        (["model=no_such_model"], 1, "model=no_such_model"),
        (["moe.num_experts=0"], 1, "moe.num_experts"),
        (["trainer.global_batch_size=12", "trainer.micro_batch_size=4"], 2, "trainer.global_batch_size"),
        (["moe=switch", "parallel.ep_size=3"], 1, "parallel.ep_size"),
        (["moe=switch", "moe.num_experts=4", "parallel.ep_size=4"], 2, "parallel.ep_size"),
        (["trainer.max_steps=abc"], 1, "trainer.max_steps"),
        (["trainer.no_such_key=1"], 1, "trainer.no_such_key"),
        (["moe.top_k=5"], 1, "moe.top_k"),
        (["moe=dense", "moe.grad_mask.enabled=true"], 1, "moe.grad_mask.enabled"),
        (["logging.wandb.mode=sometimes"], 1, "logging.wandb.mode"),
        (["data=text"], 1, "data.paths"),
    ],
)
def test_bad_value_is_one_line_naming_the_key(overrides, world, key):
    with pytest.raises(ConfigError) as err:
        compose_and_validate(overrides, world)
    message = str(err.value)
    assert "\n" not in message
    assert key in message


def test_good_config_composes_to_typed_dataclasses():
    cfg = compose_and_validate(
        ["moe=mpoe", "moe.num_experts=8", "parallel.ep_size=2", "trainer.global_batch_size=16"], 2
    )
    assert cfg.moe.kind == "mpoe" and cfg.moe.num_experts == 8
    assert cfg.parallel.ep_size == 2 and isinstance(cfg.trainer.max_steps, int)


def test_cli_error_exits_2_without_traceback_or_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mpoe.train", "optim.lr=-1", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["mpoe-train: error: optim.lr=-1.0 is invalid: must be > 0"]
    assert not run_dir.exists()


def test_dataclass_defaults_are_the_yaml_defaults():
    """conf/train.yaml with its default options composes to exactly the dataclasses' defaults."""
    assert compose_and_validate([], 1) == TrainConfig()


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: MoEConfig(num_experts=4, top_k=5), "moe.top_k"),
        (lambda: MoEConfig(grad_mask=GradMaskConfig(keep_prob=1.5)), "moe.grad_mask.keep_prob"),
        (lambda: MoEConfig(kind="switch", grad_mask=GradMaskConfig(enabled=True)), "moe.grad_mask.enabled"),
        (lambda: TrainConfig(moe=MoEConfig(num_experts=4), parallel=ParallelConfig(ep_size=3)), "parallel.ep_size"),
        (lambda: TrainConfig(trainer=TrainerConfig(seq_len=512)), "trainer.seq_len"),
    ],
)
def test_a_config_object_checks_itself_when_built(build, key):
    """Tests and benchmarks build configs without Hydra: the same one-line errors, so no caller re-checks."""
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value)


def test_a_validated_config_is_read_only_and_derived_values_are_checked_copies():
    cfg = compose_and_validate(["moe=switch"], 1)
    with pytest.raises(dataclasses.FrozenInstanceError, match="MoEConfig.num_experts"):
        cfg.moe.num_experts = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer = TrainerConfig()
    copy = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=8))
    assert copy.moe.num_experts == 8 and cfg.moe.num_experts == 4  # the validated one is as it was
    with pytest.raises(ConfigError, match="moe.top_k=9"):  # a copy is checked as it is built
        dataclasses.replace(cfg.moe, top_k=9)
    derived = derive(cfg, trainer=derive(cfg.trainer, resume="auto"))  # what a restarted worker trains
    assert derived.trainer.resume == "auto" and cfg.trainer.resume is None
    for section, key in ((derived.trainer, "max_steps"), (derived.optim, "lr")):  # as fixed as what it came from
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, key, 1)


def test_an_export_merged_to_switch_keeps_a_config_that_loads():
    """`export --merge` of an MPOE run with the gradient mask: the exported config is Switch's, and a Switch config
    with the MPO-only settings on is refused when loaded, so the merged config turns them off (a checked copy)."""
    from omegaconf import OmegaConf

    from mpoe.tools.export import merged_moe_config

    trained = compose_and_validate(["moe=mpoe", "moe.grad_mask.enabled=true", "moe.recompute_mpo_weights=true"], 1)
    merged = dataclasses.replace(trained, moe=merged_moe_config(trained.moe))
    assert (merged.moe.kind, merged.moe.grad_mask.enabled, merged.moe.recompute_mpo_weights) == ("switch", False, False)
    assert merged.moe.num_experts == trained.moe.num_experts and trained.moe.kind == "mpoe"
    saved = OmegaConf.to_container(OmegaConf.structured(merged))  # what export.save writes, loaded as load() does
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)) == merged


def test_no_module_rewrites_sys_argv():
    """Hydra gets the overrides as a list (mpoe.train.compose), never through a rewritten sys.argv."""
    package = Path(__file__).resolve().parents[1] / "mpoe"
    found = [
        f"{p}:{n}"
        for p in package.rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"sys\.argv\s*(\[[^]]*\]\s*)?=[^=]", line)
    ]
    assert found == []


def _mpoe_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mpoe.train", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_groups_added_with_a_plus_apart(tmp_path):
    """upcycle_variant is not in the defaults list: `upcycle_variant=mpoe` fails, `+upcycle_variant=mpoe` works."""
    proc = _mpoe_train("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "moe: dense, mpoe, switch" in lines
    (experiments,) = [line for line in lines if line.startswith("experiment: ")]
    assert "switch_vs_mpoe, switch_vs_mpoe_mask, " in experiments
    (added,) = [line for line in lines if "upcycle_variant" in line]
    assert added.startswith("+upcycle_variant: dense, mpoe, ")
    assert any(line.startswith("+finetune_variant: dense, mpoe, mpoe_central_frozen, ") for line in lines)
    header = next(line for line in reversed(lines[: lines.index(added)]) if not line.startswith("+"))
    assert "+group=option" in header
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_hydra_commands_and_overrides_reach_hydra(tmp_path):
    """--cfg job shows the composed config with the overrides (data.paths=FILE normalised to a list)."""
    proc = _mpoe_train("--cfg", "job", "moe=switch", "moe.num_experts=8", "data=text", "data.paths=a.txt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "kind: switch" in proc.stdout and "num_experts: 8" in proc.stdout
    assert "paths:\n  - a.txt" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_config_error_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """Both ranks meet the error; rank 0 says it and exits with 2, first: torchrun names it as the root cause."""
    run = tmp_path / "run"
    proc = train(run, str(tmp_path / "cache"), "optim.lr=-1", nproc=2, check=False, timeout=200)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("mpoe-train: error:") == 1, out[-3000:]
    assert "mpoe-train: error: optim.lr=-1.0 is invalid: must be > 0\n" in out
    root_cause = out[out.index("Root Cause") :]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 2 " in root_cause, out[-3000:]
    assert not run.exists()


def _files(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_refused_resume_leaves_every_file_of_the_run_as_it_was(tmp_path, mpoe_cache):
    """Into a run saved with 4 experts: resume=auto asking for 8, and resume=null (which would train over its
    checkpoints), each stop in one line, and not one byte of the run changes (.hydra/config.yaml used to say 8
    afterwards; resume=null rewrote .hydra/ and main.log before the loop refused it)."""
    run = tmp_path / "run"
    train(run, mpoe_cache, "trainer.max_steps=2", "trainer.eval_every=2")
    before = _files(run)
    assert ".hydra/config.yaml" in before and "main.log" in before
    refused = {
        "num_experts": ["trainer.resume=auto", "moe.num_experts=8"],
        "already holds checkpoints": ["trainer.resume=null", "moe.num_experts=8"],
    }
    for says, overrides in refused.items():
        proc = train(run, mpoe_cache, "trainer.max_steps=4", *overrides, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mpoe-train: error: ") and says in lines[0], lines
        assert _files(run) == before, overrides


@pytest.mark.slow
def test_a_run_that_stops_before_its_first_step_says_its_directory_is_gone(tmp_path, mpoe_cache):
    """The config line names the run directory; the run stops on its data and removes it: the error says so."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run = tmp_path / "run"
    proc = train(run, mpoe_cache, "data=text", f"data.paths={empty}", check=False)
    assert proc.returncode == 2 and not run.exists(), proc.stderr[-3000:]
    assert f"run directory {run}" in proc.stdout  # the config line
    (error,) = proc.stderr.strip().splitlines()
    assert error.endswith(f"(run directory {run} removed: no step had run)"), error


def test_a_sweep_override_may_interpolate_each_jobs_own_choice(tmp_path):
    """`${hydra:runtime.choices.X}` in a sweep's override is each job's value (the upcycling study names its runs
    so); the sweep's own config, which has no such choice, must not resolve it."""
    from mpoe.train import sweep
    from mpoe.train.compose import hydra_app

    overrides = [
        "+upcycle_variant=dense,switch",
        "logging.wandb.name=v-${hydra:runtime.choices.upcycle_variant}",
        f"hydra.sweep.dir={tmp_path}",
    ]
    with hydra_app() as (hydra, config_name):
        _, jobs = sweep.compose_jobs(hydra, config_name, overrides, 1, lambda cfg: None)
    assert [job.cfg.logging.wandb.name for job in jobs] == ["v-dense", "v-switch"]
    assert [job.cfg.moe.kind for job in jobs] == ["dense", "switch"]


def _no_check(cfg):
    pass


def test_a_sweep_expands_globs_and_refuses_plugins_it_would_ignore(tmp_path):
    """`moe=glob(*)` is every option of the group, as in Hydra's own sweeper; a launcher other than the basic one
    would be ignored by mpoe-train's sweep, so it stops in one line naming it."""
    from mpoe.train import sweep
    from mpoe.train.compose import hydra_app

    with hydra_app() as (hydra, config_name):
        _, jobs = sweep.compose_jobs(hydra, config_name, ["moe=glob(*)", f"hydra.sweep.dir={tmp_path}"], 1, _no_check)
        assert sorted(job.cfg.moe.kind for job in jobs) == ["dense", "mpoe", "switch"]
        plugin = "hydra.launcher._target_=hydra_plugins.joblib.JoblibLauncher"
        with pytest.raises(ConfigError, match=r"^hydra/launcher=hydra_plugins.joblib.JoblibLauncher: .*basic launcher"):
            sweep.compose_jobs(hydra, config_name, ["moe=dense,switch", plugin], 1, _no_check)
