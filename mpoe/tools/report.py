"""`mpoe-report RUN_DIR... [--out DIR]`: compare finished runs in one report.md and a few PNG plots.

Reads only what a run directory holds (`.hydra/config.yaml`, `summary.json`,
`metrics.jsonl`), never W&B. A RUN_DIR is one run, or any folder above runs (a
Hydra multirun directory): every directory below it holding `.hydra/` or
`summary.json` is a run. Runs are grouped by their composed config minus the
seed (and minus keys that cannot change the numbers: logging, checkpointing,
resume, cache paths: `run_keys.in_report_grouping`), so each row of the table is
one configuration, its validation loss and perplexity given as mean +- sample
std over its seeds. Everything goes into one folder: `--out`, by default
`report/` inside the one folder given (else `./report`); the command prints that
folder and how many runs it read from where.

A run that cannot be read (no or corrupt summary.json, unreadable
metrics.jsonl, no config), or whose validation covered no tokens (its
`val_tokens` is 0, or an older run's val_loss is exactly 0.0 with no
`val_tokens`), is named on stderr in one line and skipped, never ranked; with no
usable run the command says so in one line and exits 2. Files are written
atomically (a temporary file, then a rename), so a report is never half-written.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mpoe.process import quiet_library_notices
from mpoe.train.run_keys import flatten, in_report_grouping

_SKIP_DIRS = {"checkpoints", "wandb", ".hydra", "__pycache__"}


class RunError(Exception):
    """A run directory that cannot be used; the message is one line."""


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    metrics: list[dict]

    @property
    def seed(self) -> Any:
        return self.config.get("trainer", {}).get("seed")

    @property
    def key(self) -> tuple:
        return tuple(
            sorted((k, json.dumps(v, sort_keys=True)) for k, v in flatten(self.config).items() if in_report_grouping(k))
        )


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)


# ---------------------------------------------------------------- reading runs


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself when it is a run; else every run below it, in a stable order."""
    if _looks_like_run(path):
        return [path]
    found = []
    for root, dirs, _ in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        here = Path(root)
        if here != path and _looks_like_run(here):
            found.append(here)
            dirs[:] = []
    return sorted(found, key=_job_order)


def _looks_like_run(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "summary.json").exists()


def _job_order(path: Path) -> tuple:
    """Hydra job dirs `N_overrides` in job order, then by name."""
    head = path.name.split("_", 1)[0]
    return (str(path.parent), int(head) if head.isdigit() else math.inf, path.name)


def load_run(path: Path) -> Run:
    cfg_file = path / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        raise RunError("no .hydra/config.yaml (not a mpoe-train run directory)")
    try:
        config = yaml.safe_load(cfg_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f".hydra/config.yaml unreadable ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise RunError(".hydra/config.yaml is not a mapping")
    summary_file = path / "summary.json"
    if not summary_file.is_file():
        raise RunError("no summary.json (the run did not finish)")
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"summary.json is corrupt ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(summary, dict):
        raise RunError("summary.json is not a JSON object")
    if summary.get("dry_run"):
        raise RunError("a dry run (parameter counts only, no validation loss)")
    if not _finite(summary.get("val_loss")):
        raise RunError(f"summary.json has no finite val_loss ({summary.get('val_loss')!r})")
    _check_validation_covered_tokens(summary)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise RunError("no metrics.jsonl")
    by_step: dict[int, dict] = {}
    try:
        lines = metrics_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"metrics.jsonl unreadable ({type(e).__name__})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise RunError(f"metrics.jsonl line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise RunError(f"metrics.jsonl line {number} has no integer 'step'")
        by_step[record["step"]] = record  # a resumed run logs replayed steps again: the last one counts
    return Run(path, config, summary, [by_step[s] for s in sorted(by_step)])


def _check_validation_covered_tokens(summary: dict) -> None:
    """A validation that saw no tokens reports loss 0 (ppl 1): a perfect model that never was.

    Runs that log `val_tokens` are judged by it; older runs, which did not, by their
    val_loss, which a language model's cross-entropy never reaches exactly.
    """
    tokens = summary.get("val_tokens")
    if tokens is None and summary.get("val_loss") == 0.0:
        raise RunError(
            "val_loss is exactly 0.0 and summary.json has no val_tokens: its validation evaluated no tokens "
            "(a run from before val_tokens was logged); rerun it with more data or a lower trainer.micro_batch_size"
        )
    if tokens is not None and (not _finite(tokens) or tokens <= 0):
        raise RunError(
            f"val_tokens={tokens!r}: its validation evaluated no tokens, so its val_loss means nothing; "
            "rerun it with more data or a lower trainer.micro_batch_size"
        )


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def collect(paths: list[Path], warn) -> list[Run]:
    runs, seen = [], {}
    for path in paths:
        if not path.is_dir():
            warn(f"{path}: skipped: not a directory")
            continue
        dirs = find_run_dirs(path)
        if not dirs:
            warn(f"{path}: skipped: no run directory in it (none holds .hydra/ or summary.json)")
        for d in dirs:
            try:
                run = load_run(d)
            except RunError as e:
                warn(f"{d}: skipped: {e}")
                continue
            ident = (run.key, json.dumps(run.seed))
            if ident in seen:
                warn(f"{d}: skipped: same config and seed as {seen[ident]}")
                continue
            seen[ident] = d
            runs.append(run)
    return runs


# ---------------------------------------------------------------- aggregation


def group_runs(runs: list[Run]) -> list[Group]:
    """One group per configuration (config minus seed), in first-seen order, labelled by what differs."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        groups.setdefault(run.key, Group(label="")).runs.append(run)
    out = list(groups.values())
    flats = [dict(g.runs[0].key) for g in out]
    varying = sorted(k for k in set().union(*flats) if len({f.get(k) for f in flats}) > 1) if len(out) > 1 else []
    varying.sort(key=lambda k: (k != "moe.kind", k))
    for g, flat in zip(out, flats):
        if varying:
            g.label = ", ".join(f"{_short(k)}={_plain(flat.get(k))}" for k in varying)
        else:
            g.label = (
                f"{_plain(flat.get('model.name')) if 'model.name' in flat else '?'} moe={_plain(flat.get('moe.kind'))}"
            )
    return out


def _short(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith("moe.") and key != "moe.kind" else key.replace("moe.kind", "moe")


def _plain(value: Optional[str]) -> str:
    if value is None:
        return "-"
    v = json.loads(value)
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v).lower() if isinstance(v, bool) else str(v)


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n-1); std is None for fewer than two values."""
    values = [v for v in values if _finite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def run_tokens_dropped(run: Run) -> Optional[int]:
    if _finite(run.summary.get("tokens_dropped")):
        return int(run.summary["tokens_dropped"])
    values = [r["tokens_dropped"] for r in run.metrics if _finite(r.get("tokens_dropped"))]
    return int(sum(values)) if values else None


def run_mfu(run: Run) -> Optional[float]:
    if _finite(run.summary.get("mfu")):
        return float(run.summary["mfu"])
    values = [r["mfu"] for r in run.metrics if _finite(r.get("mfu"))]
    return statistics.fmean(values) if values else None


def run_load_imbalance(run: Run) -> Optional[float]:
    """Max over MoE layers of max/mean expert load, averaged over the logged steps."""
    per_step = []
    for r in run.metrics:
        imb = r.get("load_imbalance")
        if isinstance(imb, list) and imb and all(_finite(x) for x in imb):
            per_step.append(max(imb))
        elif isinstance(r.get("expert_load"), list) and r["expert_load"]:
            layers = [layer for layer in r["expert_load"] if isinstance(layer, list) and layer and sum(layer) > 0]
            if layers:
                per_step.append(max(max(layer) / statistics.fmean(layer) for layer in layers))
    return statistics.fmean(per_step) if per_step else None


def summarize(group: Group) -> dict:
    """The table row of a configuration: means (and std where it says so) over its seeds."""
    runs = group.runs

    def mean_of(values):
        return mean_std(values)[0]

    s = [r.summary for r in runs]
    row = {
        "label": group.label,
        "moe": runs[0].config.get("moe", {}).get("kind", s[0].get("moe")),
        "seeds": [r.seed for r in runs],
        "params_total": mean_of([x.get("params_total") for x in s]),
        "params_active": mean_of([x.get("params_active") for x in s]),
        "val_loss": mean_std([x.get("val_loss") for x in s]),
        "val_ppl": mean_std([x.get("val_ppl") for x in s]),
        "tokens_per_s": mean_of([x.get("tokens_per_s") for x in s]),
        "tokens_seen": mean_of([x.get("tokens_seen") for x in s]),
        "steps_range": _range([x.get("steps") for x in s]),
        "tokens_range": _range([x.get("tokens_seen") for x in s]),
        "mfu": mean_of([run_mfu(r) for r in runs]),
        "tokens_dropped": mean_of([run_tokens_dropped(r) for r in runs]),
        "load_imbalance": mean_of([run_load_imbalance(r) for r in runs]),
    }
    return row


# ---------------------------------------------------------------- writing


def _range(values: list) -> Optional[tuple[float, float]]:
    """(min, max) over the seeds: the table shows one number when the runs had equal budgets."""
    values = [v for v in values if _finite(v)]
    return (min(values), max(values)) if values else None


def _fmt_range(r: Optional[tuple[float, float]]) -> str:
    if r is None:
        return "-"
    return _fmt_int(r[0]) if r[0] == r[1] else f"{_fmt_int(r[0])}–{_fmt_int(r[1])}"


def _fmt_int(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _fmt_pm(ms: tuple, digits: int) -> str:
    mean, std = ms
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_dropped(row: dict) -> str:
    d, seen = row["tokens_dropped"], row["tokens_seen"]
    if d is None:
        return "-"
    return f"{d:,.0f} ({100 * d / seen:.2f}%)" if seen else f"{d:,.0f}"


COLUMNS = [
    "configuration",
    "moe",
    "seeds",
    "steps",
    "tokens",
    "params total",
    "params active",
    "val loss",
    "val ppl",
    "tokens/s",
    "MFU",
    "tokens dropped",
    "load max/mean",
]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
    for r in rows:
        cells = [
            r["label"],
            str(r["moe"]),
            f"{len(r['seeds'])} ({','.join(map(str, r['seeds']))})",
            _fmt_range(r["steps_range"]),
            _fmt_range(r["tokens_range"]),
            _fmt_int(r["params_total"]),
            _fmt_int(r["params_active"]),
            _fmt_pm(r["val_loss"], 4),
            _fmt_pm(r["val_ppl"], 2),
            _fmt_int(r["tokens_per_s"]),
            "-" if r["mfu"] is None else f"{r['mfu']:.3f}",
            _fmt_dropped(r),
            "-" if r["load_imbalance"] is None else f"{r['load_imbalance']:.2f}",
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _atomic_write(path, buf.getvalue())


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-." else "_" for c in text)
    return "_".join(filter(None, keep.split("_")))[:80] or "run"


def val_curves_figure(groups: list[Group]):
    """Validation loss (markers) and training loss (thin dashed) per seed, one colour per configuration;
    None when no run logged a validation loss."""
    # Deferred: matplotlib is slow to import and only the plots need it, not mpoe-report --help.
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    drew = False
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        for j, run in enumerate(g.runs):
            train = [(r["step"], r["loss"]) for r in run.metrics if _finite(r.get("loss"))]
            if train:
                ax.plot(
                    *zip(*train),
                    color=color,
                    ls="--",
                    lw=0.8,
                    alpha=0.6,
                    label=f"{g.label} (train)" if j == 0 else None,
                )
            pts = [(r["step"], r["val_loss"]) for r in run.metrics if _finite(r.get("val_loss"))]
            if pts:
                ax.plot(
                    *zip(*pts), color=color, marker="o", ms=3, lw=1.2, alpha=0.85, label=g.label if j == 0 else None
                )
                drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel="loss", title="Validation loss (solid) and training loss (dashed), one line per seed")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def _legend_outside(ax) -> None:
    """Right of the axes, where it cannot cover a curve, a marker or an error bar."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def plot_val_curves(groups: list[Group], path: Path) -> bool:
    return _write_figure(val_curves_figure(groups), path)


def _write_figure(fig, path: Path) -> bool:
    """Save and close `fig`; False when there was nothing to plot (fig is None)."""
    # Deferred: matplotlib is slow to import and only the plots need it, not mpoe-report --help.
    import matplotlib.pyplot as plt

    if fig is None:
        return False
    _save_figure(fig, path)
    plt.close(fig)
    return True


def _dodge(xs: list[float], spread: float = 0.04) -> list[float]:
    """Points at the same x (configurations of equal size, e.g. gradient mask on/off) moved apart a little,
    symmetrically and in proportion (the axis is logarithmic), so no marker hides another."""
    out = list(xs)
    for x in set(xs):
        same = [i for i, v in enumerate(xs) if v == x]
        for k, i in enumerate(same):
            out[i] = x * (1 + spread * (k - (len(same) - 1) / 2))
    return out


def params_vs_loss_figure(rows: list[dict]):
    # Deferred: matplotlib is slow to import and only the plots need it, not mpoe-report --help.
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["params_total"] and r["val_loss"][0] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    totals = _dodge([r["params_total"] for r in pts])
    actives = _dodge([r["params_active"] or 0 for r in pts])
    for i, r in enumerate(pts):
        color = f"C{i % 10}"
        mean, std = r["val_loss"]
        ax.errorbar(totals[i], mean, yerr=std or 0, fmt="o", color=color, capsize=3, label=f"{r['label']} (total)")
        if r["params_active"] and r["params_active"] != r["params_total"]:
            ax.errorbar(
                actives[i],
                mean,
                yerr=std or 0,
                fmt="s",
                mfc="none",
                color=color,
                capsize=3,
                label=f"{r['label']} (active)",
            )
    ax.set_xscale("log")
    ax.set(xlabel="parameters", ylabel="validation loss (mean ± std over seeds)", title="Parameters vs validation loss")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def plot_params_vs_loss(rows: list[dict], path: Path) -> bool:
    return _write_figure(params_vs_loss_figure(rows), path)


def expert_load_series(group: Group) -> tuple[Any, dict[int, list]]:
    """(seed, {step: load per layer}) of the group's first seed that logged expert loads.

    One seed, not a mean over seeds: expert i of one seed and expert i of another
    share an index, not a role (which expert learns what depends on the seed).
    """
    for run in group.runs:
        series = {}
        for r in run.metrics:
            load = r.get("expert_load")
            if isinstance(load, list) and load and all(isinstance(layer, list) for layer in load):
                series[r["step"]] = load
        if series:
            return run.seed, series
    return None, {}


def plot_expert_load(group: Group, path: Path) -> bool:
    """Heatmap per MoE layer: experts (rows) x logged steps (columns), the fraction of routed tokens, one seed."""
    # Deferred: matplotlib (numpy with it) is slow to import and only the plots need it, not mpoe-report --help.
    import matplotlib.pyplot as plt
    import numpy as np

    seed, series = expert_load_series(group)
    shapes = {(len(load), tuple(len(x) for x in load)) for load in series.values()}
    if not series or len(shapes) != 1:
        return False
    steps = sorted(series)
    num_layers = len(series[steps[0]])
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.2 + 1.6 * num_layers), squeeze=False)
    for layer in range(num_layers):
        grid = np.array([series[s][layer] for s in steps]).T  # [E, steps]
        ax = axes[layer][0]
        im = ax.imshow(
            grid,
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            interpolation="nearest",
            extent=(-0.5, len(steps) - 0.5, grid.shape[0] - 0.5, -0.5),
        )
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
        ax.set_ylabel(f"MoE layer {layer}\nexpert")
        fig.colorbar(im, ax=ax, label="load fraction")
    axes[-1][0].set_xlabel("step")
    others = f" (of {len(group.runs)} seeds: expert indices differ between seeds)" if len(group.runs) > 1 else ""
    fig.suptitle(f"Expert load: {group.label}, seed {seed}{others}")
    _save_figure(fig, path)
    plt.close(fig)
    return True


def write_report(runs: list[Run], out: Path, skipped: list[str]) -> Path:
    return write_report_and_plots(runs, out, skipped)[0]


def write_report_and_plots(runs: list[Run], out: Path, skipped: list[str]) -> tuple[Path, list[str]]:
    """report.md and its plots in `out`: (the report, the plots' file names)."""
    # Deferred: matplotlib is slow to import and only the plots need it, not mpoe-report --help.
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    rows = [summarize(g) for g in groups]
    parts = [
        "# mpoe run comparison",
        "",
        f"{len(runs)} run(s) in {len(groups)} configuration(s); mean ± sample std over seeds "
        "(a single seed shows its value alone). Read from each run's `.hydra/config.yaml`, "
        "`summary.json` and `metrics.jsonl`.",
        "",
        table(rows),
        "",
        "- steps, tokens: the training budget (optimizer steps, tokens seen), one number when all seeds had the same;",
        "  params total/active: parameter counts (active = used per token); val loss/ppl: final validation;",
        "  tokens/s: training throughput; MFU: model FLOPs utilisation (`-` when the run did not log it);",
        "  tokens dropped: over capacity, summed over training (share of tokens seen);",
        "  load max/mean: the most loaded expert over the mean, worst MoE layer, averaged over logged steps.",
        "",
    ]
    plots = []
    if plot_val_curves(groups, out / "val_loss.png"):
        plots.append(("Validation loss", "val_loss.png"))
    if plot_params_vs_loss(rows, out / "params_vs_val_loss.png"):
        plots.append(("Parameters vs validation loss", "params_vs_val_loss.png"))
    for i, g in enumerate(groups):
        name = f"expert_load_{i}_{_slug(g.label)}.png"
        if plot_expert_load(g, out / name):
            plots.append((f"Expert load: {g.label}", name))
    parts.append("## Plots\n")
    for title, name in plots:
        parts += [f"### {title}", "", f"![{title}]({name})", ""]
    parts += ["## Runs", "", "| configuration | seed | run directory |", "|---|---:|---|"]
    for g in groups:
        for run in g.runs:
            parts.append(f"| {g.label} | {run.seed} | `{run.path}` |")
    if skipped:
        parts += ["", "## Skipped", ""] + [f"- {line}" for line in skipped]
    report = out / "report.md"
    _atomic_write(report, ("\n".join(parts) + "\n").encode())
    return report, [name for _, name in plots]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="mpoe-report", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    ap.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or folders above them (a multirun dir)"
    )
    ap.add_argument(
        "--out", help="the folder for report.md and the plots (default: RUN_DIR/report for one RUN_DIR, else ./report)"
    )
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.run_dirs]
    skipped: list[str] = []

    def warn(line: str) -> None:
        skipped.append(line)
        print(f"mpoe-report: {line}", file=sys.stderr)

    runs = collect(paths, warn)
    if not runs:
        print(
            f"mpoe-report: error: no usable run in {', '.join(map(str, paths))} ({len(skipped)} skipped)",
            file=sys.stderr,
        )
        return 2
    out = default_out(paths) if args.out is None else Path(args.out)
    try:
        report, plots = write_report_and_plots(runs, out, skipped)
    except OSError as e:
        print(f"mpoe-report: error: cannot write the report to {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(
        f"mpoe-report: read {len(runs)} run(s) from {', '.join(map(str, paths))} ({len(skipped)} skipped); "
        f"wrote {report.name} and {len(plots)} plot(s) to {out}"
    )
    return 0


def default_out(paths: list[Path]) -> Path:
    """`report/` inside the one folder given, so that the report never lies loose among other files."""
    return paths[0] / "report" if len(paths) == 1 and paths[0].is_dir() else Path("report")


def cli() -> None:
    quiet_library_notices()  # no DeepSpeed or torch here: only the library notices (matplotlib's among them)
    sys.exit(main())


if __name__ == "__main__":
    cli()
