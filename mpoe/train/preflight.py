"""`python -m mpoe.train.preflight --world-size N [--hostfile F] -- OVERRIDES`: check before launching.

The launch scripts run it once, before any process or rendezvous starts, so a
config that cannot work on N processes (e.g. `parallel.ep_size` not dividing
the world size) or a malformed hostfile stops with one line instead of one
traceback per rank.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mpoe.config import ConfigError, TrainConfig
from mpoe.parallel.deepspeed.accelerator import check_precision_supported
from mpoe.train import pretrained
from mpoe.train.checkpoint import autoresume
from mpoe.train.checkpoint.store import CheckpointError
from mpoe.train.compose import compose_and_validate

_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


def hostfile_slots(path: str) -> dict[str, int]:
    """DeepSpeed's hostfile format: `hostname slots=N` per line, # comments; one-line ConfigError otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"hostfile {path!r} does not exist: write one line 'HOST slots=N' per node")
    slots: dict[str, int] = {}
    for number, raw in enumerate(file.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if not match or int(match.group(2)) < 1:
            raise ConfigError(f"hostfile {path}:{number} {line!r} is malformed: write 'HOST slots=N' with N >= 1")
        if match.group(1) in slots:
            raise ConfigError(f"hostfile {path}:{number} lists {match.group(1)!r} twice: one line per node")
        slots[match.group(1)] = int(match.group(2))
    if not slots:
        raise ConfigError(f"hostfile {path!r} lists no hosts: write one line 'HOST slots=N' per node")
    return slots


def check_before_start(cfg: TrainConfig, on_this_machine: bool = True) -> None:
    """What a validated config needs from the files it names (a pretrained checkpoint, a checkpoint to resume,
    a task's files) and, `on_this_machine`, from the hardware (its precision); ConfigError or CheckpointError in one
    line. A launching node checks the files only: it may not be one of the machines that train."""
    if on_this_machine:
        check_precision_supported(cfg.trainer.precision)
    pretrained.check(cfg)
    autoresume.check_resume_path(cfg)
    if cfg.data.name == "task":  # a bad task file: one line here, not one traceback per rank after the start
        # Deferred: reading local task files imports datasets/pyarrow, which other runs never need.
        from mpoe.train.data import task_data

        task_data.check(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpoe.train.preflight")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--hostfile", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        world = args.world_size
        if args.hostfile:
            world = sum(hostfile_slots(args.hostfile).values())
        # on the launching node, before any process starts: one line instead of one per rank
        check_before_start(compose_and_validate(args.overrides, world or 1), on_this_machine=False)
    except (ConfigError, CheckpointError) as e:
        print(f"mpoe-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
