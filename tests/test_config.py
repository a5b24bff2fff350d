"""Bad input stops before any process group with one line naming the key, the value and the fix."""

import subprocess
import sys

import pytest

from mpoe.config import ConfigError, GradMaskConfig, MoEConfig, ParallelConfig, TrainConfig, TrainerConfig
from mpoe.train.main import compose_and_validate


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
