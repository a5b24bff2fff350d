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
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    _register_schema()
    overrides = normalize_overrides(overrides)
    check_added_keys(overrides)
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose("train", overrides=plain, return_hydra_config=True)
        # Values may interpolate Hydra's own (${hydra:runtime.choices.X}): resolve them as Hydra's run will.
        HydraConfig.instance().set_config(composed)
        with open_dict(composed):
            del composed["hydra"]
        cfg = OmegaConf.to_object(composed)
    except Exception as e:  # Hydra and OmegaConf raise many kinds; all are bad input here
        raise ConfigError(_one_line(e)) from None
    return validate(cfg, world_size)


def _task(dict_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mpoe.parallel.engine import check_precision_supported
    from mpoe.train import pretrained

    world = world_size_from_env()
    try:
        cfg = validate(OmegaConf.to_object(dict_cfg), world)
        check_precision_supported(cfg.trainer.precision)  # again: a sweep job's config is composed here
        pretrained.check(cfg)
    except ConfigError as e:
        _fail(str(e))
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mpoe.parallel.groups import init_distributed
    from mpoe.process import library_stdout_to_log
    from mpoe.train.checkpoint import store as checkpoint
    from mpoe.train.loop import NonFiniteLossError, run
    from mpoe.train.runtime import console, interrupt, threads

    log.info(threads.fit_threads())
    try:
        with library_stdout_to_log():  # DeepSpeed prints its op builds
            init_distributed(cfg.parallel.backend)  # under NCCL, also picks this process's GPU
    except ConfigError as e:
        _fail(str(e))
    import torch.distributed as dist

    from mpoe.parallel.collectives import host_broadcast

    shared = [HydraConfig.get().runtime.output_dir]
    host_broadcast(shared)
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
    from mpoe.train import pretrained, sweep
    from mpoe.train.checkpoint import autoresume
    from mpoe.train.checkpoint.store import CheckpointError

    if multirun and runs:
        try:  # every job, before the first starts (Hydra would compose each only when its turn comes)
            sweep.validate_sweep([a for a in args if a not in ("-m", "--multirun")], world_size_from_env())
        except (ConfigError, CheckpointError) as e:
            _fail(str(e))
    elif runs:
        from mpoe.parallel.engine import check_precision_supported

        try:
            cfg = compose_and_validate(args, world_size_from_env())
            check_precision_supported(cfg.trainer.precision)  # before Hydra makes a run directory
            pretrained.check(cfg)
            autoresume.check_resume_path(cfg)
            if int(os.environ.get("RANK", "0")) == 0:
                args = args + autoresume.auto_resume_run_dir(cfg, args)
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
