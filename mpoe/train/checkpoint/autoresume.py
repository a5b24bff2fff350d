"""Resuming, decided before any setup: `trainer.resume=PATH` checked, `trainer.resume=auto` given its run.

A wrong resume path used to fail after model and engine setup; `check_resume_path`
reads the checkpoint's meta.json first.

`trainer.resume=auto` without `hydra.run.dir`: find the run to continue under the outputs root.

Hydra gives every run a new timestamped directory, so `resume=auto` on its own
looked for checkpoints in a directory made a moment ago, found none, and
trained from step 0 with exit code 0. Before Hydra starts, `find_run` looks
under the outputs root (the part of `hydra.run.dir`'s pattern before its first
`${...}`, `outputs/` by default) for runs of the same configuration that hold
a complete checkpoint, and picks the one whose newest checkpoint is newest.
"Same configuration" is the composed config minus what cannot change the
numbers (the keys `mpoe-report` ignores) and minus `trainer.max_steps`, so a
run can be continued past its end. The seed is the exception: the report
averages over seeds, but a run continued under another seed would take the
other seed's batches after its own RNG state, so a seed sweep with
`resume=auto` would have its repeats continue one another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mpoe.config import TrainConfig
from mpoe.train.checkpoint.store import complete_checkpoints
from mpoe.train.run_keys import flatten, is_ignored

IGNORED_FOR_RESUME = ("trainer.max_steps",)
KEPT_FOR_RESUME = ("trainer.seed",)
DEFAULT_RUN_DIR = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"


def outputs_root(run_dir_pattern: str = DEFAULT_RUN_DIR) -> Path:
    """The fixed head of Hydra's run-dir pattern: `outputs` for `outputs/${now:...}/${now:...}`."""
    head = run_dir_pattern.split("${", 1)[0].rstrip("/")
    return Path(head or ".").expanduser().absolute()


def identity(config: dict) -> dict:
    return {
        k: json.dumps(v, sort_keys=True)
        for k, v in flatten(config).items()
        if (not is_ignored(k) or k in KEPT_FOR_RESUME) and k not in IGNORED_FOR_RESUME
    }


def _stored_config(run_dir: Path) -> Optional[dict]:
    import yaml

    try:
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def find_run(config: dict, root: Path) -> tuple[Optional[Path], int]:
    """(the run of `config` under `root` with the newest complete checkpoint or None, runs looked at)."""
    want = identity(config)
    best, best_time, looked = None, -1.0, 0
    if not root.is_dir():
        return None, 0
    for hydra_dir in root.glob("**/.hydra"):
        run_dir = hydra_dir.parent
        looked += 1
        found = complete_checkpoints(run_dir / "checkpoints")
        stored = _stored_config(run_dir) if found else None
        if stored is None or identity(stored) != want:
            continue
        when = (found[-1] / "meta.json").stat().st_mtime
        if when > best_time:
            best, best_time = run_dir, when
    return best, looked


def check_resume_path(cfg: TrainConfig) -> None:
    """`trainer.resume=PATH`: a complete checkpoint of this model, checked before any setup (CheckpointError)."""
    from mpoe.train.checkpoint import store as checkpoint

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


def checkpoint_identity(cfg: TrainConfig) -> dict:
    """What a checkpoint must share with the run that resumes it (its layout may differ: it is resharded)."""
    return {"model": cfg.model.name, "moe": cfg.moe.kind, "num_experts": cfg.moe.num_experts}


def auto_resume_run_dir(cfg: TrainConfig, args: list[str]) -> list[str]:
    """`trainer.resume=auto` without hydra.run.dir: the override that points Hydra at the run to continue."""
    if cfg.trainer.resume != "auto" or any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        return []
    import yaml
    from omegaconf import OmegaConf

    from mpoe.train.main import CONF_DIR

    pattern = yaml.safe_load((Path(CONF_DIR) / "train.yaml").read_text())["hydra"]["run"]["dir"]
    root = outputs_root(pattern)
    found, looked = find_run(OmegaConf.to_container(OmegaConf.structured(cfg)), root)
    if found is None:
        print(
            f"mpoe-train: trainer.resume=auto: no run of this config with a checkpoint under {root} "
            f"({looked} run(s) looked at): starting a new run",
            flush=True,
        )
        return []
    print(f"mpoe-train: trainer.resume=auto: continuing {found}", flush=True)
    return [f"hydra.run.dir={found}"]
