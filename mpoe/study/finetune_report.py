"""The fine-tuning study's report: what the paper measures (task accuracy), with the studies' comparison rule.

Reads the study's layout (mpoe.study.finetune): `OUT/pilot/<variant>/lr<LR>/` (seed 0 over the lr grid) and
`OUT/finetune/<variant>/seed<k>/` (seeds k >= 1 at the chosen lr; seed 0 is the pilot run at that lr).
Writes into OUT/report/: `report.md` and its plots as `mpoe-report` makes them for every fine-tune run,
and `study.md`:

- setup: the pre-trained model, the task and its split sizes, steps, routing and optimizer settings;
- the lr pilot: validation accuracy per variant and lr, and the lr `choose_lr` picks from it;
- results: test accuracy as mean +- sample std over seeds, parameters (total, active, expert, MPOE central);
- comparisons: the paired difference of test accuracy a - b over (seed, test example), from each run's
  predictions.json, its 95% bootstrap interval (mpoe.study.stats) and verdict, and the paper-claim line;
- the measured gradient-mask ratio: the central tensors' update norm with the mask over without, same seed;
- plots: router entropy and expert divergence over steps per variant (mean over MoE layers and seeds).

A variant with missing runs is reported with the runs that exist; a comparison needs runs of both variants
on a common seed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mpoe.study.finetune import lr_name
from mpoe.study.stats import choose_lr, paired_bootstrap, paper_claim, verdict
from mpoe.tools import report as base

LABELS = {
    "dense": "dense (fine-tuned)",
    "switch": "Switch upcycled",
    "mpoe": "MPOE upcycled, full bonds",
    "mpoe_mask": "MPOE + gradient mask",
    "mpoe_central_frozen": "MPOE, central tensors frozen",
}

# (a, b, what the comparison asks), by the study's variant names
COMPARISONS = (
    ("mpoe", "switch", "Does MPOE (full bonds) match Switch?"),
    ("mpoe", "dense", "Does upcycling to MPOE beat dense fine-tuning?"),
    ("switch", "dense", "Does upcycling to Switch beat dense fine-tuning?"),
    ("mpoe_mask", "mpoe", "Does the gradient mask help MPOE?"),
    ("mpoe_central_frozen", "mpoe", "What does freezing the central tensors cost MPOE?"),
)

# metrics.jsonl keys plotted per variant: (key, axis label, file name)
PLOTTED = (
    ("router_entropy", "router entropy (nats, mean over tokens)", "study_router_entropy.png"),
    (
        "expert_divergence",
        "expert divergence (relative, from the mean W)",
        "study_expert_divergence.png",
    ),
)


@dataclass
class Variant:
    name: str
    pilot: dict[float, Optional[base.Run]]  # lr -> the seed-0 run at that lr (None: missing)
    lr: Optional[float] = None  # chosen by choose_lr from the pilot's validation accuracy
    runs: list[base.Run] = field(default_factory=list)  # seed 0 at the chosen lr, then seeds >= 1

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)


def _one_run(path: Path) -> Optional[base.Run]:
    try:
        return base.load_run(path)
    except base.RunError:
        return None


def _seed_dirs(folder: Path) -> list[Path]:
    """seed<k>/ for k >= 1: seed 0 is the pilot run at the chosen lr."""
    if not folder.is_dir():
        return []
    named = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("seed") and p.name[4:].isdigit()]
    seeds = [p for p in named if int(p.name[4:]) >= 1]
    return sorted(seeds, key=lambda p: int(p.name[4:]))


def load_variant(out: Path, plan, name: str) -> Variant:
    pilot = {float(lr): _one_run(out / "pilot" / name / lr_name(lr)) for lr in plan.lr_grid}
    scores = {lr: run.summary.get("val_accuracy") for lr, run in pilot.items() if run is not None}
    try:
        lr = choose_lr(scores)
    except ValueError:
        lr = None
    first = [pilot[lr]] if lr is not None else []
    later = [run for run in map(_one_run, _seed_dirs(out / "finetune" / name)) if run is not None]
    return Variant(name, pilot, lr, first + later)


def _accuracy(runs: list[base.Run], key: str) -> tuple[Optional[float], Optional[float]]:
    return base.mean_std([r.summary.get(key) for r in runs])


# ---------------------------------------------------------------- tables


def pilot_table(variants: list[Variant], lr_grid: list[float]) -> str:
    grid = [float(lr) for lr in lr_grid]
    lines = [
        "| variant | " + " | ".join(f"val acc, lr {format(lr, 'g')}" for lr in grid) + " | chosen lr |",
        "|---|" + "---:|" * (len(grid) + 1),
    ]
    for v in variants:
        cells = [v.label]
        for lr in grid:
            run = v.pilot.get(lr)
            acc = None if run is None else run.summary.get("val_accuracy")
            cells.append("-" if not base._finite(acc) else f"{acc:.4f}")
        cells.append("-" if v.lr is None else format(v.lr, "g"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_table(variants: list[Variant]) -> str:
    head = "| variant | seeds | lr | test accuracy | params total | params active | expert params | MPOE central |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        s = v.runs[0].summary if v.runs else {}
        seeds = f"{len(v.runs)} ({','.join(str(r.seed) for r in v.runs)})" if v.runs else "0"
        cells = [
            v.label,
            seeds,
            "-" if v.lr is None else format(v.lr, "g"),
            base._fmt_pm(_accuracy(v.runs, "test_accuracy"), 4),
            base._fmt_int(s.get("params_total")),
            base._fmt_int(s.get("params_active")),
            base._fmt_int(s.get("params_expert")),
            base._fmt_int(s.get("params_central")) if s.get("params_central") else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- comparisons


def test_predictions(run: base.Run) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(label, predicted) per test example from the run's predictions.json; None when unreadable."""
    try:
        test = json.loads((run.path / "predictions.json").read_text())["test"]
        label, predicted = np.asarray(test["label"]), np.asarray(test["predicted"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if label.ndim != 1 or label.shape != predicted.shape or not label.size:
        return None
    return label, predicted


def correct_on_test(run: base.Run) -> Optional[np.ndarray]:
    """1/0 per test example (predicted == label); None when unreadable."""
    read = test_predictions(run)
    return None if read is None else (read[0] == read[1]).astype(np.float64)


def paired_correct(runs_a: list[base.Run], runs_b: list[base.Run]) -> tuple[np.ndarray, np.ndarray] | str:
    """[seeds, examples] correctness of both variants on the seeds both ran, or why there is none."""
    a = {json.dumps(r.seed): correct_on_test(r) for r in runs_a}
    b = {json.dumps(r.seed): correct_on_test(r) for r in runs_b}
    seeds = sorted(set(a) & set(b), key=lambda s: (len(s), s))
    if not seeds:
        return "no seed ran in both"
    rows = [(a[s], b[s]) for s in seeds if a[s] is not None and b[s] is not None]
    if not rows:
        return "no common seed has a readable predictions.json in both"
    if len({x.shape for pair in rows for x in pair}) != 1:
        return "their predictions.json cover different numbers of test examples"
    read = [test_predictions(r) for r in runs_a + runs_b if json.dumps(r.seed) in seeds]
    labels = [r[0] for r in read if r is not None]
    if any(not np.array_equal(labels[0], other) for other in labels[1:]):
        return "their predictions.json hold different test labels (another task or another version of its files)"
    return np.stack([x for x, _ in rows]), np.stack([y for _, y in rows])


def _over(interval) -> str:
    seeds = f"{interval.n_seeds} seed{'s' if interval.n_seeds != 1 else ''}"
    return f"{seeds} x {interval.n_examples} test examples"


def comparison_line(va: Variant, vb: Variant, question: str) -> str:
    (ma, _), (mb, _) = _accuracy(va.runs, "test_accuracy"), _accuracy(vb.runs, "test_accuracy")
    head = f"**{question}** {va.label} {base._fmt_pm((ma, None), 4)} vs {vb.label} {base._fmt_pm((mb, None), 4)}"
    missing = [v.label for v in (va, vb) if not v.runs]
    if missing:
        return f"{head} test accuracy; not compared: {' and '.join(missing)} has no finished run."
    paired = paired_correct(va.runs, vb.runs)
    if isinstance(paired, str):
        return f"{head} test accuracy; not compared: {paired}."
    interval = paired_bootstrap(*paired)
    side = verdict(interval)
    said = {"ahead": f"{va.label} is ahead", "behind": f"{va.label} is behind", "not separated": "not separated"}
    return (
        f"{head} test accuracy (means over seeds); paired over {_over(interval)}, {va.label} - {vb.label} = "
        f"{interval.text()}: {said[side]}."
    )


def claim_line(by_name: dict[str, Variant]) -> str:
    mpoe, switch = by_name.get("mpoe"), by_name.get("switch")
    if mpoe is None or switch is None or not mpoe.runs or not switch.runs:
        return "Paper's claim (MPOE at least matches Switch with fewer parameters): not judged: it needs runs of both."
    paired = paired_correct(mpoe.runs, switch.runs)
    if isinstance(paired, str):
        return f"Paper's claim (MPOE at least matches Switch with fewer parameters): not judged: {paired}."
    return paper_claim(
        paired_bootstrap(*paired),
        mpoe.runs[0].summary.get("params_total"),
        switch.runs[0].summary.get("params_total"),
    )


# ---------------------------------------------------------------- the gradient mask's measured effect


def mean_central_update(run: base.Run) -> Optional[float]:
    """Mean over logged steps of central_update_norm, averaged over the MPOE layers."""
    per_step = [_layer_mean(r.get("central_update_norm")) for r in run.metrics]
    per_step = [x for x in per_step if x is not None]
    return statistics.fmean(per_step) if per_step else None


def _layer_mean(value) -> Optional[float]:
    values = value if isinstance(value, list) else [value]
    values = [x for x in values if base._finite(x)]
    return statistics.fmean(values) if values else None


def _seed_and_lr(run: base.Run) -> tuple:
    return run.seed, run.config.get("optim", {}).get("lr")


def all_runs(variant: Variant) -> list[base.Run]:
    """The variant's runs at its chosen lr and its pilot runs at the other rates."""
    return variant.runs + [r for r in variant.pilot.values() if r is not None and r not in variant.runs]


def mask_ratios(masked: list[base.Run], plain: list[base.Run]) -> dict[tuple, float]:
    """Per (seed, lr) both ran: mean central update norm with the mask / without it. Only runs at the same
    learning rate are paired: the update's size follows the rate, and each variant's pilot may choose another."""
    without = {_seed_and_lr(r): mean_central_update(r) for r in plain}
    ratios = {}
    for run in masked:
        key = _seed_and_lr(run)
        num, den = mean_central_update(run), without.get(key)
        if num is not None and den:
            ratios[key] = num / den
    return dict(sorted(ratios.items(), key=lambda kv: (kv[0][1], json.dumps(kv[0][0]))))


def mask_ratio_lines(by_name: dict[str, Variant]) -> list[str]:
    masked, plain = by_name.get("mpoe_mask"), by_name.get("mpoe")
    if masked is None or plain is None:
        return []
    ratios = mask_ratios(all_runs(masked), all_runs(plain))
    if not ratios:
        return [
            "The gradient mask's measured ratio: no seed has central_update_norm logged in both mpoe_mask and mpoe.",
            "",
        ]
    values = list(ratios.values())
    mask = all_runs(masked)[0].config.get("moe", {}).get("grad_mask", {})
    per_seed = ", ".join(f"seed {s} at lr {format(lr, 'g')}: {r:.3f}" for (s, lr), r in ratios.items())
    return [
        f"The gradient mask's measured ratio: **{statistics.fmean(values):.3f}** (range {min(values):.3f} to "
        f"{max(values):.3f} over {len(values)} pair{'s' if len(values) != 1 else ''} of runs; {per_seed}).",
        "",
        "Per pair, the mean over logged steps of `central_update_norm` (the L2 norm of the change one optimizer "
        "step makes to the MPOE central tensors, averaged over MPOE layers) in mpoe_mask, divided by the same in "
        "mpoe at the same seed and learning rate (same data order, router init and schedule; the pilot's runs at "
        "every rate count). It measures the AdamW update of the central "
        f"tensors with the mask (keep_prob {mask.get('keep_prob')} on the {mask.get('target')} tensor, "
        f"rescale {mask.get('rescale')}) against without: AdamW normalises each entry's step by its own gradient "
        "history, so dropping gradient entries need not shrink the update in proportion.",
        "",
    ]


# ---------------------------------------------------------------- plots


def metric_by_step(runs: list[base.Run], key: str) -> dict[int, float]:
    """{step: the metric's mean over MoE layers and seeds} over the steps any run logged it."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for r in run.metrics:
            value = _layer_mean(r.get(key))
            if value is not None:
                by_step.setdefault(r["step"], []).append(value)
    return {step: statistics.fmean(values) for step, values in sorted(by_step.items())}


def plot_metric(variants: list[Variant], key: str, ylabel: str, path: Path) -> bool:
    # Deferred: matplotlib is slow to import and only the plots need it.
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drew = False
    for i, v in enumerate(variants):
        series = metric_by_step(v.runs, key)
        if series:
            ax.plot(list(series), list(series.values()), color=f"C{i % 10}", marker="o", ms=3, label=v.label)
            drew = True
    if drew:
        ax.set(xlabel="fine-tuning step", ylabel=ylabel, title=f"{key} (mean over MoE layers and seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        base._save_figure(fig, path)
    plt.close(fig)
    return drew


# ---------------------------------------------------------------- setup


def setup_lines(out: Path, plan, variants: list[Variant]) -> list[str]:
    lines = ["## Setup", "", f"Plan: `{json.dumps(plan.__dict__)}`", ""]
    pretrained = plan.pretrained or str(out / "pretrained" / "hf")
    pre = _one_run(out / "pretrain")
    model = f"- Pre-trained model: `{pretrained}`"
    if pre is not None:
        s, name = pre.summary, pre.config.get("model", {}).get("name")
        model += (
            f", a dense {name} pre-trained here ({base._fmt_int(s.get('params_total'))} parameters, "
            f"{s.get('steps')} steps, validation loss {s.get('val_loss'):.4f})"
        )
    lines.append(model + ".")
    runs = [r for v in variants for r in v.runs]
    if runs:
        lines += _task_lines(runs[0], plan)
    routed = next((r for name in ("mpoe", "switch") for v in variants if v.name == name for r in v.runs), None)
    if routed is not None:
        lines.append(_routing_line(routed))
    frozen = next((v.runs[0] for v in variants if v.name == "mpoe_central_frozen" and v.runs), None)
    if frozen is not None:
        scale = frozen.config.get("optim", {}).get("central_lr_scale")
        lines.append(
            f"- mpoe_central_frozen: `optim.central_lr_scale={scale}` (0: the central tensors are not trained)."
        )
    return lines + [""]


def _task_lines(run: base.Run, plan) -> list[str]:
    s, t = run.summary, run.config.get("trainer", {})
    words = ", ".join(s.get("label_words") or []) or "-"
    return [
        f"- Task `{s.get('task', plan.task)}` (label words: {words}): {base._fmt_int(s.get('val_examples'))} "
        f"validation examples (the lr pilot selects on them), {base._fmt_int(s.get('test_examples'))} test "
        "examples (the results and comparisons).",
        f"- Fine-tuning: {s.get('steps')} steps of {t.get('global_batch_size') or t.get('micro_batch_size')} "
        f"sequences of at most {t.get('seq_len')} tokens per run, family {plan.family}.",
    ]


def _routing_line(run: base.Run) -> str:
    moe, o = run.config.get("moe", {}), run.config.get("optim", {})
    return (
        f"- Routing (from `{run.path / '.hydra' / 'config.yaml'}`): {moe.get('num_experts')} experts every "
        f"{moe.get('every')} layers, top-{moe.get('top_k')}, gate scale `{moe.get('gate_scale')}`, capacity "
        f"{moe.get('capacity_factor') or 'dropless'}, aux loss {moe.get('aux_loss_coef')}, z-loss "
        f"{moe.get('z_loss_coef')}; AdamW (warmup {o.get('warmup_steps')}, cosine to {o.get('min_lr_ratio')} x, "
        f"weight decay {o.get('weight_decay')}, central lr scale {o.get('central_lr_scale')})."
    )


# ---------------------------------------------------------------- the report


def write_finetune_report(out: Path, plan) -> Path:
    """OUT/report/{report.md, study.md} and their plots; returns study.md's path."""
    # Deferred: matplotlib is slow to import and only the plots need it.
    import matplotlib

    matplotlib.use("Agg")
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    variants = [load_variant(out, plan, name) for name in plan.variants]
    by_name = {v.name: v for v in variants}
    pilots = [r for v in variants for r in v.pilot.values() if r is not None]
    later = [r for v in variants for r in (v.runs[1:] if v.lr is not None else v.runs)]  # runs[0]: a pilot run
    if pilots or later:
        base.write_report(pilots + later, report_dir, [])
    parts = [f"# Fine-tuning study: {plan.family} upcycled and fine-tuned on `{plan.task}`", ""]
    parts += setup_lines(out, plan, variants)
    parts += ["## Learning-rate pilot (seed 0, validation accuracy)", "", pilot_table(variants, plan.lr_grid), ""]
    parts += [
        "The chosen lr has the highest validation accuracy (a tie goes to the smaller lr); every seed runs at it.",
        "",
        "## Results",
        "",
        results_table(variants),
        "",
        "Test accuracy: mean ± sample std over seeds (seed 0 is the pilot run at the chosen lr). Params: total, "
        "active per token, in experts, and MPOE's central tensors (shared by the experts).",
        "",
        "## Comparisons",
        "",
        "Each comparison pairs the variants by seed and by test example: the difference of correctness (1/0) per "
        "(seed, example), its mean, and a 95% bootstrap interval (seeds and examples resampled with replacement, "
        "one example draw for every seed; percentiles of the mean). A variant is ahead or behind where the "
        "interval excludes 0, else the two are not separated.",
        "",
    ]
    for a, b, question in COMPARISONS:
        if a in by_name and b in by_name:
            parts.append("- " + comparison_line(by_name[a], by_name[b], question))
    parts += ["", claim_line(by_name), ""]
    mask = mask_ratio_lines(by_name)
    if mask:
        parts += ["## The gradient mask, measured", ""] + mask
    parts += ["## Plots", ""]
    for key, ylabel, name in PLOTTED:
        if plot_metric(variants, key, ylabel, report_dir / name):
            parts += [f"### {key}", "", f"![{key}]({name})", ""]
    parts += ["Every run's curves and expert loads: [report.md](report.md) (`mpoe-report`).", ""]
    path = report_dir / "study.md"
    base._atomic_write(path, ("\n".join(parts) + "\n").encode())
    return path
