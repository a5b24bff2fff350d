"""`mpoe-train -m ...`: every job of a sweep composed and validated before the first one starts, then each run.

Hydra's BasicSweeper composes a job's config only when its turn comes, so a bad
value in job 1 would surface only after job 0 had trained to the end. Here the jobs
are expanded as BasicSweeper expands them (the config's `hydra.sweeper.params`, an
experiment's sweep, first; the command line's after), each is composed as
BasicLauncher composes it and validated once, and only then are they run, one
after another, each in its sweep subdirectory as BasicLauncher runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.callbacks import Callbacks
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import configure_log, filter_overrides, run_job
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from mpoe.config import ConfigError, TrainConfig
from mpoe.train.compose import check_added_keys, compose, one_line_error, to_train_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One job of a sweep: its overrides, its composed config (Hydra's node included) and that config validated."""

    number: int
    overrides: list[str]
    composed: DictConfig
    cfg: TrainConfig


def expand(master: DictConfig, config_loader=None) -> list[list[str]]:
    """The overrides of every job, in BasicSweeper's order."""
    # Unresolved, as Hydra's sweeper reads them: an override may interpolate what each job resolves for itself
    # (`${hydra:runtime.choices.X}`), which the sweep's own config cannot.
    params = master.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    task = OmegaConf.to_container(master.hydra.overrides.task, resolve=False)
    parser = OverridesParser.create(config_loader=config_loader)  # with it, glob(*) lists a group's options
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
    return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


def compose_jobs(
    hydra, config_name: str, overrides: list[str], world_size: int, check: Callable[[TrainConfig], None]
) -> tuple[DictConfig, list[Job]]:
    """(the sweep's own config, its jobs), each job composed, validated and `check`ed; a ConfigError names the
    job that fails."""
    check_added_keys(overrides)  # wrong for every job: said once, without a job number
    master = compose(hydra, config_name, overrides, RunMode.MULTIRUN)
    _check_basic_plugins(master)
    try:
        # Resolved now, so that every job copies this timestamp (load_sweep_config copies the resolver cache).
        str(master.hydra.sweep.dir)
        expanded = expand(master, hydra.config_loader)
    except Exception as e:  # Hydra's parser raises many kinds; all are bad input here
        raise ConfigError(one_line_error(e)) from None
    jobs = [_compose_job(hydra, master, n, job, len(expanded), world_size, check) for n, job in enumerate(expanded)]
    return master, jobs


def _check_basic_plugins(master: DictConfig) -> None:
    """The jobs are expanded and run here as Hydra's basic sweeper and launcher would; another plugin (joblib,
    submitit, optuna) would be ignored, so it is refused."""
    for kind, basic in (("sweeper", "BasicSweeper"), ("launcher", "BasicLauncher")):
        target = str(master.hydra[kind].get("_target_", ""))
        if not target.endswith(basic):
            raise ConfigError(
                f"hydra/{kind}={target}: mpoe-train -m runs a sweep with Hydra's basic {kind} only (validating "
                f"every job first); drop the hydra/{kind} override, or launch the jobs one by one"
            )


def _compose_job(hydra, master, number: int, overrides: list[str], of: int, world_size: int, check) -> Job:
    try:
        try:
            composed = hydra.config_loader.load_sweep_config(master, overrides)
        except Exception as e:  # as in compose(): every kind is bad input
            raise ConfigError(one_line_error(e)) from None
        with open_dict(composed):
            composed.hydra.job.id = number
            composed.hydra.job.num = number
        cfg = to_train_config(composed, world_size)
        check(cfg)
    except ConfigError as e:
        shown = " ".join(o for o in overrides if not o.lstrip("+~").startswith("hydra"))
        raise ConfigError(f"sweep job {number} of {of} ({shown}): {e}") from None
    return Job(number, overrides, composed, cfg)


def run_jobs(hydra, config_name: str, master: DictConfig, jobs: list[Job], train: Callable) -> None:
    """Each job in its sweep subdirectory, one after another: `train(cfg, job_config)` inside Hydra's `run_job`
    (which writes the job's `.hydra/` and log). A job's unexpected exception stops the sweep, as in Hydra."""
    configure_log(master.hydra.hydra_logging, master.hydra.verbose)
    sweep_dir = Path(str(master.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(master, sweep_dir / "multirun.yaml")
    callbacks = Callbacks(master)
    callbacks.on_multirun_start(config=master, config_name=config_name)
    context = HydraContext(config_loader=hydra.config_loader, callbacks=callbacks)
    log.info(f"Launching {len(jobs)} jobs locally")
    for job in jobs:
        log.info(f"\t#{job.number} : {' '.join(filter_overrides(job.overrides))}")
        result = run_job(
            task_function=lambda job_cfg, cfg=job.cfg: train(cfg, job_cfg),
            config=job.composed,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
            hydra_context=context,
        )
        configure_log(master.hydra.hydra_logging, master.hydra.verbose)
        _ = result.return_value  # raises what the job raised
    callbacks.on_multirun_end(config=master, config_name=config_name)
