"""mpoe-study upcycle: data by corpus part, the study's checks, its report, and the whole study at toy size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _cli
import pytest

from mpoe.config import ConfigError, DataConfig, TrainConfig, validate
from mpoe.study import compare
from mpoe.study.cli import main as study_main
from mpoe.tools import report as base
from mpoe.train.data import corpus

VARIANTS = ("dense", "switch", "mpoe", "mpoe_bond", "mpoe_mask")


def test_embedded_part_selects_one_source(monkeypatch):
    from mpoe.train.data.documents import load_documents

    topics = corpus.pydoc_topics()
    monkeypatch.setattr(corpus, "stdlib_docstrings", lambda **_: ["a docstring"])  # walking the stdlib is slow
    assert corpus.embedded_documents("pydoc_topics") == topics
    assert corpus.embedded_documents("docstrings") == ["a docstring"]
    assert corpus.embedded_documents("all") == topics + ["a docstring"]
    train, val = load_documents(DataConfig(embedded_part="pydoc_topics", val_fraction=0.1))
    assert sorted(train + val) == sorted(topics) and val and not set(train) & set(val)


def test_embedded_part_is_validated():
    cfg = TrainConfig()
    cfg.data.embedded_part = "readme"
    with pytest.raises(ConfigError, match="data.embedded_part='readme'"):
        validate(cfg)
    cfg = TrainConfig()
    cfg.data.name, cfg.data.paths, cfg.data.embedded_part = "text", ["a.txt"], "docstrings"
    with pytest.raises(ConfigError, match="data.embedded_part='docstrings'.*data=embedded only"):
        validate(cfg)


def _fake_runs(losses):
    return [base.Run(Path(f"r{i}"), {"trainer": {"seed": i}}, {"val_loss": v}, []) for i, v in enumerate(losses)]


def test_comparison_sentence_gives_the_paired_interval_and_its_verdict():
    # per-seed differences all -0.5: every resample's mean is -0.5, so the interval is that point; lower loss wins
    apart = compare.compare_sentence("A", _fake_runs([1.9, 2.0, 2.1]), "B", _fake_runs([2.4, 2.5, 2.6]), "Q?")
    assert "A 2.0000 vs B 2.5000 validation loss" in apart
    assert (
        "A - B = -0.5000, 95% interval [-0.5000, -0.5000] (over 3 seeds, bootstrap): A is ahead (lower loss)" in apart
    )
    # per-seed differences 0.01, 0.02, 0.03: the unpaired spread (std 0.5 each) hides what pairing shows; a
    # resample is all seed 0 (or all seed 2) with probability 1/27 > 2.5%, so the interval is [0.01, 0.03]
    paired = compare.compare_sentence("A", _fake_runs([2.01, 2.52, 3.03]), "B", _fake_runs([2.0, 2.5, 3.0]), "Q?")
    assert "A - B = +0.0200, 95% interval [+0.0100, +0.0300] (over 3 seeds, bootstrap): A is behind" in paired
    # per-seed differences -0.05, +0.1, -0.05: the interval [-0.05, +0.1] holds 0
    close = compare.compare_sentence("A", _fake_runs([2.0, 2.1, 1.9]), "B", _fake_runs([2.05, 2.0, 1.95]), "Q?")
    assert "95% interval [-0.0500, +0.1000] (over 3 seeds, bootstrap): not separated." in close
    single = compare.compare_sentence("A", _fake_runs([1.0]), "B", _fake_runs([2.0]), "Q?")
    assert "one seed: no interval" in single and single.endswith("not separated.")
    assert "spread" not in apart + paired + close  # the old rule (sum of the stds) is gone


def test_paper_claim_line_judges_mpoe_against_switch_on_loss():
    def runs(losses, params):
        return [
            base.Run(Path(f"r{i}"), {"trainer": {"seed": i}}, {"val_loss": v, "params_total": params}, [])
            for i, v in enumerate(losses)
        ]

    # MPOE's loss is 0.01 higher in every seed: behind, so the claim is contradicted; it has fewer parameters
    groups = {"mpoe": runs([2.01, 2.51, 3.01], 2_969_408), "switch": runs([2.0, 2.5, 3.0], 4_392_192)}
    line = compare.paper_claim_line(groups)
    assert "**contradicted**: MPOE is behind Switch on validation loss" in line
    assert "[+0.0100, +0.0100] over 3 seeds" in line and "32% fewer" in line
    assert compare.paper_claim_line({"mpoe": groups["mpoe"]}) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0"], "--seeds=0 is invalid"),
        (["--variants", "dense,moe"], "--variants=dense,moe is invalid"),
        (["--set", "model.d_model=-4"], "stage pretrain: model.d_model=-4 is invalid"),
    ],
)
def test_bad_options_stop_in_one_line_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "study"
    assert study_main(["upcycle", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpoe-study: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_a_study_with_another_plan_is_not_mixed_in(tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    plan = out / "plan.json"
    plan.write_text(json.dumps({"seeds": 5}))
    assert study_main(["upcycle", "--out", str(out), "--seeds", "3"]) == 2
    assert "holds a study with another plan" in capsys.readouterr().err
    assert json.loads(plan.read_text()) == {"seeds": 5}


def test_the_readme_gives_the_study_command_and_its_options():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Studies") : readme.index("## Code map")]
    assert "mpoe-study upcycle --out" in section and "mpoe-study finetune --out" in section
    for option in ("--seeds", "--pretrain-steps", "--steps", "--variants", "--set", "--report-only"):
        assert option in section, option
    for option in ("--family", "--task", "--pretrained", "--lr-grid"):  # the fine-tuning study's own
        assert option in section, option


def test_report_only_needs_a_study(tmp_path, capsys):
    assert study_main(["upcycle", "--out", str(tmp_path), "--report-only"]) == 2
    assert "holds no study (no plan.json)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_toy_study_end_to_end(tmp_path, mpoe_cache):
    """The whole study at toy size: every stage is an ordinary run, upcycling is exact at full bonds,
    the continued runs share steps/tokens/data, the report is written, and a rerun repeats nothing."""
    out = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "mpoe.study",
        "upcycle",
        "--out",
        str(out),
        "--seeds",
        "1",
        "--pretrain-steps",
        "3",
        "--steps",
        "2",
        *("--set", "trainer.seq_len=32", "--set", "trainer.eval_batches=1", "--set", "trainer.log_every=1"),
    ]
    proc = subprocess.run(cmd, env=_cli.env(mpoe_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # The pre-trained checkpoint is a plain Hugging Face model with its tokenizer.
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = out / "pretrained" / "hf"
    model = GPT2LMHeadModel.from_pretrained(hf, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    text = "Return the number of items in a container."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE is lossless
    assert len(tok) == model.get_input_embeddings().weight.shape[0]
    pre = base.load_run(out / "pretrain")
    assert pre.config["data"]["embedded_part"] == "docstrings" and pre.config["moe"]["kind"] == "dense"

    # Step 0: Switch copies and full-bond MPOE compute the dense checkpoint's function (top-2, normalised).
    step0 = {v: base.load_run(out / "step0" / v).summary["val_loss"] for v in ("dense", "switch", "mpoe")}
    assert step0["switch"] == pytest.approx(step0["dense"], abs=1e-4)
    assert step0["mpoe"] == pytest.approx(step0["dense"], abs=1e-4)
    assert (out / "step0" / "mpoe_bond" / "summary.json").is_file()

    runs = {v: base.load_run(out / "continue" / v / "seed0") for v in VARIANTS}
    for run in runs.values():
        assert run.config["data"]["embedded_part"] == "pydoc_topics"
        assert run.config["model"]["pretrained"] == str(hf)
        assert run.config["logging"]["wandb"]["group"] == "upcycle_study"
        assert (run.path / "wandb").is_dir()
        assert run.summary["steps"] == 2 and run.summary["tokens_seen"] == runs["dense"].summary["tokens_seen"]
    assert [runs[v].config["moe"]["kind"] for v in VARIANTS] == ["dense", "switch", "mpoe", "mpoe", "mpoe"]
    assert runs["mpoe_bond"].config["moe"]["bond_dim"] == 64
    assert runs["mpoe_mask"].config["moe"]["grad_mask"]["enabled"] is True
    # MPOE shares the central tensor: fewer parameters than Switch of the same shape
    assert runs["mpoe"].summary["params_total"] < runs["switch"].summary["params_total"]

    study = (out / "report" / "study.md").read_text()
    assert study.count("**Does") + study.count("**What") == len(compare.COMPARISONS)
    assert study.count("95% interval") == len(compare.COMPARISONS) + 1  # and the paper-claim line
    assert "Paper's claim (MPOE at least matches Switch with fewer parameters): **" in study
    assert (out / "report" / "study_val_loss.png").is_file() and (out / "report" / "study_load_balance.png").is_file()
    assert base.main([str(out / "continue"), "--out", str(tmp_path / "rep")]) == 0  # mpoe-report reads them
    assert len(base.collect([out / "continue"], warn=print)) == len(VARIANTS)

    # A second call finds every stage done and only rewrites the report.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("**/summary.json")}
    again = subprocess.run(cmd, env=_cli.env(mpoe_cache), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "mpoe.train" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/summary.json")} == mtimes
    (out / "report" / "study.md").unlink()
    assert study_main(["upcycle", "--out", str(out), "--report-only"]) == 0  # from the recorded plan
    assert (out / "report" / "study.md").read_text() == study
