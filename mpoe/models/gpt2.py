"""GPT-2 (decoder-only, causal LM) from transformers, its FFNs swapped for MoE layers.

The HF model is built from our `ModelConfig` (or loaded from a local checkpoint
with `model.pretrained`), then every `moe.every`-th block's `mlp` is replaced by
an `MoELayer`. HF's `GPT2Block` calls `self.mlp(hidden)` and wants a tensor back,
which is what `MoELayer.forward` returns; its losses are collected afterwards by
`mpoe.models.build.LanguageModel`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel

from mpoe.config import ModelConfig

# PyTorch's scaled_dot_product_attention: flash / memory-efficient kernels on GPUs.
ATTENTION = "sdpa"


def hf_config(cfg: ModelConfig, vocab_size: int, eot_id: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
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
        attn_implementation=ATTENTION,
    )


def build_gpt2(cfg: ModelConfig, vocab_size: int, eot_id: int) -> GPT2LMHeadModel:
    """From scratch with our shape, or a local checkpoint's shape and weights (never fetched from a hub).

    Dropout is a training choice, so `model.dropout` overrides the checkpoint's.
    """
    if cfg.pretrained:
        from mpoe.models.build import check_pretrained

        check_pretrained(cfg.pretrained, "gpt2")
        p = cfg.dropout
        return GPT2LMHeadModel.from_pretrained(
            cfg.pretrained,
            local_files_only=True,
            resid_pdrop=p,
            embd_pdrop=p,
            attn_pdrop=p,
            attn_implementation=ATTENTION,
        )
    return GPT2LMHeadModel(hf_config(cfg, vocab_size, eot_id))


def replace_ffns(
    model: GPT2LMHeadModel, is_moe: Callable[[int], bool], make_moe: Callable[[nn.Module], nn.Module]
) -> list[int]:
    """Swap block i's mlp for make_moe(old_mlp) where is_moe(i); returns the replaced layer indices."""
    replaced = []
    for i, block in enumerate(model.transformer.h):
        if is_moe(i):
            block.mlp = make_moe(block.mlp)
            replaced.append(i)
    return replaced


def embedding_params(model: GPT2LMHeadModel) -> int:
    """Token + position tables; an untied LM head is counted apart (lm_head_params)."""
    return model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()


def lm_head_params(model: GPT2LMHeadModel) -> int:
    head = model.lm_head.weight
    return 0 if head is model.transformer.wte.weight else head.numel()
