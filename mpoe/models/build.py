"""Config -> model: the HF backbone with MoE FFNs, wrapped so one call gives every loss.

`LanguageModel.forward(input_ids)` returns `LMOutput`: the total loss that is
back-propagated (LM loss + each MoE layer's aux and z losses, coefficients
already applied by the router) and its parts for logging. MoE layers sit at
layers every-1, 2*every-1, ... (with every=2, the odd layers, as in Switch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from mpoe.config import ConfigError, TrainConfig
from mpoe.models import family as families
from mpoe.models.lm_loss import linear_cross_entropy
from mpoe.models.moe_builder import build_moe_layer
from mpoe.models.moe_layer import MoELayer
from mpoe.parallel.expert_placement import ExpertPlacement


@dataclass
class LMOutput(ModelOutput):
    """A dict as well as a dataclass (HF's `ModelOutput`): DeepSpeed's engine finds the loss in a tuple, list or
    dict only, and hooks its backward there. Without that hook `engine.backward` skips the optimizer's backward
    prologue, where BF16_Optimizer (bf16 ZeRO 1) clears the bf16 gradients it has copied into its float32 sum;
    each micro-batch would then add in all earlier ones again."""

    loss: torch.Tensor
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    # Routing statistics of this rank, on the device (read once per logged step, not per forward).
    tokens_per_expert: Optional[list[torch.Tensor]] = None  # per MoE layer, [E]
    tokens_dropped: Optional[torch.Tensor] = None  # scalar, summed over MoE layers
    router_entropy: Optional[list[torch.Tensor]] = None  # per MoE layer, scalar


def is_moe_layer(index: int, every: int) -> bool:
    return (index + 1) % every == 0


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


class LanguageModel(nn.Module):
    """The HF backbone and the sum of its losses; `family` is the model.family name.

    `lm_loss` (trainer.lm_loss) says who computes the LM loss: "chunked" runs the backbone up to its head and
    takes head and cross-entropy together over chunks of tokens (`mpoe.models.lm_loss`, no [tokens, vocab]
    logits held); "hf" lets the HF model compute its logits and its own loss.
    """

    def __init__(self, backbone: nn.Module, family: str, pad_id: int, lm_loss: str = "chunked"):
        super().__init__()
        self.backbone, self.family, self.pad_id, self.lm_loss = backbone, family, pad_id, lm_loss
        self._moe = moe_layers(backbone)
        # What the chunked loss does with each chunk's logits: None is lm_loss.chunk_math_in_place (eager);
        # trainer.compile sets lm_loss.chunk_math_fusable compiled (regional_compile.compile_blocks).
        self.lm_chunk_math: Optional[Callable] = None
        self.kv_cache: Optional[bool] = families.get(family).training_kv_cache  # None: the HF config's use_cache

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.Tensor] = None,
        return_logits: bool = False,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> LMOutput:
        family = families.get(self.family)
        inputs = family.model_inputs(input_ids, labels, decoder_input_ids)
        if attention_mask is not None:  # padded inputs (data=task): 1 = a real token
            inputs["attention_mask"] = attention_mask
        if self.kv_cache is not None:
            inputs["use_cache"] = self.kv_cache
        if self.lm_loss == "hf":
            out = self.backbone(**inputs)
            lm_loss, logits = out.loss, out.logits
        else:
            hidden, targets = family.lm_hidden_states(self.backbone, inputs)
            head = self.backbone.get_output_embeddings()
            lm_loss = linear_cross_entropy(
                hidden.flatten(0, -2), head.weight, targets.flatten(), chunk_math=self.lm_chunk_math
            )
            logits = head(hidden) if return_logits else None
        zero = lm_loss.new_zeros(())
        stats = [m.stats for m in self._moe if m.stats is not None]
        aux = sum((s.aux_loss for s in stats), zero)
        z = sum((s.z_loss for s in stats), zero)
        return LMOutput(
            loss=lm_loss + aux + z,
            lm_loss=lm_loss.detach(),
            aux_loss=aux.detach(),
            z_loss=z.detach(),
            logits=logits if return_logits else None,
            tokens_per_expert=[s.tokens_per_expert for s in stats],
            tokens_dropped=sum((s.tokens_dropped for s in stats), zero.long()),
            router_entropy=[s.router_entropy for s in stats],
        )


def build_backbone(cfg: TrainConfig, vocab_size: int, eot_id: int, pad_id: int) -> nn.Module:
    """The dense HF model: from our ModelConfig (vocab_size = the tokenizer's), or model.pretrained's."""
    backbone = families.get(cfg.model.family).build(cfg.model, vocab_size, eot_id, pad_id)
    rows = backbone.get_input_embeddings().weight.shape[0]
    if cfg.model.pretrained and vocab_size > rows:
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r} has {rows} token embeddings, fewer than the "
            f"tokenizer's {vocab_size} ids: use the checkpoint's tokenizer (data.tokenizer=<checkpoint dir>)"
        )
    return backbone


def build_model(
    cfg: TrainConfig, vocab_size: int, eot_id: int, pad_id: int, placement: ExpertPlacement
) -> LanguageModel:
    """The configured backbone; with moe != dense its FFNs every `moe.every` layers become MoE layers.

    With model.pretrained the FFNs are upcycled: every expert starts as the dense FFN it replaces.
    """
    torch.manual_seed(cfg.trainer.seed)  # identical non-expert init on every rank
    # A dry run only counts parameters: build on the meta device (no memory, and no SVDs: see mpo.decompose)
    shapes_only = cfg.trainer.dry_run and not cfg.model.pretrained
    with torch.device("meta") if shapes_only else contextlib.nullcontext():
        backbone = build_backbone(cfg, vocab_size, eot_id, pad_id)
        if cfg.moe.kind != "dense":
            install_moe(backbone, cfg, placement, upcycle=bool(cfg.model.pretrained))
    pad_id = families.get(cfg.model.family).pad_id(backbone, pad_id)
    model = LanguageModel(backbone, cfg.model.family, pad_id, cfg.trainer.lm_loss)
    if cfg.trainer.activation_checkpointing:
        # Non-reentrant: the MoE layers' losses leave a block beside its output (LanguageModel reads them from
        # the layers), and only non-reentrant checkpointing sends their gradients back into the block.
        non_reentrant = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):  # HF's current name; some releases have only the old
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        model.kv_cache = False  # HF turns the KV cache off under checkpointing anyway, warning about it every run
    return model


def install_moe(backbone: nn.Module, cfg: TrainConfig, placement: ExpertPlacement, upcycle: bool) -> None:
    """Replace the FFNs of layers every-1, 2*every-1, ... by MoE layers (upcycled from them if asked)."""
    family = families.get(cfg.model.family)
    shape = family.ffn_shape(backbone.config)

    def make(ffn: nn.Module) -> nn.Module:
        dense = family.dense_ffn(ffn) if upcycle else None
        return build_moe_layer(
            cfg.moe, shape.d_model, shape.d_ff, shape.activation, placement, dense=dense, bias=shape.bias
        )

    family.replace_ffns(backbone, lambda i: is_moe_layer(i, cfg.moe.every), make)
