"""`mpoe-study upcycle [--out DIR] [options]` (= `python -m mpoe.study upcycle`).

Runs the upcycling study (mpoe.study.upcycle) offline and writes OUT/report/study.md.
Bad options stop in one line with exit code 2 before anything runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from mpoe.study.upcycle import VARIANT_NAMES, Plan, StudyError, run_study


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mpoe-study", description="Run a study (several mpoe-train runs) and report it.")
    sub = ap.add_subparsers(dest="study", required=True)
    up = sub.add_parser(
        "upcycle",
        help="pre-train dense GPT-2, export it (HF + tokenizer), continue as dense / Switch / MPOE, report",
    )
    up.add_argument("--out", default="studies/upcycle", help="study directory (default: studies/upcycle)")
    up.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    up.add_argument("--pretrain-steps", type=int, help="pre-training steps (default: experiment=upcycle_pretrain's)")
    up.add_argument("--steps", type=int, help="continued-training steps (default: experiment=upcycle_continue's)")
    up.add_argument(
        "--variants", default=",".join(VARIANT_NAMES), help=f"comma-separated subset of {','.join(VARIANT_NAMES)}"
    )
    up.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an mpoe-train override for every stage (repeatable), e.g. --set trainer.seq_len=64",
    )
    up.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write OUT/report from the runs already finished in OUT (its recorded plan)",
    )
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    # Deferred: it imports torch, which --help and a bad option never need.
    from mpoe.parallel.deepspeed.accelerator import configure_accelerator

    configure_accelerator()
    plan = Plan(
        seeds=args.seeds,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        variants=[v for v in args.variants.split(",") if v],
        overrides=list(args.overrides),
    )
    try:
        run_study(Path(args.out), plan, report_only=args.report_only)
    except StudyError as e:
        print(f"mpoe-study: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"mpoe-study: error: {e}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    sys.exit(main())
