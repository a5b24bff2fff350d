"""Config -> model: the HF backbone with MoE FFNs, wrapped so one call gives every loss.

`LanguageModel.forward(input_ids)` returns `LMOutput`: the total loss that is
back-propagated (LM loss + each MoE layer's aux and z losses, coefficients
already applied by the router) and its parts for logging. MoE layers sit at
layers every-1, 2*every-1, ... (with every=2, the odd layers, as in Switch).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from mpoe.config import ConfigError, TrainConfig
from mpoe.models import gpt2
from mpoe.parallel.groups import ExpertGroups


@dataclass
class LMOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    logits: Optional[torch.Tensor] = None
    # Routing statistics of this rank, on the device (read once per logged step, not per forward).
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, [E]
    tokens_dropped: Optional[torch.Tensor] = None  # scalar, summed over MoE layers
    router_entropy: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, scalar


def is_moe_layer(index: int, every: int) -> bool:
    return (index + 1) % every == 0


def moe_layers(model: nn.Module) -> list[nn.Module]:
    from mpoe.models.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


class LanguageModel(nn.Module):
    def __init__(self, backbone: nn.Module, family: str, pad_id: int):
        super().__init__()
        self.backbone, self.family, self.pad_id = backbone, family, pad_id
        self._moe = moe_layers(backbone)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.Tensor] = None,
        return_logits: bool = False,
    ) -> LMOutput:
        if self.family == "gpt2":
            out = self.backbone(input_ids=input_ids, labels=input_ids if labels is None else labels)
        else:
            out = self.backbone(input_ids=input_ids, labels=labels, decoder_input_ids=decoder_input_ids)
        zero = out.loss.new_zeros(())
        stats = [m.stats for m in self._moe if m.stats is not None]
        aux = sum((s.aux_loss for s in stats), zero)
        z = sum((s.z_loss for s in stats), zero)
        return LMOutput(
            loss=out.loss + aux + z,
            lm_loss=out.loss.detach(),
            aux_loss=aux.detach(),
            z_loss=z.detach(),
            logits=out.logits if return_logits else None,
            tokens_per_expert=[s.tokens_per_expert for s in stats],
            tokens_dropped=sum((s.tokens_dropped for s in stats), zero.long()),
            router_entropy=[s.router_entropy for s in stats],
        )


def check_pretrained(path: str, family: str) -> dict:
    """The checkpoint's config.json, or a one-line ConfigError naming model.pretrained."""
    cfg_file = Path(path).expanduser() / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(
            f"model.pretrained={path!r} is invalid: give a local Hugging Face checkpoint directory "
            f"(config.json + model.safetensors); nothing is fetched from a hub"
        )
    config = json.loads(cfg_file.read_text())
    if config.get("model_type") != family:
        raise ConfigError(
            f"model.pretrained={path!r} holds a {config.get('model_type')!r} model but "
            f"model.family={family!r}: pick the matching model= option"
        )
    return config


def build_backbone(cfg: TrainConfig, vocab_size: int, eot_id: int, pad_id: int) -> nn.Module:
    """The dense HF model: from our ModelConfig (vocab_size = the tokenizer's), or model.pretrained's."""
    if cfg.model.family == "gpt2":
        backbone = gpt2.build_gpt2(cfg.model, vocab_size, eot_id)
    else:
        from mpoe.models import t5

        backbone = t5.build_t5(cfg.model, vocab_size, pad_id, eot_id)
    rows = backbone.get_input_embeddings().weight.shape[0]
    if cfg.model.pretrained and vocab_size > rows:
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r} has {rows} token embeddings, fewer than the "
            f"tokenizer's {vocab_size} ids: use the checkpoint's tokenizer (data.tokenizer=<checkpoint dir>)"
        )
    return backbone


def build_model(cfg: TrainConfig, vocab_size: int, eot_id: int, pad_id: int, groups: ExpertGroups) -> LanguageModel:
    """The configured backbone; with moe != dense its FFNs every `moe.every` layers become MoE layers.

    With model.pretrained the FFNs are upcycled: every expert starts as the dense FFN it replaces.
    """
    torch.manual_seed(cfg.trainer.seed)  # identical non-expert init on every rank
    # A dry run only counts parameters: build on the meta device (no memory, and no SVDs: see mpo.decompose)
    shapes_only = cfg.trainer.dry_run and not cfg.model.pretrained
    with torch.device("meta") if shapes_only else contextlib.nullcontext():
        backbone = build_backbone(cfg, vocab_size, eot_id, pad_id)
        if cfg.moe.kind != "dense":
            install_moe(backbone, cfg, groups, upcycle=bool(cfg.model.pretrained))
    if cfg.model.family == "t5":
        pad_id = backbone.config.pad_token_id
    return LanguageModel(backbone, cfg.model.family, pad_id)


def ffn_shape(backbone: nn.Module, family: str) -> tuple[int, int, str]:
    """(d_model, d_ff, activation) of the backbone's dense FFNs, in the expert banks' naming."""
    c = backbone.config
    if family == "gpt2":
        return c.n_embd, c.n_inner or 4 * c.n_embd, c.activation_function
    from mpoe.models.t5 import feed_forward_activation

    return c.d_model, c.d_ff, feed_forward_activation(c)


def install_moe(backbone: nn.Module, cfg: TrainConfig, groups: ExpertGroups, upcycle: bool) -> None:
    """Replace the FFNs of layers every-1, 2*every-1, ... by MoE layers (upcycled from them if asked)."""
    from mpoe.models.experts import DenseFFN
    from mpoe.models.moe_layer import build_moe_layer

    is_moe = lambda i: is_moe_layer(i, cfg.moe.every)
    if cfg.model.family == "gpt2":
        d_model, d_ff, activation = ffn_shape(backbone, "gpt2")

        def make(mlp: nn.Module) -> nn.Module:
            dense = DenseFFN.from_gpt2_mlp(mlp) if upcycle else None
            return build_moe_layer(cfg.moe, d_model, d_ff, activation, groups, dense=dense)

        gpt2.replace_ffns(backbone, is_moe, make)
    else:
        from mpoe.models import t5

        t5.replace_ffns(backbone, cfg.moe, groups, is_moe, upcycle)
