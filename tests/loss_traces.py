"""The 20-step loss traces that pin the training math across refactors (issue 30): one run per case, each step's
training loss as metrics.jsonl logs it. `python tests/loss_traces.py record` writes tests/data/loss_traces.json;
test_loss_traces.py runs the same cases and compares."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from _cli import metrics, train

TRACE_FILE = Path(__file__).parent / "data" / "loss_traces.json"
STEPS = 20
COMMON = [f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}"]

# name -> (overrides, processes)
CASES: dict[str, tuple[list[str], int]] = {
    "default": ([], 1),
    "switch": (["moe=switch"], 1),
    "mpoe_grouped": (["moe=mpoe", "moe.expert_impl=grouped"], 1),
    "mpoe_grad_mask": (["moe=mpoe", "moe.grad_mask.enabled=true"], 1),
    "t5_switch": (["model=t5_tiny", "moe=switch"], 1),
    "ep2_zero2": (["parallel=ep2", "parallel.zero_stage=2"], 2),
}


def run_case(name: str, root: Path, cache: str) -> list[float]:
    overrides, nproc = CASES[name]
    run_dir = root / name
    train(run_dir, cache, *COMMON, *overrides, nproc=nproc)
    return [row["loss"] for row in metrics(run_dir) if "loss" in row]


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        traces = {name: run_case(name, Path(tmp), cache) for name in CASES}
    TRACE_FILE.write_text(json.dumps(traces, indent=1) + "\n")
    print(f"wrote {TRACE_FILE}: " + ", ".join(f"{k} {len(v)} steps" for k, v in traces.items()))
