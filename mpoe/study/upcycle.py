"""The upcycling study: pre-train a dense model, export it, continue from it as dense / Switch / MPOE.

Stages, each an ordinary `mpoe-train` run directory under OUT (W&B group `upcycle_study`):

1. `pretrain/`: a dense GPT-2 on one part of the embedded corpus (`experiment=upcycle_pretrain`).
2. `pretrained/hf/`: that run exported as a Hugging Face checkpoint (`save_pretrained`) with its
   tokenizer (`tokenizer.json` + `tokenizer_config.json`, loadable by `AutoTokenizer`), as a user's
   pre-trained model would be shipped.
3. `step0/<variant>/`: every variant evaluated at step 0 (`trainer.max_steps=0`) on the new domain:
   what upcycling itself costs (nothing at full bonds; the truncation at a bond cap).
4. `continue/<variant>/seed<k>/`: every variant continued from `pretrained/hf` on the other part of the
   corpus (`experiment=upcycle_continue +upcycle_variant=<variant>`, conf/upcycle_variant/), all of
   them one Hydra sweep over variants x seeds in one process.
5. `report/`: `mpoe-report`'s report of the continued runs plus the study's comparisons (`study.md`).

A stage whose run directory already holds `summary.json` is not run again, so an interrupted study
continues where it stopped; a run directory left without one is moved aside (`.incomplete-N`),
never overwritten. OUT records the study's plan (`plan.json`): a second call with a different plan
stops with one line instead of mixing two studies in one report.
"""

from __future__ import annotations

import json
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
from mpoe.train.compose import compose_and_validate

GROUP = "upcycle_study"
VARIANT_GROUP = "upcycle_variant"  # conf/upcycle_variant/<name>.yaml: what each variant changes
VARIANT_NAMES = ("dense", "switch", "mpoe", "mpoe_bond", "mpoe_mask")
# Run names and directories follow the variant chosen in the sweep.
_VARIANT = "${hydra:runtime.choices.upcycle_variant}"


@dataclass
class Plan:
    seeds: int = 3
    pretrain_steps: Optional[int] = None  # None = experiment=upcycle_pretrain's
    steps: Optional[int] = None  # continuation steps; None = experiment=upcycle_continue's
    variants: list[str] = field(default_factory=lambda: list(VARIANT_NAMES))
    overrides: list[str] = field(default_factory=list)  # mpoe-train overrides for every stage

    def pretrain_overrides(self) -> list[str]:
        steps = [] if self.pretrain_steps is None else [f"trainer.max_steps={self.pretrain_steps}"]
        return ["experiment=upcycle_pretrain", *steps, *self.overrides]

    def continue_overrides(self, pretrained: Path, variants: list[str], steps: bool = True) -> list[str]:
        """The continued-training stage's overrides for one variant, or a sweep over several."""
        max_steps = [f"trainer.max_steps={self.steps}"] if steps and self.steps is not None else []
        return [
            "experiment=upcycle_continue",
            f"model.pretrained={pretrained}",
            f"+{VARIANT_GROUP}={','.join(variants)}",
            *max_steps,
            *self.overrides,
        ]


def check_plan(plan: Plan) -> None:
    """Every option and every stage's composed config, before anything runs (StudyError, one line)."""
    check_common_options(plan, VARIANT_NAMES)
    stages = [("pretrain", plan.pretrain_overrides())]
    stages += [(v, plan.continue_overrides(Path("pretrained/hf"), [v])) for v in plan.variants]
    for stage, overrides in stages:
        try:
            compose_and_validate(overrides, world_size=1)
        except ConfigError as e:
            raise StudyError(f"stage {stage}: {e}") from None


def pretrain(out: Path, plan: Plan) -> Path:
    run_dir = out / "pretrain"
    if not finished(run_dir):
        set_aside(run_dir)
        mpoe_train([*plan.pretrain_overrides(), f"hydra.run.dir={run_dir}"], "pretrain")
    return run_dir


def step0_variant(variant: str) -> str:
    """The gradient mask acts only in training: mpoe_mask's step 0 is mpoe's."""
    return "mpoe" if variant == "mpoe_mask" else variant


def step0(out: Path, plan: Plan, hf: Path) -> None:
    """Each variant's validation loss on the new domain before any continued training (one process)."""
    variants = list(dict.fromkeys(step0_variant(v) for v in plan.variants))
    todo = [v for v in variants if not finished(out / "step0" / v)]
    if not todo:
        return
    for v in todo:
        set_aside(out / "step0" / v)
    args = [
        "-m",
        *plan.continue_overrides(hf, todo, steps=False),
        "trainer.max_steps=0",
        f"logging.wandb.name=step0-{_VARIANT}",
        f"logging.wandb.tags=[{GROUP},step0]",
        f"hydra.sweep.dir={out / 'step0'}",
        f"hydra.sweep.subdir={_VARIANT}",
    ]
    mpoe_train(args, "step0")


def continue_runs(out: Path, plan: Plan, hf: Path) -> None:
    """Every variant x seed not yet finished, as Hydra sweeps: one process per set of missing seeds
    (normally one process for the whole stage). Seed-major order, so a study stopped early still has
    every variant at its first seeds."""
    by_todo: dict[tuple, list[str]] = {}
    for variant in plan.variants:
        todo = tuple(s for s in range(plan.seeds) if not finished(out / "continue" / variant / f"seed{s}"))
        if todo:
            by_todo.setdefault(todo, []).append(variant)
    for seeds, variants in by_todo.items():
        for v in variants:
            for s in seeds:
                set_aside(out / "continue" / v / f"seed{s}")
        args = [
            "-m",
            f"trainer.seed={','.join(map(str, seeds))}",  # first: Hydra runs every variant of seed 0, then of seed 1...
            *plan.continue_overrides(hf, variants),
            f"logging.wandb.name={_VARIANT}-seed${{trainer.seed}}",
            f"hydra.sweep.dir={out / 'continue'}",
            f"hydra.sweep.subdir={_VARIANT}/seed${{trainer.seed}}",
        ]
        mpoe_train(args, f"continue {','.join(variants)} x seeds {','.join(map(str, seeds))}")


def run_study(out: Path, plan: Plan, report_only: bool = False) -> Path:
    """All stages (each skipped when already done), then the report; returns OUT/report/study.md.

    report_only: run nothing, report the finished runs in OUT (e.g. a study stopped at its deadline)."""
    # Deferred: compare imports this module (step0_variant), so importing it at the top would be a cycle.
    from mpoe.study.compare import write_study_report

    out = out.resolve()
    if report_only:
        if not (out / "plan.json").is_file():
            raise StudyError(f"--out={out} holds no study (no plan.json): run the study first")
        recorded = json.loads((out / "plan.json").read_text())
        return write_study_report(out, Plan(**{k: v for k, v in recorded.items() if k in Plan.__dataclass_fields__}))
    check_plan(plan)
    record_plan(out, plan)
    start = time.perf_counter()
    pretrain_dir = pretrain(out, plan)
    hf = export_pretrained(pretrain_dir, out / "pretrained")
    step0(out, plan, hf)
    continue_runs(out, plan, hf)
    report = write_study_report(out, plan)
    print(f"[study] report: {report} (study took {time.perf_counter() - start:.0f} s)", flush=True)
    return report
