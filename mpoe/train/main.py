"""`mpoe-train [hydra overrides]` (= `python -m mpoe.train`): the one entry point.

Order of events, so that bad input costs nothing: compose and validate the
config (a one-line error naming key, value and fix, exit code 2); then start
the process group; then train. Under torchrun every rank runs this; rank 0's
Hydra run directory is broadcast so all ranks write checkpoints to the same
place, and the other ranks' Hydra writes nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mpoe.config import ConfigError, TrainConfig, validate
from mpoe.parallel.groups import configure_accelerator, world_size_from_env

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


def compose_and_validate(overrides: list[str], world_size: int) -> TrainConfig:
    """Compose conf/train.yaml with overrides exactly as Hydra will, and validate it (ConfigError on failure)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    _register_schema()
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose("train", overrides=plain)
        cfg = OmegaConf.to_object(composed)
    except Exception as e:  # Hydra and OmegaConf raise many kinds; all are bad input here
        raise ConfigError(_one_line(e)) from None
    return validate(cfg, world_size)


def _task(dict_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mpoe.parallel.engine import check_precision_supported

    world = world_size_from_env()
    try:
        cfg = validate(OmegaConf.to_object(dict_cfg), world)
        check_precision_supported(cfg.trainer.precision)  # again for -m sweeps, which skip cli()'s check
    except ConfigError as e:
        _fail(str(e))
    from mpoe.parallel.groups import init_distributed
    from mpoe.train import checkpoint
    from mpoe.train.loop import NonFiniteLossError, run

    try:
        init_distributed(cfg.parallel.backend)  # under NCCL, also picks this process's GPU
    except ConfigError as e:
        _fail(str(e))
    import torch.distributed as dist

    shared = [HydraConfig.get().runtime.output_dir]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    try:
        run(cfg, Path(shared[0]), OmegaConf.to_container(dict_cfg, resolve=True))
    except (ConfigError, checkpoint.CheckpointError, NonFiniteLossError) as e:
        _fail(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli() -> None:
    configure_accelerator()
    args = sys.argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    if not multirun and not any(a.split("=")[0] in _HYDRA_FLAGS_WITHOUT_RUN for a in args):
        from mpoe.parallel.engine import check_precision_supported

        try:
            cfg = compose_and_validate(args, world_size_from_env())
            check_precision_supported(cfg.trainer.precision)  # before Hydra makes a run directory
        except ConfigError as e:
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
