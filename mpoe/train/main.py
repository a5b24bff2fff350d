"""`mpoe-train [hydra overrides]` (= `python -m mpoe.train`): the one entry point.

Order of events, so that bad input costs nothing: compose and validate the
config (a one-line error naming key, value and fix, exit code 2); then start
the process group; then train. Under torchrun every rank runs this; rank 0's
Hydra run directory is broadcast so all ranks write checkpoints to the same
place, and the other ranks' Hydra writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from mpoe.config import ConfigError, TrainConfig, validate
from mpoe.parallel.groups import world_size_from_env
from mpoe.process import configure_process

log = logging.getLogger("mpoe.train")

# The configs ship inside the package, so `pip install .` and a wheel find them from any directory.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
_HYDRA_FLAGS_WITHOUT_RUN = {
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "--version",
    "--shell-completion",
    "-sc",
}


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _fail(message: str) -> None:
    print(f"mpoe-train: error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep the key, the value and the options."""
    from hydra.errors import MissingConfigException

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, MissingConfigException):
        cause = cause.__cause__
    if isinstance(cause, MissingConfigException) and cause.options is not None:
        group = (cause.missing_cfg_file or "").split("/")[0]
        option = cause.missing_cfg_file.split("/")[-1]
        return f"{group}={option} is not a known option: use one of {', '.join(sorted(cause.options))}"
    full_key = getattr(cause, "full_key", None)
    msg = " ".join(str(getattr(cause, "msg", None) or cause).split())
    msg = msg.split(" full_key:")[0]
    if "not in" in msg and full_key:
        parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        hint = f"check the spelling; `mpoe-train --cfg job` lists {parent or 'the'} keys"
        return f"{full_key} is not a config key: {msg} ({hint})"
    return f"{full_key}: {msg}" if full_key else msg


def normalize_overrides(overrides: list[str]) -> list[str]:
    """`data.paths=a.txt` means the list `[a.txt]` (a single file is the common case; Hydra would refuse it)."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if key.lstrip("+") == "data.paths" and sep and value and not value.startswith("["):
            o = f"{key}=[{value}]"
        out.append(o)
    return out


def _schema_key_exists(key: str) -> bool:
    from omegaconf import OmegaConf

    node = OmegaConf.structured(TrainConfig)
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node[part]
    return True


def check_added_keys(overrides: list[str]) -> None:
    """`+key=value` adds a key Hydra's struct check would refuse; one that the schema lacks would be ignored."""
    for o in overrides:
        if not o.startswith("+"):
            continue
        key = o.lstrip("+").split("=", 1)[0]
        if key.startswith("hydra") or (Path(CONF_DIR) / key).is_dir() or _schema_key_exists(key):
            continue
        raise ConfigError(
            f"{o}: {key} is not a config key, so the run would ignore it "
            "(check the spelling, without '+'; `mpoe-train --cfg job` lists the keys)"
        )


def compose_and_validate(overrides: list[str], world_size: int) -> TrainConfig:
    """Compose conf/train.yaml with overrides exactly as Hydra will, and validate it (ConfigError on failure)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    _register_schema()
    overrides = normalize_overrides(overrides)
    check_added_keys(overrides)
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose("train", overrides=plain)
        cfg = OmegaConf.to_object(composed)
    except Exception as e:  # Hydra and OmegaConf raise many kinds; all are bad input here
        raise ConfigError(_one_line(e)) from None
    return validate(cfg, world_size)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of every job of `mpoe-train -m ...`, expanded by Hydra's BasicSweeper as it will run them
    (the config's `hydra.sweeper.params`, an experiment's sweep, first; the command line's after)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    _register_schema()
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose("train", overrides=fixed, return_hydra_config=True)
        params = [f"{k}={v}" for k, v in (composed.hydra.sweeper.get("params") or {}).items()]
        jobs = BasicSweeper.split_arguments(parser.parse_overrides(params + overrides), None)[0]
    except Exception as e:  # Hydra's parser and composition raise many kinds; all are bad input here
        raise ConfigError(_one_line(e)) from None
    return [list(job) for job in jobs]


def validate_sweep(overrides: list[str], world_size: int) -> int:
    """Every job of a sweep composed and validated before the first starts; returns the number of jobs."""
    from mpoe.parallel.engine import check_precision_supported

    overrides = normalize_overrides(overrides)
    check_added_keys(overrides)  # wrong for every job: said once, without a job number
    jobs = sweep_jobs(overrides)
    for number, job in enumerate(jobs):
        try:
            cfg = compose_and_validate(job, world_size)
            check_precision_supported(cfg.trainer.precision)
            check_pretrained(cfg)
            check_resume_path(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep job {number} of {len(jobs)} ({' '.join(job)}): {e}") from None
    return len(jobs)


def check_pretrained(cfg: TrainConfig) -> None:
    from mpoe.train import pretrained

    pretrained.check(cfg)


def check_resume_path(cfg: TrainConfig) -> None:
    """`trainer.resume=PATH`: a complete checkpoint of this model, checked before any setup (CheckpointError)."""
    from mpoe.train import checkpoint

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


def _auto_resume_run_dir(cfg: TrainConfig, args: list[str]) -> list[str]:
    """`trainer.resume=auto` without hydra.run.dir: the override that points Hydra at the run to continue."""
    if cfg.trainer.resume != "auto" or any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        return []
    import yaml
    from omegaconf import OmegaConf

    from mpoe.train import autoresume

    pattern = yaml.safe_load((Path(CONF_DIR) / "train.yaml").read_text())["hydra"]["run"]["dir"]
    root = autoresume.outputs_root(pattern)
    found, looked = autoresume.find_run(OmegaConf.to_container(OmegaConf.structured(cfg)), root)
    if found is None:
        print(
            f"mpoe-train: trainer.resume=auto: no run of this config with a checkpoint under {root} "
            f"({looked} run(s) looked at): starting a new run",
            flush=True,
        )
        return []
    print(f"mpoe-train: trainer.resume=auto: continuing {found}", flush=True)
    return [f"hydra.run.dir={found}"]


def _task(dict_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mpoe.parallel.engine import check_precision_supported

    world = world_size_from_env()
    try:
        cfg = validate(OmegaConf.to_object(dict_cfg), world)
        check_precision_supported(cfg.trainer.precision)  # again: a sweep job's config is composed here
        check_pretrained(cfg)
    except ConfigError as e:
        _fail(str(e))
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mpoe.parallel.groups import init_distributed
    from mpoe.process import library_stdout_to_log
    from mpoe.train import checkpoint, console, interrupt, threads
    from mpoe.train.loop import NonFiniteLossError, run

    log.info(threads.fit_threads())
    with library_stdout_to_log():  # DeepSpeed prints its op builds
        init_distributed(cfg.parallel.backend)
    import torch.distributed as dist

    shared = [HydraConfig.get().runtime.output_dir]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    run_dir, overrides = Path(shared[0]), list(HydraConfig.get().overrides.task)
    is_rank0 = dist.get_rank() == 0
    log.info(console.config_summary(cfg, dist.get_world_size(), run_dir))
    try:
        # Log lines go above the progress bar, also those of libraries with their own console handler.
        libraries = [logging.getLogger(name) for name in ("DeepSpeed", "transformers")]
        with interrupt.stop_on_signals(), logging_redirect_tqdm(loggers=[logging.root, *libraries]):
            summary = run(cfg, run_dir, OmegaConf.to_container(dict_cfg, resolve=True))
    except (ConfigError, checkpoint.CheckpointError, NonFiniteLossError) as e:
        if is_rank0 and isinstance(e, ConfigError):
            _remove_unstarted_run_dir(run_dir)
        _fail(str(e))
    except interrupt.Interrupted as stop:
        if is_rank0:
            print(console.interrupted_line(stop, run_dir, overrides), file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)  # 130 for SIGINT, 143 for SIGTERM, as the shell reports a killed process
    else:
        if is_rank0:
            console.print_run_end(summary, run_dir, overrides, cfg.trainer.max_steps)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _remove_unstarted_run_dir(run_dir: Path) -> None:
    """A run that stopped on bad input (data that cannot be read, too little of it) before its first step leaves
    no directory behind, where mpoe-report would list it as unfinished: there is nothing in it to keep."""
    metrics = run_dir / "metrics.jsonl"
    ours = {".hydra", "main.log", "metrics.jsonl", "wandb", ".wandb_id"}  # what a run makes before its first step
    if not run_dir.is_dir() or any(p.name not in ours for p in run_dir.iterdir()):
        return  # a checkpoint, a summary, or files that are not ours (hydra.run.dir=an existing folder): keep all
    if metrics.is_file() and metrics.stat().st_size > 0:
        return
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # Hydra's outputs/DATE and outputs/, when this was their only run
        run_dir.parent.rmdir()
        run_dir.parent.parent.rmdir()


def cli() -> None:
    configure_process()
    args = normalize_overrides(sys.argv[1:])
    sys.argv = [sys.argv[0], *args]
    multirun = any(a in ("-m", "--multirun") for a in args)
    runs = not any(a.split("=")[0] in _HYDRA_FLAGS_WITHOUT_RUN for a in args)
    from mpoe.train.checkpoint import CheckpointError

    if multirun and runs:
        try:  # every job, before the first starts (Hydra would compose each only when its turn comes)
            validate_sweep([a for a in args if a not in ("-m", "--multirun")], world_size_from_env())
        except (ConfigError, CheckpointError) as e:
            _fail(str(e))
    elif runs:
        from mpoe.parallel.engine import check_precision_supported

        try:
            cfg = compose_and_validate(args, world_size_from_env())
            check_precision_supported(cfg.trainer.precision)  # before Hydra makes a run directory
            check_pretrained(cfg)
            check_resume_path(cfg)
            if int(os.environ.get("RANK", "0")) == 0:
                args = args + _auto_resume_run_dir(cfg, args)
                sys.argv = [sys.argv[0], *args]
        except (ConfigError, CheckpointError) as e:
            _fail(str(e))
    if int(os.environ.get("RANK", "0")) > 0:
        # Only rank 0 writes the run directory; rank 0 broadcasts its path.
        sys.argv = (
            [sys.argv[0]]
            + [a for a in args if not a.startswith("hydra.run.dir=")]
            + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
        )
    import hydra

    _register_schema()
    hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")(_task)()


if __name__ == "__main__":
    cli()
