"""What the terminal says while a run goes (a progress bar, or one line per logged step where the output is not a
terminal) and when it ends: the numbers, where the run is, and the next commands.

Without it a run would end in silence (the numbers only in summary.json), an
interrupted one in a traceback. Rank 0 prints one short block instead, built from the
run's summary, its directory and the overrides it was started with, so every
command shown works when pasted.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from mpoe.parallel.deepspeed.engine import zero_stage
from mpoe.train.runtime.interrupt import Interrupted

# Overrides that the printed commands set themselves.
_REPLACED = ("hydra.run.dir=", "trainer.resume=")


def _argv(overrides: list[str], replaced: tuple[str, ...]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+~").startswith(replaced)]


def resume_command(run_dir: Path, overrides: list[str], max_steps: Optional[int] = None) -> str:
    """`mpoe-train` with the run's own overrides that continues it from its newest checkpoint
    (to `max_steps` when given, else to the run's own)."""
    replaced = _REPLACED + (("trainer.max_steps=",) if max_steps is not None else ())
    args = _argv(overrides, replaced) + [f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    if max_steps is not None:
        args.append(f"trainer.max_steps={max_steps}")
    return shlex.join(["mpoe-train", *args])


def wandb_sync_command(run_dir: Path) -> Optional[str]:
    """`wandb sync` for the offline W&B run stored in the run directory, if there is one: every part of it (a
    resumed run writes one more offline-run folder under the same run id, and each holds its own steps)."""
    found = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    return shlex.join(["wandb", "sync", *map(str, found)]) if found else None


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run_end_lines(summary: dict, run_dir: Path, overrides: list[str], max_steps: int) -> list[str]:
    if summary.get("dry_run"):
        return [f"mpoe-train: dry run: parameter counts above, nothing trained; run directory {run_dir}"]
    val = f"val loss {_num(summary.get('val_loss'), '.4f')}, val ppl {_num(summary.get('val_ppl'), '.2f')}"
    if summary.get("val_tokens") is not None:
        val += f" over {summary['val_tokens']:,} tokens"
    if not summary.get("tokens_per_s"):  # evaluate-only (max_steps=0), or a run that had already finished
        lines = [f"mpoe-train: evaluated at step {summary.get('steps', 0)}: {val}"]
    else:
        lines = [
            f"mpoe-train: trained to step {summary['steps']} ({_num(summary.get('tokens_seen'), ',')} tokens) "
            f"in {summary.get('wall_s', 0):.1f} s, {summary['tokens_per_s']:,.0f} tokens/s",
            f"  final train loss {_num(summary.get('train_loss'), '.4f')}; {val}",
        ]
    lines += [
        f"  run directory: {run_dir}",
        f"  train further: {resume_command(run_dir, overrides, max(2 * max_steps, 1))}",
        f"  report:        {shlex.join(['mpoe-report', str(run_dir)])}",
    ]
    sync = wandb_sync_command(run_dir)
    if sync:
        lines.append(f"  W&B upload:    {sync}")
    return lines


def _zero(cfg) -> str:
    """The ZeRO stage run, and why where it is not the configured one."""
    run, asked = zero_stage(cfg), cfg.parallel.zero_stage
    if run == asked:
        return str(run)
    return f"{run} (parallel.zero_stage={asked}: {cfg.trainer.precision} runs DeepSpeed's ZeRO 1 optimizer)"


def config_summary(cfg, world: int, run_dir: Path) -> str:
    """One line for main.log: what this run trains, on what, for how long, and where it writes."""
    m, moe, t, o = cfg.model, cfg.moe, cfg.trainer, cfg.optim
    experts = "" if moe.kind == "dense" else f" ({moe.num_experts} experts, top-{moe.top_k}, every {moe.every} layers)"
    data = cfg.data.name + (f" {list(cfg.data.paths)}" if cfg.data.paths else "")
    return (
        f"config: model {m.name} (d_model {m.d_model}, {m.num_layers} layers), moe {moe.kind}{experts}, data {data}, "
        f"{t.max_steps} steps x {t.global_batch_size or t.micro_batch_size * world} sequences x {t.seq_len} tokens, "
        f"lr {o.lr}, precision {t.precision}, {world} process(es), ep_size {cfg.parallel.ep_size}, "
        f"ZeRO {_zero(cfg)}, seed {t.seed}; run directory {run_dir}"
    )


def print_run_end(summary: dict, run_dir: Path, overrides: list[str], max_steps: int) -> None:
    """On the terminal as a plain block (no log prefixes: its commands are for copying), and into main.log."""
    lines = run_end_lines(summary, run_dir, overrides, max_steps)
    print("\n".join(lines), flush=True)
    for handler in logging.getLogger().handlers:  # Hydra's main.log: the block without echoing it on the console
        if isinstance(handler, logging.FileHandler):
            for line in lines:
                handler.emit(logging.LogRecord("mpoe.train", logging.INFO, __file__, 0, line, None, None))


def interrupted_line(stop: Interrupted, run_dir: Path, overrides: list[str]) -> str:
    where = f"checkpoint {stop.checkpoint}" if stop.checkpoint is not None else "no checkpoint (no step had finished)"
    how = f"; resume with: {resume_command(run_dir, overrides)}" if stop.checkpoint is not None else ""
    return f"mpoe-train: stopped after step {stop.step} of {stop.max_steps}: {where}{how}"


_LABELS = {"tok_s": "tokens/s", "val_ppl": "val ppl"}  # the bar's short names, spelled out in a log line


class StepLines:
    """The progress bar's stand-in where its output is not a terminal (a log file, a pipe, a scheduler's
    capture): there each redraw of a bar is a carriage return, hundreds of kB for a short run. This logs one
    plain line per logged step instead (the bar's `set_postfix` marks a logged step, `update` finishes it)."""

    def __init__(self, total: int, initial: int):
        self.total, self.n = total, initial
        self._postfix: Optional[dict] = None

    def set_postfix(self, **values) -> None:
        self._postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._postfix is not None:
            shown = ", ".join(f"{_LABELS.get(k, k)} {v}" for k, v in self._postfix.items())
            logging.getLogger("mpoe.train").info(f"train step {self.n}/{self.total}: {shown}")
            self._postfix = None

    def close(self) -> None:
        pass


def progress(total: int, initial: int, stream=None):
    """A tqdm progress bar on a terminal, else `StepLines` (tqdm draws on stderr)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return StepLines(total, initial)
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=stream)
