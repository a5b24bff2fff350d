"""The one config entry: Hydra composes `conf/train.yaml` with the overrides once, and the result is validated
once into a read-only `TrainConfig`.

The composed config (Hydra's own `hydra` node included) is what `run_job` writes to
the run's `.hydra/` and what the run trains from, so nothing is composed a second
time. Hydra's config loader is used directly, with the overrides passed as a list:
`mpoe-train` never rewrites `sys.argv`. A composition or validation failure is a
`ConfigError` whose message is one line naming the key, the value and the fix.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from hydra import version
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mpoe.config import ConfigError, TrainConfig, validate

# The configs ship inside the package, so `pip install .` and a wheel find them from any directory.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CONFIG_NAME = "train"
TASK_NAME = "main"  # Hydra's job name: the run's log file is main.log
VERSION_BASE = "1.3"  # Hydra's defaults of this version (no chdir into the run directory, among others)


def setup_hydra() -> None:
    """What `hydra.main` sets up before it composes: the version whose defaults apply, and the schema that
    conf/train.yaml's defaults list starts with (`train_schema`: the typed dataclasses, which Hydra checks every
    key and type against)."""
    version.setbase(VERSION_BASE)
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


@contextlib.contextmanager
def hydra_app(
    config_path: Optional[str] = None, config_dir: Optional[str] = None, config_name: Optional[str] = None
) -> Iterator[tuple]:
    """(Hydra, config name) for the package's configs, as `hydra.main` would make them (`--config-path`,
    `--config-dir` and `--config-name` honoured); Hydra's global state is cleared on the way out."""
    setup_hydra()
    search_path = create_automatic_config_search_path(None, __name__, config_path or CONF_DIR)
    if config_dir is not None:
        if not os.path.isdir(config_dir):
            raise ConfigError(f"--config-dir {config_dir!r} is not a directory: give a folder of config files")
        extra = f"file://{os.path.abspath(config_dir)}"
        search_path.prepend(provider="command-line", path=extra, anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        yield Hydra.create_main_hydra2(task_name=TASK_NAME, config_search_path=search_path), config_name or CONFIG_NAME
    finally:
        GlobalHydra.instance().clear()


def compose(hydra, config_name: str, overrides: list[str], mode: RunMode = RunMode.RUN) -> DictConfig:
    """The config with its `hydra` node, as Hydra's own run (RUN) or sweep (MULTIRUN) composes it."""
    try:
        return hydra.compose_config(config_name, overrides + [f"hydra.mode={mode.name}"], run_mode=mode)
    except Exception as e:  # Hydra and OmegaConf raise many kinds; all are bad input here
        raise ConfigError(one_line_error(e)) from None


def job_config(composed: DictConfig) -> DictConfig:
    """The job's part of a composed config (what `.hydra/config.yaml` holds): without the `hydra` node."""
    job = copy.deepcopy(composed)
    with read_write(job), open_dict(job):
        del job["hydra"]
    return job


def to_train_config(composed: DictConfig, world_size: int) -> TrainConfig:
    """The composed config as typed dataclasses, validated for `world_size` processes: read-only from here on."""
    # Values may interpolate Hydra's own (${hydra:runtime.choices.X}): resolve them as the run will.
    HydraConfig.instance().set_config(composed)
    try:
        cfg = OmegaConf.to_object(job_config(composed))
    except Exception as e:  # OmegaConf raises many kinds on a wrong type or key; all are bad input here
        raise ConfigError(one_line_error(e)) from None
    return validate(cfg, world_size)


def compose_and_validate(overrides: list[str], world_size: int) -> TrainConfig:
    """`mpoe-train OVERRIDES`'s config, composed and validated as the run would (ConfigError on failure)."""
    overrides = normalize_overrides(overrides)
    check_added_keys(overrides)
    with hydra_app() as (hydra, config_name):
        return to_train_config(compose(hydra, config_name, overrides), world_size)


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


def one_line_error(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep the key, the value and the options."""
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
