"""`mpoe-train [hydra overrides]` (= `python -m mpoe.train`): the one entry point.

Order of events, so that bad input costs nothing and a refused start changes
nothing: the config is composed once and validated once (mpoe.train.compose; a
one-line error naming key, value and fix, exit code 2, printed by rank 0 only
under torchrun); the files and hardware it needs are checked, and where the run
writes and what it resumes is decided; only then does Hydra write the run
directory (`.hydra/`, main.log), and the job start the process group and train.
Under torchrun every rank runs this; rank 0's run directory is broadcast so all
ranks write checkpoints to the same place, and the other ranks' Hydra writes
nothing. `-m` runs a sweep (mpoe.train.sweep). Hydra's other commands (--cfg,
--info, --hydra-help, shell completion) are Hydra's own; --help fills Hydra's
help template.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import string
import sys
import time
from pathlib import Path
from typing import Optional

from hydra._internal.callbacks import Callbacks
from hydra._internal.utils import _run_hydra, get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log, run_job
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, read_write

from mpoe.config import ConfigError, TrainConfig
from mpoe.parallel.process_groups import world_size_from_env
from mpoe.process import configure_process, library_stdout_to_log
from mpoe.train import sweep
from mpoe.train.checkpoint import autoresume
from mpoe.train.checkpoint import store as checkpoint
from mpoe.train.compose import (
    CONF_DIR,
    CONFIG_NAME,
    check_added_keys,
    compose,
    hydra_app,
    job_config,
    normalize_overrides,
    setup_hydra,
    to_train_config,
)
from mpoe.train.preflight import check_before_start

log = logging.getLogger("mpoe.train")

# What ranks other than 0 add: rank 0 alone writes the run directory, and broadcasts its path.
_OTHER_RANKS = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


# How long a process that leaves an error to another one waits before it exits (see `_fail_before_start`).
_SILENT_EXIT_DELAY_S = 10.0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _fail(message: str) -> None:
    print(f"mpoe-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _fail_before_start(message: str) -> None:
    """An error met before the process group starts: every process of a launch meets it, so the first process
    of each node (LOCAL_RANK 0; rank 0 on one node) says it, once in each node's log, and all exit with 2. The
    others wait a moment first, so that the one that speaks exits first and torchrun, which then stops the rest,
    reports it as the root cause."""
    if int(os.environ.get("LOCAL_RANK", _rank())) == 0:
        _fail(message)
    time.sleep(_SILENT_EXIT_DELAY_S)
    sys.exit(2)


def cli(argv: Optional[list[str]] = None) -> None:
    configure_process()
    parser = get_args_parser()  # Hydra's own flags: --help, --cfg, -m, --config-dir, ...
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.overrides = normalize_overrides(args.overrides)
    shows = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.resolve
    if shows or (args.run and args.multirun):
        _command(args, parser)
        return
    try:
        with hydra_app(args.config_path, args.config_dir, args.config_name) as (hydra, config_name):
            if args.multirun:
                _sweep(hydra, config_name, args.overrides)
            else:
                _run(hydra, config_name, args.overrides)
    except (ConfigError, checkpoint.CheckpointError) as e:
        _fail_before_start(str(e))


def _command(args, parser) -> None:
    """--help here; Hydra's other commands (--cfg, --info, --hydra-help, shell completion) as Hydra runs them."""
    try:
        if args.help:
            with hydra_app(args.config_path, args.config_dir, args.config_name) as (hydra, config_name):
                print(help_text(hydra, compose(hydra, config_name, args.overrides), parser, args.resolve))
            return
        setup_hydra()
        _run_hydra(args=args, args_parser=parser, task_function=train, config_path=CONF_DIR, config_name=CONFIG_NAME)
    except (ConfigError, ValueError) as e:  # Hydra's ValueError: flags that do not go together, in one line
        _fail(str(e))


def help_text(hydra, composed: DictConfig, parser, resolve: bool = False) -> str:
    """Hydra's help template (conf/train.yaml's hydra.help) with the config groups in two lists: those of the
    defaults list, chosen with `group=option` ($APP_CONFIG_GROUPS), and the others, which an override must add
    with `+group=option` ($ADDED_CONFIG_GROUPS; Hydra's own help lists them among the first)."""
    chosen = set(composed.hydra.runtime.choices)
    ours = lambda group: not (group == "hydra" or group.startswith("hydra/"))
    added = hydra.format_config_groups(lambda g: ours(g) and g not in chosen)
    return string.Template(composed.hydra.help.template).substitute(
        FLAGS_HELP=hydra.format_args_help(parser),
        HYDRA_CONFIG_GROUPS=hydra.format_config_groups(lambda g: not ours(g)),
        APP_CONFIG_GROUPS=hydra.format_config_groups(lambda g: ours(g) and g in chosen),
        ADDED_CONFIG_GROUPS="".join(f"+{line}\n" for line in added.splitlines()),
        CONFIG=OmegaConf.to_yaml(job_config(composed), resolve=resolve),
    )


def _for_this_rank(overrides: list[str]) -> list[str]:
    if _rank() == 0:
        return overrides
    return [o for o in overrides if not o.startswith("hydra.run.dir=")] + _OTHER_RANKS


def _run(hydra, config_name: str, overrides: list[str]) -> None:
    """One run: composed, validated and checked; how it resumes decided; then Hydra's `run_job` runs `train`."""
    check_added_keys(overrides)
    composed = compose(hydra, config_name, _for_this_rank(overrides))
    cfg = to_train_config(composed, world_size_from_env())
    cfg = autoresume.on_restart(cfg, overrides)  # torchrun/SLURM restarted this worker: it continues its run
    check_before_start(cfg)
    _decide_resume(cfg, composed, overrides)
    configure_log(composed.hydra.hydra_logging, composed.hydra.verbose)  # as Hydra's own run does
    callbacks = Callbacks(composed)
    callbacks.on_run_start(config=composed, config_name=config_name)
    result = run_job(
        task_function=lambda job_cfg: train(cfg, job_cfg),
        config=composed,
        job_dir_key="hydra.run.dir",
        job_subdir_key=None,
        hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
    )
    callbacks.on_run_end(config=composed, config_name=config_name, job_return=result)
    _ = result.return_value  # raises what the job raised


def _sweep(hydra, config_name: str, overrides: list[str]) -> None:
    world = world_size_from_env()
    master, jobs = sweep.compose_jobs(hydra, config_name, _for_this_rank(overrides), world, check_before_start)
    sweep.run_jobs(hydra, config_name, master, jobs, train)


def _decide_resume(cfg: TrainConfig, composed: DictConfig, overrides: list[str]) -> None:
    """How this run resumes, decided by rank 0 before Hydra writes anything into the run directory, so that a
    refused resume (one line) leaves an existing run as it was: `trainer.resume=auto` without `hydra.run.dir`
    gets the run it continues, with it the run's checkpoint is checked (mpoe.train.checkpoint.autoresume)."""
    if _rank() > 0:
        return  # rank 0 decides; the loop broadcasts what it resumes
    autoresume.check_start_over(cfg, overrides)
    found = autoresume.auto_resume_run_dir(cfg, overrides)
    if found:  # the override `hydra.run.dir=RUN` that points Hydra at the run to continue
        with read_write(composed.hydra.run):
            composed.hydra.run.dir = found[0].split("=", 1)[1]


def train(cfg: TrainConfig, job_cfg: DictConfig) -> None:
    """The job Hydra runs in its run directory: the process group, the training, the lines that end it."""
    # Deferred: the training stack imports DeepSpeed and transformers (seconds), which --help, --cfg and a
    # config error never need.
    import torch.distributed as dist
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mpoe.parallel.collectives import host_broadcast
    from mpoe.parallel.process_groups import init_distributed
    from mpoe.train.loop import NonFiniteLossError, run
    from mpoe.train.runtime import console, interrupt, threads

    log.info(threads.fit_threads())
    try:
        with library_stdout_to_log():  # DeepSpeed prints its op builds
            init_distributed(cfg.parallel.backend)  # under NCCL, also picks this process's GPU
    except ConfigError as e:  # no process group (no GPU for NCCL, ...): as a config error, nothing ran
        _fail_before_start(_unstarted(str(e), Path(HydraConfig.get().runtime.output_dir)))
    shared = [HydraConfig.get().runtime.output_dir]
    host_broadcast(shared)
    run_dir, overrides = Path(shared[0]), list(HydraConfig.get().overrides.task)
    is_rank0 = dist.get_rank() == 0
    log.info(console.config_summary(cfg, dist.get_world_size(), run_dir))
    try:
        # Log lines go above the progress bar, also those of libraries with their own console handler.
        libraries = [logging.getLogger(name) for name in ("DeepSpeed", "transformers")]
        with interrupt.stop_on_signals(), logging_redirect_tqdm(loggers=[logging.root, *libraries]):
            summary = run(cfg, run_dir, OmegaConf.to_container(job_cfg, resolve=True))
    except (ConfigError, checkpoint.CheckpointError, NonFiniteLossError) as e:
        _fail(_unstarted(str(e), run_dir) if isinstance(e, ConfigError) else str(e))
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


def _unstarted(message: str, run_dir: Path) -> str:
    """The error of a run that stopped on bad input, and, where rank 0 removed its directory (nothing had run in
    it), that it is gone: the config line named it."""
    if _rank() == 0 and _remove_unstarted_run_dir(run_dir):
        return f"{message} (run directory {run_dir} removed: no step had run)"
    return message


def _remove_unstarted_run_dir(run_dir: Path) -> bool:
    """A run that stopped on bad input (data that cannot be read, too little of it) before its first step leaves
    no directory behind, where mpoe-report would list it as unfinished: there is nothing in it to keep.
    Returns whether it removed it."""
    metrics = run_dir / "metrics.jsonl"
    ours = {".hydra", "main.log", "metrics.jsonl", "wandb", ".wandb_id"}  # what a run makes before its first step
    if not run_dir.is_dir() or any(p.name not in ours for p in run_dir.iterdir()):
        return False  # a checkpoint, a summary, or files that are not ours (hydra.run.dir=an existing folder): keep
    if metrics.is_file() and metrics.stat().st_size > 0:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # Hydra's outputs/DATE and outputs/, when this was their only run
        run_dir.parent.rmdir()
        run_dir.parent.parent.rmdir()
    return True


if __name__ == "__main__":
    cli()
