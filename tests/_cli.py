"""Run `mpoe-train` (or torchrun over it) as a user would, and read its run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

# Small enough for 2 CPU cores: a few steps, few validation batches, no progress bar.
FAST = [
    "trainer.max_steps=4",
    "trainer.log_every=1",
    "trainer.eval_every=4",
    "trainer.eval_batches=2",
    "trainer.seq_len=64",
    "logging.progress=false",
]


def env(cache: str) -> dict:
    """CPU runs, also on a GPU machine: CUDA stays visible, DeepSpeed runs on its CPU accelerator and the process
    group follows it (gloo: `mpoe.parallel.process_groups.default_backend`), as a user's DS_ACCELERATOR=cpu run
    would."""
    e = dict(os.environ, MPOE_CACHE=cache, DS_ACCELERATOR="cpu", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    e.pop("WANDB_MODE", None)
    return e


def train(
    run_dir: Path,
    cache: str,
    *overrides: str,
    nproc: int = 1,
    timeout: int = 400,
    check: bool = True,
    fast: bool = True,
    environment: Optional[dict] = None,
) -> subprocess.CompletedProcess:
    """`mpoe-train` (under torchrun when nproc > 1) with FAST's small settings unless fast=False, in `env(cache)`
    unless an `environment` is given. With FAST, W&B is off unless `logging.wandb.mode` is given: its offline
    run (a service process, files) costs each launch seconds; the tests of what it writes ask for it."""
    wandb = [] if any(o.startswith("logging.wandb.mode=") for o in overrides) else ["logging.wandb.mode=disabled"]
    args = [f"hydra.run.dir={run_dir}", *(FAST + wandb if fast else []), *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "mpoe.train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "mpoe.train",
            *args,
        ]
    proc = subprocess.run(cmd, env=environment or env(cache), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
