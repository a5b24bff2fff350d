"""The fine-tuning study's report, from run directories written by hand in the study's layout."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mpoe.study.finetune import lr_name
from mpoe.study.finetune_report import write_finetune_report

TEST_EXAMPLES = 40
LABELS = [i % 2 for i in range(TEST_EXAMPLES)]
PARAMS = {"dense": 2_615_424, "switch": 4_392_192}  # every MPOE variant: 2,969,408
VARIANTS = ["dense", "switch", "mpoe", "mpoe_mask", "mpoe_central_frozen"]
# variant -> {lr: seed-0 validation accuracy}; the chosen lr: dense 0.001, switch 0.0003 (a tie), mpoe 0.0003,
# mpoe_mask 0.0003 (a tie), mpoe_central_frozen 0.001
PILOT = {
    "dense": {3e-4: 0.5, 1e-3: 0.6},
    "switch": {3e-4: 0.7, 1e-3: 0.7},
    "mpoe": {3e-4: 0.8, 1e-3: 0.75},
    "mpoe_mask": {3e-4: 0.8, 1e-3: 0.8},
    "mpoe_central_frozen": {3e-4: 0.6, 1e-3: 0.7},
}
CHOSEN = {"dense": 1e-3, "switch": 3e-4, "mpoe": 3e-4, "mpoe_mask": 3e-4, "mpoe_central_frozen": 1e-3}
# variant -> per seed, how many of the test examples (the first ones) it gets right; frozen lacks seed 2
CORRECT = {
    "dense": [20, 22, 24],  # accuracy 0.50, 0.55, 0.60: mean 0.55, sample std 0.05
    "switch": [30, 30, 30],
    "mpoe": [36, 36, 36],
    "mpoe_mask": [36, 36, 36],  # the same predictions as mpoe: a difference of exactly 0
    "mpoe_central_frozen": [30, 30],
}
# central_update_norm per logged step, per MPOE layer; mpoe: step means 2 and 4 -> 3 in every seed
MPOE_NORMS = [[1.0, 3.0], [3.0, 5.0]]
MASK_NORMS = [  # means 2.25, 1.5, 3.0 -> ratios 0.75, 0.5, 1.0 over mpoe's 3.0
    [[1.5, 1.5], [2.0, 4.0]],
    [[1.0, 1.0], [2.0, 2.0]],
    [[3.0, 3.0], [3.0, 3.0]],
]


def _plan(variants=VARIANTS) -> SimpleNamespace:
    return SimpleNamespace(
        family="gpt2",
        task="acceptability",
        seeds=3,
        variants=list(variants),
        lr_grid=[3e-4, 1e-3],
        pretrain_steps=None,
        steps=20,
        overrides=[],
        pretrained=None,
    )


def _config(variant: str, seed: int, lr: float) -> dict:
    kind = "mpoe" if variant.startswith("mpoe") else variant
    return {
        "model": {"name": "gpt2_mini"},
        "moe": {
            "kind": kind,
            "num_experts": 4,
            "every": 1,
            "top_k": 1,
            "gate_scale": "straight_through",
            "capacity_factor": None,
            "aux_loss_coef": 0.01,
            "z_loss_coef": 0.001,
            "grad_mask": {"enabled": variant == "mpoe_mask", "keep_prob": 0.5, "target": "central", "rescale": True},
        },
        "optim": {
            "lr": lr,
            "warmup_steps": 2,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.01,
            "central_lr_scale": 0.0 if variant == "mpoe_central_frozen" else 1.0,
        },
        "trainer": {"seed": seed, "micro_batch_size": 8, "global_batch_size": None, "seq_len": 64},
        "data": {"name": "task", "task": "acceptability"},
    }


def _metrics(variant: str, seed: int) -> list[dict]:
    records = [{"step": 10, "loss": 0.7}, {"step": 20, "loss": 0.6}]
    for i, r in enumerate(records):
        if variant != "dense":
            r["router_entropy"] = [1.2 - 0.1 * i, 1.0 - 0.1 * i]
            r["expert_divergence"] = [0.01 * (i + 1), 0.02 * (i + 1)]
        if variant == "mpoe_mask":
            r["central_update_norm"] = MASK_NORMS[seed][i]
        elif variant.startswith("mpoe"):
            r["central_update_norm"] = MPOE_NORMS[i]
    return records


def write_run(path: Path, variant: str, seed: int, lr: float, val_accuracy: float, correct: int) -> None:
    """A finished fine-tuning run: .hydra/config.yaml, summary.json, predictions.json, metrics.jsonl."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(_config(variant, seed, lr)))
    predicted = [label if i < correct else 1 - label for i, label in enumerate(LABELS)]
    central = 589_824 if variant.startswith("mpoe") else 0
    summary = {
        "val_loss": 0.6,
        "val_tokens": 1000,
        "steps": 20,
        "val_accuracy": val_accuracy,
        "test_accuracy": correct / TEST_EXAMPLES,
        "val_examples": 30,
        "test_examples": TEST_EXAMPLES,
        "task": "acceptability",
        "label_words": ["no", "yes"],
        "params_total": PARAMS.get(variant, 2_969_408),
        "params_active": PARAMS.get(variant, 2_792_224) if variant != "switch" else 3_208_704,
        "params_expert": 0 if variant == "dense" else 944_192,
        "params_central": central,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "predictions.json").write_text(
        json.dumps(
            {"val": {"label": LABELS[:30], "predicted": LABELS[:30]}, "test": {"label": LABELS, "predicted": predicted}}
        )
    )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(variant, seed)))


def write_study(out: Path, variants=VARIANTS) -> None:
    """Pilot runs (seed 0 over the grid; off the chosen lr they get every test example wrong, so a report that
    read them as results would show it) and seeds >= 1 at the chosen lr."""
    for variant in variants:
        for lr, val_accuracy in PILOT[variant].items():
            correct = CORRECT[variant][0] if lr == CHOSEN[variant] else 0
            write_run(out / "pilot" / variant / lr_name(lr), variant, 0, lr, val_accuracy, correct)
        for seed, correct in enumerate(CORRECT[variant][1:], start=1):
            write_run(out / "finetune" / variant / f"seed{seed}", variant, seed, CHOSEN[variant], 0.5, correct)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("finetune")
    write_study(out)
    path = write_finetune_report(out, _plan())
    return out, path.read_text()


def test_the_report_and_its_plots_are_written(study):
    out, text = study
    assert (out / "report" / "study.md").is_file()
    assert (out / "report" / "study_router_entropy.png").is_file()
    assert (out / "report" / "study_expert_divergence.png").is_file()
    # mpoe-report's report of every fine-tune run: 10 pilot runs and 9 later seeds
    assert "19 run(s)" in (out / "report" / "report.md").read_text()
    assert "![router_entropy](study_router_entropy.png)" in text


def test_setup_names_the_model_the_task_and_the_routing(study):
    out, text = study
    assert f"- Pre-trained model: `{out / 'pretrained' / 'hf'}`." in text
    assert "Task `acceptability` (label words: no, yes): 30 validation examples" in text
    assert "40 test examples" in text and "20 steps of 8 sequences of at most 64 tokens" in text
    assert "4 experts every 1 layers, top-1, gate scale `straight_through`, capacity dropless" in text
    assert "`optim.central_lr_scale=0.0`" in text


def test_the_pilot_table_shows_the_grid_and_the_choice(study):
    _, text = study
    assert "| variant | val acc, lr 0.0003 | val acc, lr 0.001 | chosen lr |" in text
    assert "| dense (fine-tuned) | 0.5000 | 0.6000 | 0.001 |" in text
    assert "| Switch upcycled | 0.7000 | 0.7000 | 0.0003 |" in text  # a tie: the smaller lr
    assert "| MPOE upcycled, full bonds | 0.8000 | 0.7500 | 0.0003 |" in text


def test_the_results_table_uses_the_chosen_lr_runs_and_every_seed(study):
    _, text = study
    assert "| dense (fine-tuned) | 3 (0,1,2) | 0.001 | 0.5500 ± 0.0500 | 2,615,424 | 2,615,424 | 0 | - |" in text
    assert "| Switch upcycled | 3 (0,1,2) | 0.0003 | 0.7500 ± 0.0000 | 4,392,192 | 3,208,704 | 944,192 | - |" in text
    assert "| MPOE upcycled, full bonds | 3 (0,1,2) | 0.0003 | 0.9000 ± 0.0000 | 2,969,408 |" in text
    assert "| 944,192 | 589,824 |" in text
    # frozen has no seed 2: reported with what exists
    assert "| MPOE, central tensors frozen | 2 (0,1) | 0.001 | 0.7500 ± 0.0000 |" in text


def test_comparisons_give_the_paired_interval_and_verdict(study):
    _, text = study
    lines = {line.split("**")[1]: line for line in text.splitlines() if line.startswith("- **")}
    assert len(lines) == 5
    # MPOE right on 6 more examples of 40 in every seed, never on fewer: +0.15, ahead
    mpoe_switch = lines["Does MPOE (full bonds) match Switch?"]
    assert (
        "paired over 3 seeds x 40 test examples, MPOE upcycled, full bonds - Switch upcycled = +0.1500" in mpoe_switch
    )
    assert mpoe_switch.endswith(": MPOE upcycled, full bonds is ahead.")
    # per-seed differences 0.40, 0.35, 0.30
    assert "= +0.3500, 95% interval" in lines["Does upcycling to MPOE beat dense fine-tuning?"]
    assert "= +0.2000, 95% interval" in lines["Does upcycling to Switch beat dense fine-tuning?"]
    assert lines["Does upcycling to Switch beat dense fine-tuning?"].endswith("is ahead.")
    mask = lines["Does the gradient mask help MPOE?"]
    assert "= +0.0000, 95% interval [+0.0000, +0.0000]: not separated." in mask
    frozen = lines["What does freezing the central tensors cost MPOE?"]
    assert "paired over 2 seeds x 40 test examples" in frozen and "= -0.1500" in frozen
    assert frozen.endswith(": MPOE, central tensors frozen is behind.")


def test_the_paper_claim_line(study):
    _, text = study
    claim = next(line for line in text.splitlines() if line.startswith("Paper's claim"))
    assert "**supported**: MPOE is ahead of Switch on test accuracy, MPOE - Switch = +0.1500" in claim
    assert "over 3 seeds x 40 examples" in claim
    assert "MPOE has fewer parameters (2,969,408 vs 4,392,192, 32% fewer)" in claim


def test_the_measured_mask_ratio(study):
    _, text = study
    # pairs at the same seed and lr, the pilot's other rate included: 0.75, 0.5, 1.0 at 3e-4, 0.75 at 1e-3
    assert (
        "measured ratio: **0.750** (range 0.500 to 1.000 over 4 pairs of runs; seed 0 at lr 0.0003: 0.750, "
        "seed 1 at lr 0.0003: 0.500, seed 2 at lr 0.0003: 1.000, seed 0 at lr 0.001: 0.750)" in text
    )
    assert "AdamW update of the central tensors with the mask (keep_prob 0.5 on the central tensor" in text


def test_the_report_is_the_same_when_written_again(study):
    out, text = study
    assert write_finetune_report(out, _plan()).read_text() == text


def test_missing_runs_are_reported_with_what_exists(tmp_path):
    write_study(tmp_path, variants=["dense", "mpoe", "mpoe_mask"])
    (tmp_path / "finetune" / "mpoe_mask" / "seed1" / "predictions.json").unlink()
    text = write_finetune_report(tmp_path, _plan()).read_text()
    assert "| Switch upcycled | 0 | - | - | - |" in text
    assert "| Switch upcycled | - | - | - |" in text  # its pilot row
    # comparisons need both variants
    assert "Switch upcycled - test accuracy; not compared: Switch upcycled has no finished run." in text
    assert "Switch upcycled - vs dense (fine-tuned) 0.5500 test accuracy; not compared: Switch upcycled has" in text
    assert (
        "Paper's claim (MPOE at least matches Switch with fewer parameters): not judged: it needs runs of both." in text
    )
    # seed 1 of the mask has no predictions: the comparison pairs seeds 0 and 2
    mask = next(line for line in text.splitlines() if "gradient mask help" in line)
    assert "paired over 2 seeds x 40 test examples" in mask


def test_runs_scored_on_different_test_labels_are_not_paired(tmp_path):
    write_study(tmp_path)
    path = tmp_path / "finetune" / "switch" / "seed1" / "predictions.json"
    predictions = json.loads(path.read_text())
    predictions["test"]["label"] = [1 - y for y in predictions["test"]["label"]]  # another version of the task
    path.write_text(json.dumps(predictions))
    text = write_finetune_report(tmp_path, _plan()).read_text()
    line = next(line for line in text.splitlines() if "match Switch" in line)
    assert line.endswith(
        "not compared: their predictions.json hold different test labels (another task or another "
        "version of its files)."
    )
