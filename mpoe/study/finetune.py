"""The fine-tuning study: the MPOE paper's own measure. Upcycle a pre-trained dense model to each variant,
fine-tune it on a classification task, score it on held-out examples, and compare with confidence intervals.

Stages, each an ordinary `mpoe-train` run directory under OUT (W&B group `finetune_study`):

1. `pretrain/` and `pretrained/hf/`: a dense model of the family pre-trained on the stdlib docstrings and exported
   with its tokenizer, as `mpoe-study upcycle` does (`experiment=upcycle_pretrain`); or `--pretrained DIR`.
2. `pilot/<variant>/lr<LR>/`: seed 0 of every variant at every learning rate of the grid
   (`experiment=finetune +finetune_variant=<variant> optim.lr=<LR>`). The rate with the best validation
   accuracy is the variant's (`stats.choose_lr`); the test split plays no part in the choice.
3. `finetune/<variant>/seed<k>/`: seeds 1.. at the variant's chosen rate; seed 0 is its pilot run at that rate.
4. `report/`: accuracy on the test split per variant, paired bootstrap intervals, verdicts (finetune_report.py).

A finished stage is not run again, an unfinished run directory is kept aside, and OUT records its plan
(`stages.py`), as in the upcycling study.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mpoe.config import ConfigError
from mpoe.study.stages import (
    StudyError,
    check_common_options,
    export_pretrained,
    finished,
    mpoe_train,
    record_plan,
    set_aside,
)
from mpoe.study.stats import choose_lr
from mpoe.train.compose import compose_and_validate

GROUP = "finetune_study"
VARIANT_GROUP = "finetune_variant"  # conf/finetune_variant/<name>.yaml
VARIANT_NAMES = ("dense", "switch", "mpoe", "mpoe_mask", "mpoe_central_frozen")
FAMILY_MODELS = {"gpt2": "gpt2_mini", "t5": "t5_mini"}  # the study's model of each family
LR_GRID = (3e-4, 1e-3)
_VARIANT = "${hydra:runtime.choices.finetune_variant}"


@dataclass
class Plan:
    family: str = "gpt2"
    task: str = "topic"
    seeds: int = 3
    pretrain_steps: Optional[int] = None  # None = experiment=upcycle_pretrain's
    steps: Optional[int] = None  # fine-tuning steps; None = experiment=finetune's
    variants: list[str] = field(default_factory=lambda: list(VARIANT_NAMES))
    lr_grid: list[float] = field(default_factory=lambda: list(LR_GRID))
    overrides: list[str] = field(default_factory=list)  # mpoe-train overrides for every stage
    pretrained: Optional[str] = None  # an HF checkpoint directory instead of the pre-training stage

    def model(self) -> str:
        return f"model={FAMILY_MODELS[self.family]}"

    def pretrain_overrides(self) -> list[str]:
        steps = [] if self.pretrain_steps is None else [f"trainer.max_steps={self.pretrain_steps}"]
        names = ["logging.wandb.group=" + GROUP, f"logging.wandb.tags=[{GROUP},pretrain]"]
        return ["experiment=upcycle_pretrain", self.model(), *names, *steps, *self.overrides]

    def finetune_overrides(self, pretrained: Path, variants: list[str], lrs: list[float]) -> list[str]:
        """One fine-tuning stage's overrides: a sweep over variants x learning rates (one of each: one run)."""
        steps = [] if self.steps is None else [f"trainer.max_steps={self.steps}", f"trainer.eval_every={self.steps}"]
        task = Path(self.task).resolve() if Path(self.task).exists() else self.task
        return [
            "experiment=finetune",
            self.model(),
            f"model.pretrained={pretrained}",
            f"data.task={task}",
            f"+{VARIANT_GROUP}={','.join(variants)}",
            f"optim.lr={','.join(map(repr, lrs))}",
            *steps,
            *self.overrides,
        ]


def lr_name(lr: float) -> str:
    """A pilot run's directory: what Hydra writes for `lr${optim.lr}` (Python's repr of the float)."""
    return f"lr{lr!r}"


def check_plan(plan: Plan) -> None:
    """Every option, the task's files and every stage's composed config, before anything runs (one line)."""
    if plan.family not in FAMILY_MODELS:
        raise StudyError(f"--family={plan.family} is invalid: use one of {', '.join(FAMILY_MODELS)}")
    check_common_options(plan, VARIANT_NAMES)
    grid = plan.lr_grid
    if not grid or not all(math.isfinite(lr) and lr > 0 for lr in grid) or len(set(grid)) != len(grid):
        raise StudyError(f"--lr-grid={','.join(map(str, plan.lr_grid))} is invalid: give distinct rates > 0")
    if plan.pretrained is not None:
        _check_pretrained(plan)
    stages = [] if plan.pretrained else [("pretrain", plan.pretrain_overrides())]
    hf = Path(plan.pretrained or "pretrained/hf")  # the study's own export does not exist yet: its files unchecked
    stages += [(v, plan.finetune_overrides(hf, [v], plan.lr_grid[:1])) for v in plan.variants]
    for stage, overrides in stages:
        try:
            cfg = compose_and_validate(overrides, world_size=1)
        except ConfigError as e:
            raise StudyError(f"stage {stage}: {e}") from None
    _check_task(cfg)


def _check_pretrained(plan: Plan) -> None:
    # Deferred: these import transformers (seconds); only --pretrained needs them.
    from mpoe.models.family import read_pretrained_config

    try:
        read_pretrained_config(plan.pretrained, plan.family)
    except ConfigError as e:
        raise StudyError(f"--pretrained: {e}") from None


def _check_task(cfg) -> None:
    """The task's files: a bad file stops here in one line, before OUT is written."""
    from mpoe.train.data import task_data  # deferred: datasets and pyarrow are slow to import

    try:
        task_data.check(cfg)
    except ConfigError as e:
        raise StudyError(f"--task={cfg.data.task}: {e}") from None


def pretrained_checkpoint(out: Path, plan: Plan) -> Path:
    """--pretrained, or the study's own pre-training run exported to OUT/pretrained/hf."""
    if plan.pretrained is not None:
        return Path(plan.pretrained).expanduser().resolve()
    run_dir = out / "pretrain"
    if not finished(run_dir):
        set_aside(run_dir)
        mpoe_train([*plan.pretrain_overrides(), f"hydra.run.dir={run_dir}"], "pretrain")
    return export_pretrained(run_dir, out / "pretrained")


def _sweep(plan: Plan, hf: Path, variants: list[str], lrs: list[float], seeds: list[int], where: Path, sub: str):
    args = [
        "-m",
        f"trainer.seed={','.join(map(str, seeds))}",  # first: a study stopped early has every variant's first seeds
        *plan.finetune_overrides(hf, variants, lrs),
        f"logging.wandb.name={_VARIANT}-{sub.split('/')[-1]}",
        f"hydra.sweep.dir={where}",
        f"hydra.sweep.subdir={_VARIANT}/{sub}",
    ]
    mpoe_train(args, f"{where.name} {','.join(variants)} x lr {','.join(map(str, lrs))} x seeds {seeds}")


def pilot(out: Path, plan: Plan, hf: Path) -> dict[str, float]:
    """Seed 0 of every variant x rate not yet run, then each variant's chosen rate (OUT/pilot/choice.json)."""
    by_todo: dict[tuple, list[str]] = {}
    for variant in plan.variants:
        todo = tuple(lr for lr in plan.lr_grid if not finished(out / "pilot" / variant / lr_name(lr)))
        for lr in todo:
            set_aside(out / "pilot" / variant / lr_name(lr))
        if todo:
            by_todo.setdefault(todo, []).append(variant)
    for lrs, variants in by_todo.items():
        _sweep(plan, hf, variants, list(lrs), [0], out / "pilot", "lr${optim.lr}")
    choice = {}
    for variant in plan.variants:
        scores = {lr: _summary(out / "pilot" / variant / lr_name(lr))["val_accuracy"] for lr in plan.lr_grid}
        try:
            chosen = choose_lr(scores)
        except ValueError as e:
            raise StudyError(f"the pilot of {variant}: {e}") from None
        choice[variant] = {"val_accuracy": {format(lr, "g"): s for lr, s in scores.items()}, "lr": chosen}
    (out / "pilot" / "choice.json").write_text(json.dumps(choice, indent=1))
    return {v: c["lr"] for v, c in choice.items()}


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def finetune_runs(out: Path, plan: Plan, hf: Path, chosen: dict[str, float]) -> None:
    """Seeds 1.. of every variant at its chosen rate, as Hydra sweeps (one per rate and set of missing seeds)."""
    by_todo: dict[tuple, list[str]] = {}
    for variant in plan.variants:
        todo = tuple(s for s in range(1, plan.seeds) if not finished(out / "finetune" / variant / f"seed{s}"))
        for s in todo:
            set_aside(out / "finetune" / variant / f"seed{s}")
        if todo:
            by_todo.setdefault((chosen[variant], todo), []).append(variant)
    for (lr, seeds), variants in by_todo.items():
        _sweep(plan, hf, variants, [lr], list(seeds), out / "finetune", "seed${trainer.seed}")


def run_study(out: Path, plan: Plan, report_only: bool = False) -> Path:
    """All stages (each skipped when already done), then the report; returns OUT/report/study.md."""
    # Deferred: the report imports matplotlib, which running the stages does not need.
    from mpoe.study.finetune_report import write_finetune_report

    out = out.resolve()
    if report_only:
        if not (out / "plan.json").is_file():
            raise StudyError(f"--out={out} holds no study (no plan.json): run the study first")
        recorded = json.loads((out / "plan.json").read_text())
        return write_finetune_report(out, Plan(**{k: v for k, v in recorded.items() if k in Plan.__dataclass_fields__}))
    if Path(plan.task).exists():
        plan.task = str(Path(plan.task).resolve())
    if plan.pretrained is not None:
        plan.pretrained = str(Path(plan.pretrained).expanduser().resolve())
    check_plan(plan)
    record_plan(out, plan)
    start = time.perf_counter()
    hf = pretrained_checkpoint(out, plan)
    chosen = pilot(out, plan, hf)
    finetune_runs(out, plan, hf, chosen)
    report = write_finetune_report(out, plan)
    print(f"[study] report: {report} (study took {time.perf_counter() - start:.0f} s)", flush=True)
    return report
