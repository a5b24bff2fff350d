"""Training objectives: how a window of raw token ids becomes model inputs.

`build_objective(cfg, token_data)` returns an object with `raw_length` (how many
raw tokens one example consumes, so the packer cuts windows of that size) and
`batch(raw) -> dict` of keyword arguments for `LanguageModel.forward`. The
model family names its objective (`Family.objective`); `OBJECTIVES` maps the
name to a constructor `(cfg, token_data) -> objective`.
GPT-2 trains as a causal LM on packed windows (labels = inputs, shifted inside
the HF model); T5 on span corruption (span_corruption.py).
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


def _span_corruption(cfg: TrainConfig, token_data):
    # Imported here: span_corruption.py imports transformers' T5 (the sentinel layout), which GPT-2 runs never use.
    from mpoe.train.data.span_corruption import SpanCorruption

    return SpanCorruption.for_config(cfg, token_data)


OBJECTIVES = {"causal_lm": CausalLM.for_config, "span_corruption": _span_corruption}


def build_objective(cfg: TrainConfig, token_data):
    return OBJECTIVES[family.get(cfg.model.family).objective](cfg, token_data)
