"""GPT-2 (decoder-only, causal LM) from transformers, its FFNs swapped for MoE layers.

The HF model is built from our `ModelConfig` (or loaded from a local checkpoint
with `model.pretrained`), then every `moe.every`-th block's `mlp` is replaced by
an `MoELayer`. HF's `GPT2Block` calls `self.mlp(hidden)` and wants a tensor back,
which is what `MoELayer.forward` returns; its losses are collected afterwards by
`mpoe.models.build.LanguageModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from mpoe.config import ModelConfig
from mpoe.models.experts import DenseFFN
from mpoe.models.family import Family, FFNShape
from mpoe.models.lm_loss import IGNORE_INDEX


class GPT2Family(Family):
    name = "gpt2"
    model_class = GPT2LMHeadModel
    config_class = GPT2Config
    objective = "causal_lm"

    def hf_config(self, cfg: ModelConfig, embedding_rows: int, eot_id: int, pad_id: int) -> GPT2Config:
        return GPT2Config(
            vocab_size=embedding_rows,
            n_positions=cfg.max_position_embeddings,
            n_embd=cfg.d_model,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.d_ff,
            activation_function=cfg.activation,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=eot_id,
            eos_token_id=eot_id,
            tie_word_embeddings=cfg.tie_word_embeddings,
            attn_implementation="sdpa",
        )

    def pretrained_overrides(self, cfg: ModelConfig) -> dict:
        p = cfg.dropout  # dropout is a training choice, the shape is the checkpoint's
        return {"resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p}

    def ffn_shape(self, config: GPT2Config) -> FFNShape:
        return FFNShape(config.n_embd, config.n_inner or 4 * config.n_embd, config.activation_function, bias=True)

    def replace_ffns(
        self, backbone: GPT2LMHeadModel, is_moe: Callable[[int], bool], make_moe: Callable[[nn.Module], nn.Module]
    ) -> list[int]:
        """Swap block i's mlp for make_moe(old_mlp) where is_moe(i); returns the replaced layer indices."""
        replaced = []
        for i, block in enumerate(backbone.transformer.h):
            if is_moe(i):
                block.mlp = make_moe(block.mlp)
                replaced.append(i)
        return replaced

    def dense_ffn(self, ffn: nn.Module) -> DenseFFN:
        return DenseFFN.from_gpt2_mlp(ffn)

    def embedding_params(self, backbone: GPT2LMHeadModel) -> int:
        """Token + position tables."""
        return backbone.transformer.wte.weight.numel() + backbone.transformer.wpe.weight.numel()

    def attention_layers(self, config: GPT2Config) -> int:
        return config.n_layer

    def token_embedding_key(self) -> str:
        return "transformer.wte.weight"

    def model_inputs(
        self, input_ids: torch.Tensor, labels: Optional[torch.Tensor], decoder_input_ids: Optional[torch.Tensor]
    ) -> dict:
        """Causal LM: the inputs are their own labels (HF shifts them inside the model)."""
        return {"input_ids": input_ids, "labels": input_ids if labels is None else labels}

    def lm_hidden_states(self, backbone: GPT2LMHeadModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """GPT2LMHeadModel.forward up to its head; position t's target is label t+1 (the last has none)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        hidden = backbone.transformer(**inputs).last_hidden_state
        return hidden, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)

    # HF's KV cache stays on in eager training: without a cache (and without an attention mask) GPT2Model checks
    # its position ids for packed sequences with a host read in every forward (transformers'
    # `find_packed_sequence_indices`), a GPU sync that the cache's presence skips.
    training_kv_cache = None

    def blocks(self, backbone: GPT2LMHeadModel) -> list[nn.Module]:
        return list(backbone.transformer.h)


FAMILY = GPT2Family()
