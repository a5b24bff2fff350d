"""What every study does with its runs: start `mpoe-train` as a stage, know a finished run, keep an unfinished one
aside, record the study's plan, export a pre-trained run as a Hugging Face checkpoint.

A stage whose run directory already holds `summary.json` is not run again, so an interrupted study continues
where it stopped; a run directory left without one is moved aside (`.incomplete-N`), never overwritten. OUT
records the study's plan (`plan.json`): a second call with a different plan stops with one line instead of
mixing two studies in one report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path


class StudyError(ValueError):
    """Bad study input; the message is one line naming the option and the fix."""


def check_common_options(plan, variant_names: tuple[str, ...]) -> None:
    """--seeds, --pretrain-steps, --steps and --variants, which every study has (StudyError, one line)."""
    if plan.seeds < 1:
        raise StudyError(f"--seeds={plan.seeds} is invalid: give at least 1")
    for key, value in (("--pretrain-steps", plan.pretrain_steps), ("--steps", plan.steps)):
        if value is not None and value < 1:
            raise StudyError(f"{key}={value} is invalid: give at least 1 step")
    unknown = [v for v in plan.variants if v not in variant_names]
    if unknown or not plan.variants:
        raise StudyError(f"--variants={','.join(plan.variants)} is invalid: use some of {','.join(variant_names)}")


def record_plan(out: Path, plan) -> None:
    """Write OUT/plan.json, or check that the study already in OUT has the same plan."""
    path = out / "plan.json"
    mine = asdict(plan)
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise StudyError(
                f"--out={out} holds a study with another plan (differs in {', '.join(differ)}): "
                "give a new --out, or the same options to continue it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1))


def _train_env() -> dict:
    env = dict(os.environ)
    env.setdefault("WANDB_SILENT", "true")
    return env


def mpoe_train(args: list[str], stage: str) -> None:
    cmd = [sys.executable, "-m", "mpoe.train", *args]
    print(f"[study] {stage}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_train_env())
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); its output is above")
    print(f"[study] {stage}: done in {time.perf_counter() - start:.0f} s", flush=True)


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def set_aside(run_dir: Path) -> None:
    """A run directory without summary.json (an interrupted run): moved aside, never overwritten."""
    if run_dir.exists() and not finished(run_dir):
        n = 1
        while run_dir.with_name(f"{run_dir.name}.incomplete-{n}").exists():
            n += 1
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{n}"))


def export_pretrained(run_dir: Path, out_dir: Path) -> Path:
    """The pre-trained run as a Hugging Face checkpoint with its tokenizer: OUT_DIR/hf."""
    hf = out_dir / "hf"
    if (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file():
        return hf
    # Deferred: transformers and the export (torch) are slow to import; only this stage needs them, not --help.
    from transformers import PreTrainedTokenizerFast

    from mpoe.tools import export
    from mpoe.train.data import sequences as data_lib

    export.export(run_dir, out_dir)
    cfg = export.config_from_yaml(run_dir / ".hydra" / "config.yaml")
    tokenizer = data_lib.prepare(cfg.data).tokenizer  # the run's own (cached) tokenizer
    eot, pad = data_lib.SPECIAL_TOKENS
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=pad
    ).save_pretrained(hf)
    print(f"[study] export: {hf}", flush=True)
    return hf
