"""Resuming, decided before anything is set up: a restarted worker continues, `trainer.resume=PATH` is checked,
`trainer.resume=auto` is given its run and says which, each in one line.

A refused resume (a checkpoint that cannot be read, or whose tensors have other
shapes than this run's model) stops here, before Hydra writes the run directory,
so a refused start leaves every file as it was.

Restarts: torchrun (`--max-restarts`) sets TORCHELASTIC_RESTART_COUNT, SLURM
sets SLURM_RESTART_COUNT on a requeue; > 0 means this worker runs the same
command again after a failure. Without `trainer.resume` on the command line such
a restart continues from the run's last complete checkpoint, as
`trainer.resume=auto` does (rather than refusing to start because the run
directory already holds checkpoints). An explicit `trainer.resume=null` starts over, and says so.

`trainer.resume=auto` without `hydra.run.dir`: Hydra gives every run a new
timestamped directory, so `find_run` looks under the outputs root (the part of
`hydra.run.dir`'s pattern before its first `${...}`, `outputs/` by default) for
runs of the same resume identity (`run_keys.in_resume_identity`: what a run
trains, its seed included) that hold a complete checkpoint, and picks the one
whose newest checkpoint is newest. When none matches, it names the key that made
the newest other run differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from mpoe.config import ConfigError, TrainConfig, derive
from mpoe.train.checkpoint import store as checkpoint
from mpoe.train.compose import CONF_DIR
from mpoe.train.run_keys import flatten, in_resume_identity

RESTART_COUNTS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
DEFAULT_RUN_DIR = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"
# The keys that fix a checkpoint's tensor shapes: a model built with another value cannot load its weights.
SHAPE_KEYS = (
    "model.family",
    "model.pretrained",
    "model.d_model",
    "model.d_ff",
    "model.num_layers",
    "model.num_decoder_layers",
    "model.num_heads",
    "model.d_kv",
    "model.max_position_embeddings",
    "model.activation",
    "model.tie_word_embeddings",
    "moe.kind",
    "moe.num_experts",
    "moe.every",
    "moe.bond_dim",
    "moe.num_mpo_factors",
    "data.tokenizer",
    "data.vocab_size",
)
# Changed on every continuation (the way to continue, the new end): not worth a word.
_NOT_REPORTED = ("trainer.resume", "trainer.max_steps")


def _say(line: str) -> None:
    print(f"mpoe-train: {line}", flush=True)


# ---------------------------------------------------------------- restarts


def restart(environ: Mapping[str, str] = os.environ) -> Optional[tuple[str, int]]:
    """(the variable, the count) when this process is a restart of a failed one, else None."""
    for name in RESTART_COUNTS:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return name, int(value)
    return None


def override_value(args: list[str], key: str) -> Optional[str]:
    """The value the command line gives `key` (the last one wins, as in Hydra), or None when it is not there."""
    given = [a.split("=", 1)[1] for a in args if a.lstrip("+~").startswith(f"{key}=")]
    return given[-1] if given else None


def resume_given(args: list[str]) -> Optional[str]:
    """The value of `trainer.resume` on the command line, or None when it is not there."""
    return override_value(args, "trainer.resume")


def start_over_refusal(ckpt_dir: Path) -> Optional[ConfigError]:
    """trainer.resume=null into a run directory that holds checkpoints (a requeued job, the same command again):
    never train over them. The error, or None where there is nothing to protect."""
    existing = checkpoint.complete_checkpoints(ckpt_dir)
    if not existing:
        return None
    return ConfigError(
        f"{ckpt_dir} already holds checkpoints (the newest: {existing[-1].name}) and trainer.resume=null "
        "would start again from step 0 beside them: continue with trainer.resume=auto, or give a new hydra.run.dir"
    )


def check_start_over(cfg: TrainConfig, args: list[str]) -> None:
    """trainer.resume=null with a `hydra.run.dir` that holds checkpoints stops here (rank 0, before Hydra writes
    anything), so the refused run's files stay as they were."""
    given = _run_dir_given(args)
    if cfg.trainer.resume is not None or given is None or "${" in given:
        return
    refusal = start_over_refusal(Path(given).expanduser().absolute() / "checkpoints")
    if refusal is not None:
        raise refusal


def on_restart(cfg: TrainConfig, args: list[str], environ: Mapping[str, str] = os.environ) -> TrainConfig:
    """The config a worker trains: on a restart whose command line does not name trainer.resume, `cfg` with
    trainer.resume=auto; else `cfg`. Rank 0 says what a restart does, in one line."""
    restarted = restart(environ)
    if restarted is None:
        return cfg
    name, count = restarted
    given = resume_given(args)
    speak = environ.get("RANK", "0") == "0"
    if given is None:
        if speak:
            _say(
                f"restart {count} ({name}={count}): continuing from the run's last complete checkpoint "
                "(as trainer.resume=auto does)"
            )
        return derive(cfg, trainer=derive(cfg.trainer, resume="auto"))
    if cfg.trainer.resume is None and speak:
        _say(
            f"restart {count} ({name}={count}) with trainer.resume=null: not resuming, as asked (refused where the "
            "run directory holds checkpoints)"
        )
    return cfg


# ---------------------------------------------------------------- configs of runs


def outputs_root(run_dir_pattern: str = DEFAULT_RUN_DIR) -> Path:
    """The fixed head of Hydra's run-dir pattern: `outputs` for `outputs/${now:...}/${now:...}`."""
    head = run_dir_pattern.split("${", 1)[0].rstrip("/")
    return Path(head or ".").expanduser().absolute()


def identity(config: dict) -> dict:
    return {k: json.dumps(v, sort_keys=True) for k, v in flatten(config).items() if in_resume_identity(k)}


def stored_config(run_dir: Path) -> Optional[dict]:
    """The config a run directory was last started with (`.hydra/config.yaml`), its interpolations resolved
    where they can be (`${moe.kind}`; Hydra's own, `${hydra:...}`, stay as written)."""
    try:
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except Exception:  # an interpolation only Hydra's running app resolves: compare as written
        return config


def changes(old: dict, new: dict, keys=lambda key: True) -> list[str]:
    """`key: old -> new` for every flattened key that `keys` accepts and whose value differs."""
    a, b = flatten(old), flatten(new)
    return [
        f"{k}: {_show(a.get(k))} -> {_show(b.get(k))}"
        for k in sorted(set(a) | set(b))
        if keys(k) and json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)
    ]


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _as_dict(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


@dataclass
class Survey:
    """What `trainer.resume=auto` found under the outputs root."""

    found: Optional[Path]  # the run of this identity with the newest complete checkpoint
    looked: int  # run directories looked at
    other: Optional[Path] = None  # failing that: the run with the newest checkpoint, of another identity
    other_config: Optional[dict] = None


def survey(config: dict, root: Path) -> Survey:
    want = identity(config)
    best = Survey(None, 0)
    best_time, other_time = -1.0, -1.0
    if not root.is_dir():
        return best
    for hydra_dir in root.glob("**/.hydra"):
        run_dir = hydra_dir.parent
        best.looked += 1
        found = checkpoint.complete_checkpoints(run_dir / "checkpoints")
        stored = stored_config(run_dir) if found else None
        if stored is None:
            continue
        when = (found[-1] / "meta.json").stat().st_mtime
        if identity(stored) == want:
            if when > best_time:
                best.found, best_time = run_dir, when
        elif when > other_time:
            best.other, best.other_config, other_time = run_dir, stored, when
    return best


def find_run(config: dict, root: Path) -> tuple[Optional[Path], int]:
    """(the run of `config` under `root` with the newest complete checkpoint or None, runs looked at)."""
    s = survey(config, root)
    return s.found, s.looked


# ---------------------------------------------------------------- checks of the checkpoint to resume


def checkpoint_identity(cfg: TrainConfig) -> dict:
    """What a checkpoint must share with the run that resumes it (its layout may differ: it is resharded)."""
    return {"model": cfg.model.name, "moe": cfg.moe.kind, "num_experts": cfg.moe.num_experts}


def _check_shapes(cfg: TrainConfig, run_dir: Path, asked: str) -> None:
    """The settings that fix the tensor shapes of `run_dir`'s checkpoints, as that run was started with them,
    equal this run's (CheckpointError naming the first that differs)."""
    stored = stored_config(run_dir)
    if stored is None:
        return  # a checkpoint outside its run directory: loading it says which tensor does not fit
    old, new = flatten(stored), flatten(_as_dict(cfg))
    for key in SHAPE_KEYS:
        if key in old and key in new and json.dumps(old[key]) != json.dumps(new[key]):
            raise checkpoint.CheckpointError(
                f"trainer.resume={asked}: the checkpoints of {run_dir} were trained with {key}={_show(old[key])}, "
                f"this run has {key}={_show(new[key])}, a shape they fix: resume with {key}={_show(old[key])}, "
                "or start a new run (another hydra.run.dir, without trainer.resume)"
            )


def check_resume_path(cfg: TrainConfig) -> None:
    """`trainer.resume=PATH`: a complete, readable checkpoint of this model, checked before any setup."""
    resume = cfg.trainer.resume
    if resume is None or resume == "auto":
        return
    path = checkpoint.resolve(resume, Path(resume))
    meta = checkpoint.read_meta(path)
    for key, value in checkpoint_identity(cfg).items():
        if meta.get(key) != value:
            raise checkpoint.CheckpointError(
                f"trainer.resume={resume!r}: checkpoint {path} was saved with {key}={meta.get(key)!r}, this run has "
                f"{key}={value!r}: resume with the same setting"
            )
    reason = checkpoint.unreadable(path)
    if reason is not None:
        earlier, _ = checkpoint.newest_readable(path.parent)
        other = f"an earlier one ({earlier})" if earlier is not None and earlier != path else "another checkpoint"
        raise checkpoint.CheckpointError(
            f"trainer.resume={resume!r}: checkpoint {path} cannot be read: {reason}: give {other}"
        )
    if path.parent.name == "checkpoints":
        _check_shapes(cfg, path.parent.parent, repr(resume))


def _run_dir_given(args: list[str]) -> Optional[str]:
    return override_value(args, "hydra.run.dir")


def _continue_in(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint of `run_dir` that `auto` resumes, checked (readable, same shapes) and said; None: none."""
    newest, skipped = checkpoint.newest_readable(run_dir / "checkpoints")
    if newest is None and not skipped:
        _say(f"trainer.resume=auto: no checkpoint in {run_dir / 'checkpoints'}: starting from step 0")
        return None
    checkpoint.resolve("auto", run_dir / "checkpoints")  # none readable: its one line
    _check_shapes(cfg, run_dir, "auto")
    if skipped:
        unread = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
        _say(f"trainer.resume=auto: {unread}: continuing from {newest.name}, the newest checkpoint that can be read")
    return newest


def auto_resume_run_dir(cfg: TrainConfig, args: list[str]) -> list[str]:
    """`trainer.resume=auto` (rank 0, before Hydra starts): the run it continues, checked and said in one line;
    returns the override that points Hydra at that run when `hydra.run.dir` was not given."""
    if cfg.trainer.resume != "auto":
        return []
    given = _run_dir_given(args)
    if given is not None and "${" in given:
        return []  # a pattern: the directory is known once Hydra has made it
    config = _as_dict(cfg)
    run_dir = Path(given).expanduser().absolute() if given is not None else _find_under_outputs(config)
    if run_dir is None or _continue_in(cfg, run_dir) is None:
        return []
    stored = stored_config(run_dir)
    changed = changes(stored, config, lambda k: k not in _NOT_REPORTED) if stored is not None else []
    _say(f"trainer.resume=auto: continuing {run_dir}" + (f" with {'; '.join(changed)}" if changed else ""))
    return [f"hydra.run.dir={run_dir}"] if given is None else []


def _find_under_outputs(config: dict) -> Optional[Path]:
    """The run `auto` continues when no hydra.run.dir is given; None (said, with the key that made the newest
    other run differ) when there is none."""
    pattern = yaml.safe_load((Path(CONF_DIR) / "train.yaml").read_text())["hydra"]["run"]["dir"]
    root = outputs_root(pattern)
    s = survey(config, root)
    if s.found is None:
        why = ""
        if s.other is not None:
            differ = changes(s.other_config, config, in_resume_identity)
            why = f"; the newest other, {s.other}, differs in {', '.join(differ[:3]) or 'its keys'}"
        _say(
            f"trainer.resume=auto: no run of this config with a checkpoint under {root} "
            f"({s.looked} run(s) looked at{why}): starting a new run"
        )
    return s.found
