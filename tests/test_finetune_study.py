"""mpoe-study finetune and `mpoe-train data=task`: the fine-tuning runs, their scores, the study end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _cli
import pytest

from mpoe.study.finetune import lr_name
from mpoe.tools import report as base

VARIANTS = ("dense", "switch", "mpoe", "mpoe_mask", "mpoe_central_frozen")
# A toy size for 2 CPU cores: short rows, few steps, one validation batch.
# W&B off: its offline service costs each of the study's runs seconds (test_study.py checks the study's W&B runs).
TOY = (
    "trainer.seq_len=48",
    "trainer.eval_batches=1",
    "trainer.log_every=1",
    "trainer.micro_batch_size=8",
    "logging.wandb.mode=disabled",
)


def _study(out: Path, cache: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mpoe.study", "finetune", "--out", str(out), *args]
    return subprocess.run(cmd, env=_cli.env(cache), capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_task_run_scores_every_example_of_both_splits(tmp_path, mpoe_cache):
    """A fine-tuning run from scratch: summary accuracies agree with predictions.json, which lists every
    validation and test example in the task's order."""
    from mpoe.config import DataConfig
    from mpoe.train.data.tasks import load_task

    run = tmp_path / "run"
    _cli.train(run, mpoe_cache, "data=task", "data.task=topic", "moe=switch", "trainer.global_batch_size=8")
    summary = json.loads((run / "summary.json").read_text())
    predictions = json.loads((run / "predictions.json").read_text())
    task = load_task(DataConfig(name="task", task="topic", val_fraction=0.1))
    for split in ("val", "test"):
        labels = [e.label for e in task.splits[split]]
        assert predictions[split]["label"] == labels
        predicted = predictions[split]["predicted"]
        assert len(predicted) == len(labels) and set(predicted) <= {0, 1}
        accuracy = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
        assert summary[f"{split}_accuracy"] == pytest.approx(accuracy)
        assert summary[f"{split}_examples"] == len(labels)
    assert summary["task"] == "topic" and summary["label_words"] == list(task.label_words)
    records = _metrics(run)
    assert all(len(r["router_entropy"]) == 2 and len(r["expert_divergence"]) == 2 for r in records)
    assert "central_update_norm" not in records[-1]  # Switch has no central tensors


def test_bad_task_directory_is_one_line_and_writes_nothing(tmp_path, mpoe_cache):
    task = tmp_path / "task"
    task.mkdir()
    (task / "train.csv").write_text("sentence,label\na good one,1\nanother good one,1\n")
    (task / "validation.csv").write_text("sentence,label\nfine,1\n")
    out = tmp_path / "study"
    proc = _study(out, mpoe_cache, "--task", str(task), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.csv" in lines[0] and "class" in lines[0], proc.stderr
    assert not out.exists()
    run = tmp_path / "run"
    proc = _cli.train(run, mpoe_cache, "data=task", f"data.task={task}", check=False)
    assert proc.returncode == 2 and "train.csv" in proc.stderr.strip().splitlines()[-1]
    assert not (run / "metrics.jsonl").exists()


# Every variant runs in one family or the other, three per family (suite time). GPT-2 has the two-rate grid and
# the mask (comparisons: MPOE-Switch, mask-none); T5, the same code but for the rows' layout, one rate and the
# frozen central tensors (comparisons: MPOE-dense, frozen-trained).
TOY_PLANS = {
    "gpt2": (("switch", "mpoe", "mpoe_mask"), "1e-3,3e-3", 2),
    "t5": (("dense", "mpoe", "mpoe_central_frozen"), "1e-3", 2),
}
assert {v for variants, _, _ in TOY_PLANS.values() for v in variants} == set(VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TOY_PLANS))
def test_toy_finetune_study_end_to_end(tmp_path, mpoe_cache, family):
    """Pre-train, export, the lr pilot, the seeds at the chosen rate, the report; a rerun repeats nothing."""
    variants, grid, comparison_count = TOY_PLANS[family]
    out = tmp_path / "study"
    toy = [a for o in TOY for a in ("--set", o)]
    args = ["--family", family, "--variants", ",".join(variants), "--lr-grid", grid]
    args += ["--seeds", "2", "--pretrain-steps", "3", "--steps", "3"]
    proc = _study(out, mpoe_cache, *args, *toy)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    choice = json.loads((out / "pilot" / "choice.json").read_text())
    assert set(choice) == set(variants)
    for variant, picked in choice.items():
        scores = {float(lr): acc for lr, acc in picked["val_accuracy"].items()}
        best = max(scores.values())
        assert picked["lr"] == min(lr for lr, acc in scores.items() if acc == best)  # best, ties to the smaller
        seed0 = base.load_run(out / "pilot" / variant / lr_name(picked["lr"]))
        seed1 = base.load_run(out / "finetune" / variant / "seed1")
        assert seed1.config["optim"]["lr"] == picked["lr"] and seed1.config["trainer"]["seed"] == 1
        assert seed0.config["trainer"]["seed"] == 0
        for run in (seed0, seed1):
            assert run.config["model"]["family"] == family and run.config["data"]["name"] == "task"
            assert run.config["moe"]["top_k"] == 1 and run.config["moe"]["gate_scale"] == "straight_through"
            assert 0.0 <= run.summary["test_accuracy"] <= 1.0 and (run.path / "predictions.json").is_file()
            records = _metrics(run.path)
            if variant != "dense":
                assert all("router_entropy" in r and "expert_divergence" in r for r in records)
            if variant.startswith("mpoe"):
                assert all("central_update_norm" in r for r in records)
    if "mpoe_central_frozen" in variants:  # frozen: the central tensors never move
        frozen = _metrics(out / "finetune" / "mpoe_central_frozen" / "seed1")
        assert all(n == 0.0 for r in frozen for n in r["central_update_norm"])
    moving = _metrics(out / "finetune" / "mpoe" / "seed1")
    assert any(n > 0.0 for r in moving for n in r["central_update_norm"])

    study = (out / "report" / "study.md").read_text()
    lines = study.splitlines()
    comparisons = [line for line in lines if line.startswith("- **")]
    assert len(comparisons) == comparison_count
    for line in comparisons:  # each with its interval over 2 seeds x every test example, and a verdict
        assert "paired over 2 seeds x 266 test examples" in line and "95% interval [" in line, line
        assert line.endswith(("is ahead.", "is behind.", "not separated.")), line
    (claim,) = [line for line in lines if line.startswith("Paper's claim")]
    if "switch" in variants:
        assert any(f"**{word}**" in claim for word in ("supported", "contradicted", "inconclusive")), claim
    else:  # no Switch runs: the claim is not judged, and the line says why
        assert "not judged: it needs runs of both" in claim, claim
    rows = [line for line in lines if line.startswith("| ") and " | 2 (0,1) | " in line]
    assert len(rows) == len(variants) and all(" ± " in row for row in rows), rows  # test accuracy over 2 seeds
    if "mpoe_mask" in variants:  # the gradient mask's ratio, from central_update_norm
        assert "measured ratio: **" in study
    assert base.main([str(out / "finetune"), "--out", str(tmp_path / "rep")]) == 0  # mpoe-report reads the runs

    again = _study(out, mpoe_cache, *args, *toy)  # everything is done: nothing runs again
    assert again.returncode == 0 and "[study] pilot" not in again.stdout and "[study] finetune" not in again.stdout


def test_a_glue_layout_directory_fine_tunes_offline(tmp_path, mpoe_cache):
    """GLUE's SST-2 as downloaded (train/dev/test.tsv, its test labels hidden): a tenth of train selects, dev scores."""
    task = tmp_path / "sst2"
    task.mkdir()
    good = ["a fine and moving film", "warm, funny and true", "the best of the year", "a joy to watch"]
    bad = ["a dull and tired film", "flat, slow and empty", "the worst of the year", "a chore to sit through"]
    train = [(s, 1) for s in good] * 5 + [(s, 0) for s in bad] * 5
    (task / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in train))
    (task / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in train[::3]))
    (task / "test.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t-1\n" for s, _ in train[:4]))
    run = tmp_path / "run"
    _cli.train(run, mpoe_cache, "data=task", f"data.task={task}", "moe=mpoe", "trainer.global_batch_size=8")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_examples"] == len(train[::3])  # dev.tsv is scored as the test split
    assert summary["val_examples"] + summary["test_examples"] < len(train) + len(train[::3])
    assert summary["label_words"] == ["false", "true"]
    assert all("central_update_norm" in r for r in _metrics(run))
