"""The upcycling study's report: `mpoe-report`'s table and plots, plus what the study adds.

Written into OUT/report/: `report.md` and its plots exactly as `mpoe-report OUT/continue` makes them,
and `study.md`, which adds

- the pre-training run (its validation curve and final loss) and each variant's step-0 loss;
- a table per variant: validation loss/perplexity as mean +- sample std over seeds, parameters
  (total, active, expert, MPOE central/auxiliary), tokens/s;
- one sentence per comparison by the studies' rule (mpoe.study.stats): the paired difference of
  validation loss per seed (a seed is the same data order in every variant), its 95% bootstrap
  interval over seeds, and a verdict: ahead / behind where the interval excludes 0 (lower loss is
  better), else "not separated"; and one line on the paper's claim for MPOE vs Switch by that rule;
- plots: validation curves with the seed band, and expert load balance (max/mean load over experts,
  worst MoE layer) over training steps.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from mpoe.study.stats import paired_bootstrap, paper_claim, verdict
from mpoe.study.upcycle import step0_variant
from mpoe.tools import report as base

# (a, b, what the comparison asks), by the study's variant names
COMPARISONS = (
    ("switch", "dense", "Does upcycling to Switch beat further dense training?"),
    ("mpoe", "dense", "Does upcycling to MPOE beat further dense training?"),
    ("mpoe", "switch", "Does MPOE (full bonds) match Switch?"),
    ("mpoe_bond", "mpoe", "What does the bond cap cost MPOE?"),
    ("mpoe_bond", "switch", "Does MPOE at the bond cap match Switch?"),
    ("mpoe_mask", "mpoe", "Does the gradient mask help MPOE?"),
)


def variant_label(variant: str, runs: Optional[list] = None) -> str:
    bond = runs[0].config.get("moe", {}).get("bond_dim") if runs else None
    return {
        "dense": "dense (further training)",
        "switch": "Switch upcycled",
        "mpoe": "MPOE upcycled, full bonds",
        "mpoe_bond": f"MPOE upcycled, bond <= {bond}",
        "mpoe_mask": "MPOE upcycled, full bonds + gradient mask",
    }[variant]


def _runs(folder: Path) -> list[base.Run]:
    return base.collect([folder], warn=lambda line: None) if folder.is_dir() else []


def variant_runs(out: Path, variants: list[str]) -> dict[str, list[base.Run]]:
    found = {v: _runs(out / "continue" / v) for v in variants}
    return {v: runs for v, runs in found.items() if runs}


def _one_run(path: Path) -> Optional[base.Run]:
    try:
        return base.load_run(path)
    except base.RunError:
        return None


def stats(runs: list[base.Run], key: str) -> tuple[Optional[float], Optional[float]]:
    return base.mean_std([r.summary.get(key) for r in runs])


def compare_sentence(name_a: str, runs_a: list, name_b: str, runs_b: list, question: str) -> str:
    """One sentence: the two means, and the per-seed paired difference a - b with its interval and verdict."""
    (ma, _), (mb, _) = stats(runs_a, "val_loss"), stats(runs_b, "val_loss")
    a, b = paired_losses(runs_a, runs_b)
    head = f"**{question}** {name_a} {ma:.4f} vs {name_b} {mb:.4f} validation loss (means over seeds)"
    if not a:
        return f"{head}; no seed ran in both, so there is no paired comparison."
    interval = paired_bootstrap(a, b)
    side = verdict(interval, higher_is_better=False)
    seeds = (
        f"over {len(a)} seeds" if len(a) > 1 else "one seed: no interval, a single difference says nothing about noise"
    )
    said = {
        "ahead": f"{name_a} is ahead (lower loss)",
        "behind": f"{name_a} is behind (higher loss)",
        "not separated": "not separated",
    }[side]
    return (
        f"{head}; paired by seed (the same data order in every variant), {name_a} - {name_b} = "
        f"{interval.text()} ({seeds}, bootstrap): {said}."
    )


def paired_losses(runs_a: list, runs_b: list) -> tuple[list[float], list[float]]:
    """The validation losses of the seeds both ran, in seed order: a seed is the same data order in every
    variant, so pairing removes the part of the spread that the data order causes alike in both."""
    a = {json.dumps(r.seed): r.summary.get("val_loss") for r in runs_a}
    b = {json.dumps(r.seed): r.summary.get("val_loss") for r in runs_b}
    seeds = [s for s in sorted(set(a) & set(b)) if base._finite(a[s]) and base._finite(b[s])]
    return [a[s] for s in seeds], [b[s] for s in seeds]


def paper_claim_line(groups: dict[str, list]) -> Optional[str]:
    """The paper's claim (MPOE at least matches Switch with fewer parameters) judged on validation loss;
    None without both variants or a seed they share."""
    if "mpoe" not in groups or "switch" not in groups:
        return None
    a, b = paired_losses(groups["mpoe"], groups["switch"])
    if not a:
        return None
    return paper_claim(
        paired_bootstrap(a, b),
        groups["mpoe"][0].summary.get("params_total"),
        groups["switch"][0].summary.get("params_total"),
        higher_is_better=False,
        measure="validation loss of continued pre-training (a proxy: the paper measures task scores)",
    )


def plot_curves_with_band(
    groups: dict[str, list], labels: dict[str, str], path: Path, pretrain=None, step0: Optional[dict] = None
) -> bool:
    """Mean validation loss over seeds with a min-max band per variant, from the step-0 evaluation when
    there is one (and the pre-training curve apart)."""
    # Deferred: matplotlib (numpy with it) is slow to import and only the plots need it.
    import matplotlib.pyplot as plt
    import numpy as np

    panels = 2 if pretrain is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][-1]
    drew = False
    for i, (variant, runs) in enumerate(groups.items()):
        start = (step0 or {}).get(variant)
        first = {0: start.summary["val_loss"]} if start is not None else {}
        curves = [
            {**first, **{r["step"]: r["val_loss"] for r in run.metrics if base._finite(r.get("val_loss"))}}
            for run in runs
        ]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = np.array([[c[s] for s in steps] for c in curves])
        color = f"C{i % 10}"
        ax.plot(steps, values.mean(0), color=color, marker="o", ms=3, label=labels[variant])
        if len(runs) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
        drew = True
    ax.set(xlabel="continued-training step", ylabel="validation loss (new domain)", title="Continued training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if pretrain is not None:
        pts = [(r["step"], r["val_loss"]) for r in pretrain.metrics if base._finite(r.get("val_loss"))]
        if pts:
            axes[0][0].plot(*zip(*pts), color="k", marker="o", ms=3)
        axes[0][0].set(xlabel="pre-training step", ylabel="validation loss", title="Dense pre-training")
        axes[0][0].grid(alpha=0.3)
    if drew:
        base._save_figure(fig, path)
    plt.close(fig)
    return drew


def imbalance_series(run: base.Run) -> list[tuple[int, float]]:
    """(step, max/mean expert load of the worst MoE layer) for every logged step."""
    out = []
    for r in run.metrics:
        imb = r.get("load_imbalance")
        if isinstance(imb, list) and imb and all(base._finite(x) for x in imb):
            out.append((r["step"], max(imb)))
    return out


def plot_load_balance(groups: dict[str, list], labels: dict[str, str], path: Path) -> bool:
    # Deferred: matplotlib is slow to import and only the plots need it.
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drew = False
    for i, (variant, runs) in enumerate(groups.items()):
        by_step: dict[int, list[float]] = {}
        for run in runs:
            for step, value in imbalance_series(run):
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], color=f"C{i % 10}", label=labels[variant])
        drew = True
    if drew:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(
            xlabel="continued-training step",
            ylabel="max / mean expert load (worst layer)",
            title="Expert load balance (1 = even; mean over seeds)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        base._save_figure(fig, path)
    plt.close(fig)
    return drew


def _fmt(ms: tuple, digits: int) -> str:
    return base._fmt_pm(ms, digits)


def variant_table(groups: dict[str, list], labels: dict[str, str], step0: dict[str, Optional[base.Run]]) -> str:
    head = (
        "| variant | seeds | val loss at step 0 | val loss | val ppl | params total | params active "
        "| expert params | MPOE central / auxiliary | tokens/s | load max/mean |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, runs in groups.items():
        s = runs[0].summary
        central, aux = s.get("params_central", 0), s.get("params_auxiliary", 0)
        zero = step0.get(variant)
        imb = base.mean_std([base.run_load_imbalance(r) for r in runs])[0]
        cells = [
            labels[variant],
            str(len(runs)),
            "-" if zero is None else f"{zero.summary['val_loss']:.4f}",
            _fmt(stats(runs, "val_loss"), 4),
            _fmt(stats(runs, "val_ppl"), 2),
            base._fmt_int(s.get("params_total")),
            base._fmt_int(s.get("params_active")),
            base._fmt_int(s.get("params_expert")),
            f"{central:,} / {aux:,}" if central else "-",
            base._fmt_int(stats(runs, "tokens_per_s")[0]),
            "-" if imb is None else f"{imb:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_study_report(out: Path, plan) -> Path:
    """OUT/report/{report.md, study.md} and their plots; returns study.md's path."""
    # Deferred: matplotlib is slow to import and only the plots need it.
    import matplotlib

    matplotlib.use("Agg")
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    groups = variant_runs(out, plan.variants)
    all_runs = [r for runs in groups.values() for r in runs]
    if all_runs:
        base.write_report(all_runs, report_dir, [])
    labels = {v: variant_label(v, groups.get(v)) for v in plan.variants}
    pretrain = _one_run(out / "pretrain")
    step0 = {v: _one_run(out / "step0" / step0_variant(v)) for v in plan.variants}
    parts = ["# Upcycling study: dense GPT-2 pre-trained, then continued as dense, Switch and MPOE", ""]
    parts += _setup_lines(out, plan, pretrain, all_runs)
    parts += ["## Results", "", variant_table(groups, labels, step0), ""]
    parts += [
        "Val loss at step 0: the pre-trained checkpoint upcycled, before any continued training, on the new "
        "domain's validation set. Val loss/ppl: after continued training, mean ± sample std over seeds. "
        "Tokens/s: training throughput on a shared machine (noisy). Load max/mean: most loaded expert over "
        "the mean, worst MoE layer, averaged over logged steps (1 = even).",
        "",
        "## Comparisons",
        "",
        "Each comparison pairs the variants by seed (the same data order in both): the difference of validation "
        "loss per seed, its mean, and a 95% bootstrap interval over seeds (seeds resampled with replacement, "
        "percentiles of the mean). Lower loss is better: a variant is ahead or behind where the interval excludes "
        "0, else the two are not separated.",
        "",
    ]
    for a, b, question in COMPARISONS:
        if a in groups and b in groups:
            parts.append("- " + compare_sentence(labels[a], groups[a], labels[b], groups[b], question))
    claim = paper_claim_line(groups)
    parts += ["", claim, ""] if claim else [""]
    plots = []
    if plot_curves_with_band(groups, labels, report_dir / "study_val_loss.png", pretrain, step0):
        plots.append(("Validation loss (mean over seeds, band = min..max)", "study_val_loss.png"))
    if plot_load_balance(groups, labels, report_dir / "study_load_balance.png"):
        plots.append(("Expert load balance over time", "study_load_balance.png"))
    parts += ["## Plots", ""]
    for title, name in plots:
        parts += [f"### {title}", "", f"![{title}]({name})", ""]
    parts += ["Per-run curves and per-expert load heatmaps: [report.md](report.md) (`mpoe-report`).", ""]
    path = report_dir / "study.md"
    base._atomic_write(path, ("\n".join(parts) + "\n").encode())
    return path


def _setup_lines(out: Path, plan, pretrain: Optional[base.Run], runs: list) -> list[str]:
    lines = ["## Setup", "", f"Plan: `{json.dumps(plan.__dict__)}`", ""]
    if pretrain is not None:
        cfg, s = pretrain.config, pretrain.summary
        m, t = cfg["model"], cfg["trainer"]
        lines.append(
            f"- Pre-training: dense {m['name']} (d_model {m['d_model']}, {m['num_layers']} layers, FFN {m['d_ff']}), "
            f"{s['params_total']:,} parameters, on `data.embedded_part={cfg['data']['embedded_part']}`, "
            f"{s['steps']} steps of {t['global_batch_size'] or t['micro_batch_size']} x {t['seq_len']} tokens "
            f"({s['tokens_seen']:,} tokens), final validation loss {s['val_loss']:.4f} (ppl {s['val_ppl']:.1f}), "
            f"{s['wall_s']:.0f} s."
        )
    if runs:
        cfg, s = runs[0].config, runs[0].summary
        t, moe, o = cfg["trainer"], cfg["moe"], cfg["optim"]
        lines.append(
            f"- Continued training from `{out / 'pretrained' / 'hf'}` on `data.embedded_part="
            f"{cfg['data']['embedded_part']}`: every run {s['steps']} steps, {s['tokens_seen']:,} tokens, "
            f"lr {o['lr']} (warmup {o['warmup_steps']}, cosine to {o['min_lr_ratio']} x), "
            f"MoE: {moe['num_experts']} experts every {moe['every']} layers, top-{moe['top_k']}, "
            f"capacity {moe['capacity_factor'] or 'dropless'}, aux loss {moe['aux_loss_coef']}, "
            f"gradient mask keep_prob {moe['grad_mask']['keep_prob']} on the {moe['grad_mask']['target']} tensor."
        )
    return lines + [""]
