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

import torch
import torch.nn as nn
from transformers import T5Config, T5ForConditionalGeneration

from mpoe.config import ModelConfig
from mpoe.models.experts import DenseFFN
from mpoe.models.family import Family, FFNShape

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


class T5Family(Family):
    name = "t5"
    model_class = T5ForConditionalGeneration
    config_class = T5Config
    objective = "span_corruption"

    def hf_config(self, cfg: ModelConfig, embedding_rows: int, eot_id: int, pad_id: int) -> T5Config:
        """`embedding_rows` is the final embedding size (sentinels included); eot_id is T5's eos."""
        return T5Config(
            vocab_size=embedding_rows,
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
            eos_token_id=eot_id,
            attn_implementation="sdpa",
        )

    def embedding_rows(self, tokenizer_vocab: int) -> int:
        """From scratch the tokenizer has no sentinels: they are added (see the module docstring)."""
        return model_vocab_size(tokenizer_vocab)

    def pretrained_overrides(self, cfg: ModelConfig) -> dict:
        return {"dropout_rate": cfg.dropout}  # dropout is a training choice, the shape is the checkpoint's

    def ffn_shape(self, config: T5Config) -> FFNShape:
        """T5's FFNs have no biases, so neither do experts built for them."""
        return FFNShape(config.d_model, config.d_ff, feed_forward_activation(config), bias=False)

    def replace_ffns(
        self,
        backbone: T5ForConditionalGeneration,
        is_moe: Callable[[int], bool],
        make_moe: Callable[[nn.Module], nn.Module],
    ) -> list[tuple[str, int]]:
        """Swap DenseReluDense for make_moe(it) in blocks i of each stack where is_moe(i).

        Returns the (stack, block index) pairs replaced."""
        replaced = []
        for name, stack in (("encoder", backbone.encoder), ("decoder", backbone.decoder)):
            for i, block in enumerate(stack.block):
                if is_moe(i):
                    ff_layer = block.layer[-1]
                    ff_layer.DenseReluDense = make_moe(ff_layer.DenseReluDense)
                    replaced.append((name, i))
        return replaced

    def dense_ffn(self, ffn: nn.Module) -> DenseFFN:
        return DenseFFN.from_t5_ff(ffn)

    def embedding_params(self, backbone: T5ForConditionalGeneration) -> int:
        """The token table (shared by encoder and decoder); T5 has no position table (relative attention
        bias is counted with the layers, as in the published counts)."""
        return backbone.shared.weight.numel()

    def attention_layers(self, config: T5Config) -> int:
        return config.num_layers + config.num_decoder_layers

    def token_embedding_key(self) -> str:
        return "shared.weight"

    def model_inputs(
        self, input_ids: torch.Tensor, labels: Optional[torch.Tensor], decoder_input_ids: Optional[torch.Tensor]
    ) -> dict:
        """Span corruption: labels are the targets; HF shifts them into decoder inputs unless given."""
        return {"input_ids": input_ids, "labels": labels, "decoder_input_ids": decoder_input_ids}

    def lm_hidden_states(self, backbone: T5ForConditionalGeneration, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """T5ForConditionalGeneration.forward up to its head: encode, decode the labels shifted right (unless
        decoder inputs are given), and scale as HF does when the head shares the token table."""
        inputs = dict(inputs)
        labels, decoder_input_ids = inputs.pop("labels"), inputs.pop("decoder_input_ids")
        use_cache = {"use_cache": inputs.pop("use_cache")} if "use_cache" in inputs else {}
        encoded = backbone.encoder(**inputs).last_hidden_state
        if decoder_input_ids is None:
            decoder_input_ids = backbone._shift_right(labels)
        hidden = backbone.decoder(
            input_ids=decoder_input_ids,
            encoder_hidden_states=encoded,
            encoder_attention_mask=inputs.get("attention_mask"),
            **use_cache,
        ).last_hidden_state
        # HF's rule: the config's `scale_decoder_outputs` where it has one, else a tied head implies the scaling
        if getattr(backbone.config, "scale_decoder_outputs", backbone.config.tie_word_embeddings):
            hidden = hidden * backbone.model_dim**-0.5
        return hidden, labels

    def pad_id(self, backbone: nn.Module, tokenizer_pad_id: int) -> int:
        """T5 pads (and starts decoding) with its config's pad id."""
        return backbone.config.pad_token_id

    # Training decodes whole target sequences: HF's default cache would copy every decoder layer's self- and
    # cross-attention keys and values into a cache object in each forward, for nothing.
    training_kv_cache = False

    def blocks(self, backbone: T5ForConditionalGeneration) -> list[nn.Module]:
        return list(backbone.encoder.block) + list(backbone.decoder.block)


FAMILY = T5Family()
