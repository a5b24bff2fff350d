"""T5 (encoder-decoder, span corruption) from transformers, its FFNs swapped for MoE layers.

The HF model is built from our `ModelConfig` (or loaded from a local checkpoint
with `model.pretrained`), then in every `moe.every`-th block of the encoder AND
of the decoder, `T5LayerFF.DenseReluDense` is replaced by an `MoELayer` (it takes
and returns a hidden-state tensor, which is all `T5LayerFF` needs; the layer
norm, dropout and residual around it stay T5's). Layer indices count within each
stack, so with every=2 blocks 1, 3, 5, ... of the encoder and of the decoder.

Vocabulary and sentinels (choice, documented here and in span_corruption.py):
our BPE tokenizers have no `<extra_id_N>` tokens, so a T5 built from scratch
gets `NUM_SENTINELS` = 100 ids directly above the tokenizer's ids, as T5's
SentencePiece vocabulary (32000) gets its 100 extra ids (32000..32099, with
<extra_id_0> = 32099, descending); the embedding table is then padded to a
multiple of 128 rows, as T5's 32100 -> 32128. So `model.vocab_size` of a T5
config is the tokenizer's size *without* sentinels (32000 for T5's), and the
published embedding size 32128 comes out of `model_vocab_size`.
A pretrained checkpoint keeps its own vocabulary (its tokenizer has sentinels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch.nn as nn
from transformers import T5Config, T5ForConditionalGeneration

from mpoe.config import ModelConfig, MoEConfig
from mpoe.models.gpt2 import ATTENTION

NUM_SENTINELS = 100
VOCAB_MULTIPLE = 128


def model_vocab_size(tokenizer_vocab: int) -> int:
    """Embedding rows for a tokenizer without sentinels: + 100 sentinels, padded to a multiple of 128."""
    n = tokenizer_vocab + NUM_SENTINELS
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def sentinel_ids(tokenizer_vocab: int, count: int = NUM_SENTINELS) -> list[int]:
    """<extra_id_0>, <extra_id_1>, ...: the ids just above the tokenizer's, the highest first (T5's order)."""
    top = tokenizer_vocab + NUM_SENTINELS - 1
    return [top - i for i in range(count)]


def feed_forward_activation(config: T5Config) -> str:
    """Our expert activation name for a T5 config: 'relu' (v1.0) or 'gated-gelu_new' (v1.1, 'gated-gelu')."""
    return ("gated-" if config.is_gated_act else "") + config.dense_act_fn


def hf_config(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: Optional[int] = None) -> T5Config:
    """`vocab_size` is the final embedding size (sentinels included)."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv or cfg.d_model // cfg.num_heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
        num_heads=cfg.num_heads,
        dropout_rate=cfg.dropout,
        feed_forward_proj=cfg.activation,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=pad_id,
        decoder_start_token_id=pad_id,
        eos_token_id=pad_id if eos_id is None else eos_id,
        attn_implementation=ATTENTION,
    )


def build_t5(
    cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: Optional[int] = None
) -> T5ForConditionalGeneration:
    """From scratch: `vocab_size` is the tokenizer's, sentinels are added. Pretrained: the checkpoint's shape."""
    if cfg.pretrained:
        from mpoe.models.build import check_pretrained

        check_pretrained(cfg.pretrained, "t5")
        # dropout is a training choice, the shape is the checkpoint's
        return T5ForConditionalGeneration.from_pretrained(
            cfg.pretrained, local_files_only=True, dropout_rate=cfg.dropout, attn_implementation=ATTENTION
        )
    return T5ForConditionalGeneration(hf_config(cfg, model_vocab_size(vocab_size), pad_id, eos_id))


def stacks(model: T5ForConditionalGeneration) -> list[nn.Module]:
    return [s for s in (model.encoder, model.decoder) if s is not None]


def replace_ffns(
    backbone: T5ForConditionalGeneration, moe_cfg: MoEConfig, groups, is_moe: Callable[[int], bool], upcycle: bool
) -> list[tuple[str, int]]:
    """Swap DenseReluDense for an MoE layer in blocks i of each stack where is_moe(i).

    Upcycled: every expert starts as that block's FFN (Switch: copies; MPOE: one
    decomposition, shared central tensor). From scratch: T5's FFNs have no
    biases, so neither do the experts. Returns (stack, block index) pairs replaced.
    """
    from mpoe.models.experts import DenseFFN
    from mpoe.models.moe_layer import build_moe_layer

    config = backbone.config
    activation = feed_forward_activation(config)
    replaced = []
    for name, stack in (("encoder", backbone.encoder), ("decoder", backbone.decoder)):
        for i, block in enumerate(stack.block):
            if not is_moe(i):
                continue
            ff_layer = block.layer[-1]
            dense = DenseFFN.from_t5_ff(ff_layer.DenseReluDense) if upcycle else None
            ff_layer.DenseReluDense = build_moe_layer(
                moe_cfg, config.d_model, config.d_ff, activation, groups, dense=dense, bias=False
            )
            replaced.append((name, i))
    return replaced


def embedding_params(model: T5ForConditionalGeneration) -> int:
    """The token table (shared by encoder and decoder); T5 has no position table (relative attention bias
    is counted with the layers, as in the published counts). An untied LM head is counted apart (lm_head_params)."""
    return model.shared.weight.numel()


def lm_head_params(model: T5ForConditionalGeneration) -> int:
    head = model.lm_head.weight
    return 0 if head is model.shared.weight else head.numel()
