"""`mpoe-study upcycle|finetune [--out DIR] [options]` (= `python -m mpoe.study ...`).

Runs a study offline and writes OUT/report/study.md: `upcycle` (mpoe.study.upcycle) measures continued
pre-training loss after upcycling; `finetune` (mpoe.study.finetune) fine-tunes the upcycled models on a
classification task and scores them, as the MPOE paper does. Bad options stop in one line with exit code 2
before anything runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from mpoe.study import finetune, upcycle
from mpoe.study.stages import StudyError


def _common(sub: argparse.ArgumentParser, name: str, variants: tuple, pretrain_default: str, steps_default: str):
    sub.add_argument("--out", default=f"studies/{name}", help=f"study directory (default: studies/{name})")
    sub.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    sub.add_argument("--pretrain-steps", type=int, help=f"pre-training steps (default: {pretrain_default})")
    sub.add_argument("--steps", type=int, help=f"steps of each variant's run (default: {steps_default})")
    sub.add_argument("--variants", default=",".join(variants), help=f"comma-separated subset of {','.join(variants)}")
    sub.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an mpoe-train override for every stage (repeatable), e.g. --set trainer.seq_len=64",
    )
    sub.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write OUT/report from the runs already finished in OUT (its recorded plan)",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mpoe-study", description="Run a study (several mpoe-train runs) and report it.")
    sub = ap.add_subparsers(dest="study", required=True)
    up = sub.add_parser(
        "upcycle",
        help="pre-train dense GPT-2, export it (HF + tokenizer), continue as dense / Switch / MPOE, report",
    )
    _common(up, "upcycle", upcycle.VARIANT_NAMES, "experiment=upcycle_pretrain's", "experiment=upcycle_continue's")
    ft = sub.add_parser(
        "finetune",
        help="pre-train (or take) a dense model, upcycle it, fine-tune every variant on a task, score, report",
    )
    _common(ft, "finetune", finetune.VARIANT_NAMES, "experiment=upcycle_pretrain's", "experiment=finetune's")
    ft.add_argument("--family", default="gpt2", choices=sorted(finetune.FAMILY_MODELS), help="model family")
    ft.add_argument(
        "--task",
        default="topic",
        help="an embedded task (topic, acceptability, next_sentence), a directory with train.* and validation.* files, "
        "or a datasets name (with --set data.task_config=CONFIG)",
    )
    ft.add_argument("--pretrained", help="a Hugging Face checkpoint directory to start from (no pre-training stage)")
    ft.add_argument(
        "--lr-grid",
        default=",".join(format(lr, "g") for lr in finetune.LR_GRID),
        help="learning rates of the seed-0 pilot (default %(default)s)",
    )
    return ap


def _plan(args: argparse.Namespace):
    common = dict(
        seeds=args.seeds,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        variants=[v for v in args.variants.split(",") if v],
        overrides=list(args.overrides),
    )
    if args.study == "upcycle":
        return upcycle, upcycle.Plan(**common)
    try:
        grid = [float(x) for x in args.lr_grid.split(",") if x]
    except ValueError:
        raise StudyError(f"--lr-grid={args.lr_grid} is invalid: give comma-separated numbers, e.g. 3e-4,1e-3") from None
    plan = finetune.Plan(family=args.family, task=args.task, lr_grid=grid, pretrained=args.pretrained, **common)
    return finetune, plan


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    # Deferred: it imports torch, which --help and a bad option never need.
    from mpoe.parallel.deepspeed.accelerator import configure_accelerator

    configure_accelerator()
    try:
        study, plan = _plan(args)
        study.run_study(Path(args.out), plan, report_only=args.report_only)
    except StudyError as e:
        print(f"mpoe-study: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"mpoe-study: error: {e}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    sys.exit(main())
