"""Training objectives: how a window of raw token ids becomes model inputs.

`build_objective(cfg, token_data)` returns an object with `raw_length` (how many
raw tokens one example consumes, so the packer cuts windows of that size) and
`batch(raw) -> dict` of keyword arguments for `LanguageModel.forward`, and
`target_tokens(batch, counted)`: how many target tokens the first `counted` rows
of a (CPU) batch score, which weights each validation batch's mean loss. The
model family names its pre-training objective (`Family.objective`); `OBJECTIVES`
maps the name to a constructor `(cfg, token_data) -> objective`.
GPT-2 trains as a causal LM on packed windows (labels = inputs, shifted inside
the HF model); T5 on span corruption (span_corruption.py). `data=task` trains
either family on a classification task instead (task_data.Classification).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpoe.config import TrainConfig
from mpoe.models import family


@dataclass
class CausalLM:
    raw_length: int

    @classmethod
    def for_config(cls, cfg: TrainConfig, token_data) -> CausalLM:
        return cls(cfg.trainer.seq_len)

    def batch(self, raw: torch.Tensor) -> dict:
        return {"input_ids": raw}

    def target_tokens(self, batch: dict, counted: int) -> int:
        return counted * (batch["input_ids"].shape[1] - 1)  # no target for the first token


def _span_corruption(cfg: TrainConfig, token_data):
    # Imported here: span_corruption.py imports transformers' T5 (the sentinel layout), which GPT-2 runs never use.
    from mpoe.train.data.span_corruption import SpanCorruption

    return SpanCorruption.for_config(cfg, token_data)


def _classification(cfg: TrainConfig, task_data):
    from mpoe.train.data.task_data import Classification  # imported here, as span corruption is

    return Classification.for_config(cfg, task_data)


OBJECTIVES = {"causal_lm": CausalLM.for_config, "span_corruption": _span_corruption, "classification": _classification}


def build_objective(cfg: TrainConfig, token_data):
    name = "classification" if cfg.data.name == "task" else family.get(cfg.model.family).objective
    return OBJECTIVES[name](cfg, token_data)
