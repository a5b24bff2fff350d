"""Where numbers go: `metrics.jsonl` (one JSON object per logged step), `summary.json`, and W&B.

Only rank 0 writes. `metrics.jsonl` is the source of truth (the report reads it,
nothing needs a W&B account); W&B gets the same names, offline by default, with
the Hydra config as the run config. `summary.json`'s `wall_s` is the run's whole
time in seconds, over all its parts: a resumed run adds its own time to what the
checkpoint it resumed from recorded (steps redone after a crash count once);
its `tokens_per_s` is the last part's throughput.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mpoe.parallel.collectives import all_reduce


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1, sort_keys=True))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg=None, run_config: Optional[dict] = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self._wandb = self._start_wandb(wandb_cfg, run_config or {})

    def _start_wandb(self, cfg, run_config: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        # Deferred: wandb is slow to import, reads WANDB_SILENT when imported, and a run without W&B never needs it.
        import wandb

        return wandb.init(
            mode=cfg.mode,
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            name=cfg.name or self.run_dir.name,
            dir=str(self.run_dir),
            config=run_config,
            resume="allow",
            id=self._run_id(),
        )

    def _run_id(self) -> str:
        """The same W&B run across resumes of the same run directory."""
        path = self.run_dir / ".wandb_id"
        if not path.exists():
            # Deferred: wandb is slow to import, and a run without W&B never needs it.
            import wandb

            path.write_text(wandb.sdk.lib.runid.generate_id())
        return path.read_text().strip()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = _jsonable(record)
        self._file.write(json.dumps(record) + "\n")
        if "val_loss" in record:  # one line per evaluation in main.log (and above the progress bar)
            logging.getLogger("mpoe.train").info(eval_line(record))
        if self._wandb is not None:
            self._wandb.log(_flatten_for_wandb(record), step=record["step"])

    def summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self._wandb is not None:
            self._wandb.summary.update(_jsonable(summary))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def eval_line(record: dict) -> str:
    def num(key: str, spec: str) -> str:
        value = record.get(key)
        return "-" if not isinstance(value, (int, float)) else format(value, spec)

    return (
        f"step {record['step']}: train loss {num('loss', '.4f')}, val loss {num('val_loss', '.4f')}, "
        f"val ppl {num('val_ppl', '.2f')}, {num('tokens_per_s', ',.0f')} tokens/s, "
        f"{num('tokens_seen', ',')} tokens seen"
    )


def _flatten_for_wandb(record: dict) -> dict:
    """Lists (per-layer expert loads) become one scalar per entry, so W&B can chart them."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, list):
                    for j, x in enumerate(v):
                        out[f"{key}/layer{i}/expert{j}"] = x
                else:
                    out[f"{key}/{i}"] = v
        else:
            out[key] = value
    return out


class Interval:
    """The training statistics of the steps between two log lines, summed on the device.

    Adding a micro-step's output reads nothing to the host; `record` sums every
    statistic over the world in one collective and reads the result once, so a
    logged step costs one host synchronisation however many layers and micro-steps
    it has.
    """

    def __init__(self, device: torch.device):
        self.start = time.perf_counter()
        self.device = device
        self.micro = 0
        self.tokens = 0
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, lm_loss, aux_loss, z_loss, dropped
        self.load: Optional[torch.Tensor] = None  # [MoE layers, experts]
        self.entropy: Optional[torch.Tensor] = None  # [MoE layers]

    def add(self, out, tokens: int) -> None:
        dropped = out.tokens_dropped if out.tokens_dropped is not None else out.loss.new_zeros(())
        parts = (out.loss.detach(), out.lm_loss, out.aux_loss, out.z_loss, dropped)
        self.sums += torch.stack([t.to(self.sums) for t in parts])
        self.micro += 1
        self.tokens += tokens
        if out.tokens_per_expert:
            load = torch.stack(out.tokens_per_expert).to(self.sums)
            entropy = torch.stack(out.router_entropy).to(self.sums)
            self.load = load if self.load is None else self.load + load
            self.entropy = entropy if self.entropy is None else self.entropy + entropy

    def record(self, step: int, lr: float, grad_norm: Optional[float]) -> dict:
        parts = [self.sums, self.sums.new_tensor([self.micro, self.tokens])]
        if self.load is not None:
            parts += [self.load.flatten(), self.entropy]
        values = all_reduce(torch.cat(parts)).tolist()  # the one host read of the interval
        loss, lm_loss, aux, z, dropped, micro, tokens = values[:7]
        elapsed = time.perf_counter() - self.start
        rec = {
            "step": step,
            "loss": loss / micro,
            "lm_loss": lm_loss / micro,
            "aux_loss": aux / micro,
            "z_loss": z / micro,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "tokens_dropped": int(dropped),
        }
        if self.load is not None:
            layers, experts = self.load.shape
            load = [values[7 + i * experts : 7 + (i + 1) * experts] for i in range(layers)]
            entropy = values[7 + layers * experts :]
            rec["expert_load"] = [[c / max(sum(row), 1.0) for c in row] for row in load]
            rec["load_imbalance"] = [max(row) / max(sum(row) / experts, 1e-9) for row in load]
            rec["router_entropy"] = [e / micro for e in entropy]
        return rec
