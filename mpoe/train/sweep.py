"""`mpoe-train -m ...`: every job of a sweep composed and validated before the first one starts.

Hydra composes a sweep job's config only when its turn comes, so a bad value in
job 1 used to surface after job 0 had trained to the end, and a misspelled key
got Hydra's multi-line message instead of mpoe-train's one line. The jobs are
expanded here exactly as Hydra's BasicSweeper will run them.
"""

from __future__ import annotations

from mpoe.config import ConfigError


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of every job of `mpoe-train -m ...`, expanded by Hydra's BasicSweeper as it will run them
    (the config's `hydra.sweeper.params`, an experiment's sweep, first; the command line's after)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mpoe.train.main import CONF_DIR, _one_line, _register_schema

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
    from mpoe.train import pretrained
    from mpoe.train.checkpoint import autoresume
    from mpoe.train.main import check_added_keys, compose_and_validate, normalize_overrides

    overrides = normalize_overrides(overrides)
    check_added_keys(overrides)  # wrong for every job: said once, without a job number
    jobs = sweep_jobs(overrides)
    for number, job in enumerate(jobs):
        try:
            cfg = compose_and_validate(job, world_size)
            check_precision_supported(cfg.trainer.precision)
            pretrained.check(cfg)
            autoresume.check_resume_path(cfg)
        except ConfigError as e:
            shown = " ".join(o for o in job if not o.lstrip("+~").startswith("hydra"))
            raise ConfigError(f"sweep job {number} of {len(jobs)} ({shown}): {e}") from None
    return len(jobs)
