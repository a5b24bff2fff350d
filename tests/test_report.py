"""mpoe-report: aggregation over seeds, plots, broken run dirs; a tiny Hydra multirun end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _cli import env as cli_env

from mpoe.tools import report

PLOTS = ("val_loss.png", "params_vs_val_loss.png")


def _config(kind: str, seed: int, lr: float = 1e-3) -> dict:
    return {
        "model": {"name": "gpt2_tiny", "d_model": 128},
        "moe": {"kind": kind, "num_experts": 4},
        "optim": {"lr": lr},
        "trainer": {"seed": seed, "max_steps": 4},
        "logging": {"wandb": {"name": f"{kind}-{seed}"}, "progress": False},
    }


def make_run(
    path: Path,
    kind: str,
    seed: int,
    val_loss: float,
    *,
    lr: float = 1e-3,
    dropped: int = 0,
    params: int = 1000,
    mfu: float | None = None,
) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(_config(kind, seed, lr)))
    rows = []
    for step in (1, 2, 3, 4):
        row = {"step": step, "loss": val_loss + 1.0 / step, "tokens_dropped": dropped, "tokens_per_s": 100.0}
        if kind != "dense":
            row["expert_load"] = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
        if mfu is not None:
            row["mfu"] = mfu
        if step % 2 == 0:
            row["val_loss"] = val_loss + 0.5 / step
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "params_total": params,
        "params_active": params // 2,
        "val_loss": val_loss,
        "val_ppl": 2.0**val_loss,
        "tokens_per_s": 100.0,
        "tokens_seen": 4000,
        "steps": 4,
        "moe": kind,
        "model": "gpt2_tiny",
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_mean_std_over_seeds(tmp_path):
    make_run(tmp_path / "a0", "switch", 0, 2.0, dropped=5, params=1000)
    make_run(tmp_path / "a1", "switch", 1, 4.0, dropped=15, params=1000)
    make_run(tmp_path / "a2", "switch", 2, 3.0, dropped=10, params=1000, mfu=0.3)
    make_run(tmp_path / "b0", "mpoe", 0, 5.0, params=400)
    make_run(tmp_path / "c0", "mpoe", 0, 6.0, lr=3e-4, params=400)  # another config, not another seed
    runs = report.collect([tmp_path], lambda line: pytest.fail(line))
    groups = report.group_runs(runs)
    assert [len(g.runs) for g in groups] == [3, 1, 1]
    assert [g.label for g in groups] == [
        "moe=switch, optim.lr=0.001",
        "moe=mpoe, optim.lr=0.001",
        "moe=mpoe, optim.lr=0.0003",
    ]
    rows = [report.summarize(g) for g in groups]
    mean, std = rows[0]["val_loss"]
    assert mean == pytest.approx(3.0) and std == pytest.approx(1.0)  # sample std (n - 1) of 2, 4, 3
    assert rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["tokens_dropped"] == pytest.approx((20 + 60 + 40) / 3)  # summed over logged steps, mean over seeds
    assert rows[0]["mfu"] == pytest.approx(0.3)  # only the seed that logged it
    assert rows[0]["load_imbalance"] == pytest.approx(1.6)  # 0.4 / 0.25
    assert rows[1]["val_loss"] == (5.0, None) and rows[1]["mfu"] is None
    assert report.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(2**0.5))

    out = tmp_path / "out"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| moe=switch, optim.lr=0.001 | switch | 3 (0,1,2) | 4 | 4,000 | 1,000 | 500 | 3.0000 ± 1.0000 |" in text
    assert "| moe=mpoe, optim.lr=0.0003 | mpoe | 1 (0) | 4 | 4,000 | 400 | 200 | 6.0000 |" in text
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(out.glob("expert_load_*.png"))) == 3
    assert not list(out.glob(".*.tmp"))


def test_a_folder_given_gets_its_report_in_one_subfolder_and_the_command_says_what_it_read(tmp_path, capsys):
    """Issue 31: a report of a folder went loose into it (report.md beside 18 PNGs of unrelated runs)."""
    make_run(tmp_path / "runs" / "a0", "switch", 0, 2.0)
    make_run(tmp_path / "runs" / "b0", "mpoe", 0, 5.0)
    (tmp_path / "runs" / "notes.txt").write_text("not a run")
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert report.main([str(tmp_path / "runs")]) == 0
    out = tmp_path / "runs" / "report"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([*before, "report"])
    written = sorted(p.name for p in out.iterdir())
    plots = [n for n in written if n.endswith(".png")]
    assert "report.md" in written and len(plots) == len(written) - 1 >= 2
    assert capsys.readouterr().out.strip().splitlines() == [
        f"mpoe-report: read 2 run(s) from {tmp_path / 'runs'} (0 skipped); wrote report.md and {len(plots)} plot(s) "
        f"to {out}"
    ]
    assert report.main([str(tmp_path / "runs")]) == 0  # again: the report folder is not read as a run
    assert "(0 skipped)" in capsys.readouterr().out


def test_report_rows_count_how_a_run_was_measured_but_not_its_seed(tmp_path):
    """Issue 31: two identities. Runs evaluated at other steps are other rows of a report (mpoe-report groups by
    what a run trains and how it is measured), while resume=auto continues such a run (run_keys)."""
    from mpoe.train import run_keys

    runs = [make_run(tmp_path / name, "switch", seed, 3.0) for name, seed in (("a0", 0), ("a1", 1), ("b0", 0))]
    for run, eval_every in zip(runs, (4, 4, 2)):
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        config["trainer"]["eval_every"] = eval_every
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    groups = report.group_runs(report.collect([tmp_path], lambda line: pytest.fail(line)))
    assert [len(g.runs) for g in groups] == [2, 1]
    assert [g.label for g in groups] == ["trainer.eval_every=4", "trainer.eval_every=2"]
    assert run_keys.in_report_grouping("trainer.eval_every") and not run_keys.in_resume_identity("trainer.eval_every")
    assert run_keys.in_resume_identity("trainer.seed") and not run_keys.in_report_grouping("trainer.seed")
    assert run_keys.in_resume_identity("optim.lr") and run_keys.in_report_grouping("optim.lr")
    assert not run_keys.in_resume_identity("trainer.max_steps") and run_keys.in_report_grouping("trainer.max_steps")


def test_broken_run_dirs_are_skipped_in_one_line(tmp_path, capsys):
    good = make_run(tmp_path / "good", "dense", 0, 3.0)
    corrupt = make_run(tmp_path / "corrupt", "dense", 1, 3.0)
    (corrupt / "summary.json").write_text('{"val_loss": 3.')
    unfinished = make_run(tmp_path / "unfinished", "dense", 2, 3.0)
    (unfinished / "summary.json").unlink()
    garbled = make_run(tmp_path / "garbled", "dense", 3, 3.0)
    with open(garbled / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"\n')
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    for line, bad in zip(sorted(err), sorted([corrupt, garbled, unfinished])):
        assert line.startswith(f"mpoe-report: {bad}: skipped: ")
    assert "| 1 (0) |" in (tmp_path / "out" / "report.md").read_text()
    assert good.exists()


def test_validation_without_tokens_is_never_ranked(tmp_path, capsys):
    """Issue 15 finding 1: a validation split smaller than one batch reported val_loss 0.0 (ppl 1), ranked best."""
    real = make_run(tmp_path / "real", "dense", 0, 3.0)
    empty = make_run(tmp_path / "empty", "dense", 1, 0.0)  # an old run: val_loss exactly 0.0, no val_tokens
    zero = make_run(tmp_path / "zero", "dense", 2, 0.5)
    summary = json.loads((zero / "summary.json").read_text())
    (zero / "summary.json").write_text(json.dumps({**summary, "val_tokens": 0}))
    counted = make_run(tmp_path / "counted", "dense", 3, 2.0)
    summary = json.loads((counted / "summary.json").read_text())
    (counted / "summary.json").write_text(json.dumps({**summary, "val_tokens": 4096}))
    out = tmp_path / "out"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith(
        f"mpoe-report: {empty}: skipped: val_loss is exactly 0.0 and summary.json has no val_tokens"
    )
    assert err[1].startswith(f"mpoe-report: {zero}: skipped: val_tokens=0: its validation evaluated no tokens")
    text = (out / "report.md").read_text()
    assert "| 2 (3,0) | " in text and "| 2.5000 ± 0.7071 |" in text  # only the two real runs, as two seeds
    assert real.exists() and empty.exists()


def test_plots_show_what_they_claim(tmp_path):
    """Issue 15 finding 18: legends beside the axes, coinciding markers apart, one seed's expert load (indices are
    not comparable between seeds), training loss beside validation loss, labels without quotes, budgets in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    make_run(tmp_path / "on0", "mpoe", 0, 3.0, params=1000)
    on1 = make_run(tmp_path / "on1", "mpoe", 1, 3.4, params=1000)
    rows = [json.loads(line) for line in (on1 / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["expert_load"] = [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]  # seed 1 routes to other indices
    (on1 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_run(tmp_path / "off0", "mpoe", 0, 3.2, lr=3e-4, params=1000)  # the same size: markers coincide
    groups = report.group_runs(report.collect([tmp_path], lambda line: pytest.fail(line)))
    rows = [report.summarize(g) for g in groups]

    fig = report.params_vs_loss_figure(rows)
    ax = fig.axes[0]
    xs = [c.lines[0].get_xdata()[0] for c in ax.containers]
    assert len(xs) == len(set(xs)) == 4  # total and active of two configurations of equal size, all apart
    fig.canvas.draw()
    legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes_box.x1  # beside the axes: covers no error bar
    plt.close(fig)

    fig = report.val_curves_figure(groups)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert [g.label + " (train)" in labels for g in groups] == [True, True]
    fig.canvas.draw()
    assert fig.axes[0].get_legend().get_window_extent().x0 >= fig.axes[0].get_window_extent().x1
    plt.close(fig)

    seed, series = report.expert_load_series(groups[0])
    assert seed == 0 and series[4][0] == [0.1, 0.2, 0.3, 0.4]  # seed 0's own loads, not a mean with seed 1's

    single = report.group_runs(report.collect([tmp_path / "off0"], print))
    assert single[0].label == "gpt2_tiny moe=mpoe"  # no JSON quotes
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "on0"), str(tmp_path / "on1"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| configuration | moe | seeds | steps | tokens |" in text
    assert "| gpt2_tiny moe=mpoe | mpoe | 2 (0,1) | 4 | 4,000 |" in text


def test_no_usable_run_exits_2(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    (bad / ".hydra").mkdir(parents=True)
    (bad / ".hydra" / "config.yaml").write_text("trainer: {seed: 0}\n")
    monkeypatch.setattr(sys, "argv", ["mpoe-report", str(bad), str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as e:
        report.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mpoe-report: error: no usable run in ")
    assert len(err) == 3  # one line per skipped path, one for the error
    assert not (bad / "report.md").exists()


@pytest.mark.slow
def test_multirun_then_report(tmp_path, mpoe_cache):
    """A tiny dense/MPOE sweep through Hydra's multirun in one process, then mpoe-report on it."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "mpoe.train",
        "-m",
        "moe=dense,mpoe",
        "trainer.max_steps=3",
        "trainer.seq_len=64",
        "trainer.eval_every=3",
        "trainer.log_every=1",
        "trainer.eval_batches=2",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, env=cli_env(mpoe_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for job in jobs:
        rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        names = set().union(*rows)
        assert {
            "loss",
            "lm_loss",
            "aux_loss",
            "z_loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "tokens_dropped",
            "tokens_seen",
            "val_loss",
            "val_ppl",
        } <= names
        if "moe=mpoe" in job.name:
            assert {"expert_load", "grad_norm_central", "grad_norm_auxiliary", "grad_norm_router"} <= names
            for optional in ("load_imbalance", "router_entropy"):  # per MoE layer, when the loop logs them
                assert all(len(r[optional]) == len(r["expert_load"]) for r in rows if optional in r)
        for r in rows:
            assert "mfu" not in r or 0 < r["mfu"] < 1

    broken = sweep / "9_broken"
    (broken / ".hydra").mkdir(parents=True)
    (broken / "summary.json").write_text("{")
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "mpoe.tools.report", str(sweep), "--out", str(out)],
        env=cli_env(mpoe_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"mpoe-report: {broken}: skipped: no .hydra/config.yaml (not a mpoe-train run directory)"
    ]
    text = (out / "report.md").read_text()
    for column in report.COLUMNS:
        assert f" {column} |" in text
    table = [line for line in text.split("## Plots")[0].splitlines() if line.startswith("| moe=")]
    assert [line.split(" | ")[1] for line in table] == ["dense", "mpoe"]
    for line in table:
        cells = line.strip("|").split(" | ")
        assert all(c.strip() for c in cells)
        assert cells[report.COLUMNS.index("val loss")].strip().replace(".", "").isdigit()  # val loss of one seed
        assert cells[report.COLUMNS.index("steps")].strip() == "3"  # the budget every configuration had
    for name in PLOTS + ("expert_load_1_moe_mpoe.png",):
        assert (out / name).stat().st_size > 1000
