"""Training objectives: how a window of raw token ids becomes model inputs.

`build_objective(cfg, token_data)` returns an object with `raw_length` (how many
raw tokens one example consumes, so the packer cuts windows of that size) and
`batch(raw) -> dict` of keyword arguments for `LanguageModel.forward`.
GPT-2 trains as a causal LM on packed windows (labels = inputs, shifted inside
the HF model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpoe.config import TrainConfig


@dataclass
class CausalLM:
    raw_length: int

    def batch(self, raw: torch.Tensor) -> dict:
        return {"input_ids": raw}


def build_objective(cfg: TrainConfig, token_data) -> CausalLM:
    if cfg.model.family == "gpt2":
        return CausalLM(cfg.trainer.seq_len)
    from mpoe.train.span_corruption import SpanCorruption

    return SpanCorruption.for_config(cfg, token_data)
