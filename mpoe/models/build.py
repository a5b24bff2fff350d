"""Config -> model: the HF backbone with MoE FFNs, wrapped so one call gives every loss.

`LanguageModel.forward(input_ids)` returns `LMOutput`: the total loss that is
back-propagated (LM loss + each MoE layer's aux and z losses, coefficients
already applied by the router) and its parts for logging. MoE layers sit at
layers every-1, 2*every-1, ... (with every=2, the odd layers, as in Switch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from mpoe.config import TrainConfig
from mpoe.models import gpt2
from mpoe.parallel.groups import ExpertGroups


@dataclass
class LMOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    logits: Optional[torch.Tensor] = None
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, [E]
    tokens_dropped: int = 0


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

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None, return_logits: bool = False) -> LMOutput:
        if self.family == "gpt2":
            out = self.backbone(input_ids=input_ids, labels=input_ids if labels is None else labels)
        else:
            out = self.backbone(input_ids=input_ids, labels=labels, decoder_input_ids=decoder_input_ids)
        zero = out.loss.new_zeros(())
        stats = [m.stats for m in self._moe if m.stats is not None]
        aux = sum((s.aux_loss for s in stats), zero)
        z = sum((s.z_loss for s in stats), zero)
        return LMOutput(
            loss=out.loss + aux + z, lm_loss=out.loss.detach(), aux_loss=aux.detach(), z_loss=z.detach(),
            logits=out.logits if return_logits else None,
            tokens_per_expert=[s.tokens_per_expert for s in stats],
            tokens_dropped=int(sum(int(s.tokens_dropped) for s in stats)),
        )


def build_model(cfg: TrainConfig, vocab_size: int, eot_id: int, pad_id: int, groups: ExpertGroups) -> LanguageModel:
    """The configured backbone; with moe != dense its FFNs every `moe.every` layers become MoE layers."""
    torch.manual_seed(cfg.trainer.seed)  # identical non-expert init on every rank
    if cfg.model.family == "gpt2":
        backbone = gpt2.build_gpt2(cfg.model, vocab_size, eot_id)
    else:
        from mpoe.models import t5

        backbone = t5.build_t5(cfg.model, vocab_size, pad_id)
    if cfg.moe.kind != "dense":
        _install_moe(backbone, cfg, groups)
    return LanguageModel(backbone, cfg.model.family, pad_id)


def _install_moe(backbone: nn.Module, cfg: TrainConfig, groups: ExpertGroups) -> None:
    from mpoe.models.experts import DenseFFN
    from mpoe.models.moe_layer import build_moe_layer

    m = cfg.model
    d_model = backbone.config.n_embd if cfg.model.family == "gpt2" else backbone.config.d_model
    d_ff = (backbone.config.n_inner or 4 * d_model) if cfg.model.family == "gpt2" else backbone.config.d_ff
    upcycle = bool(m.pretrained)

    if cfg.model.family == "gpt2":
        activation = backbone.config.activation_function

        def make(mlp: nn.Module) -> nn.Module:
            dense = DenseFFN.from_gpt2_mlp(mlp) if upcycle else None
            return build_moe_layer(cfg.moe, d_model, d_ff, activation, groups, dense=dense)

        gpt2.replace_ffns(backbone, lambda i: is_moe_layer(i, cfg.moe.every), make)
    else:
        from mpoe.models import t5

        t5.replace_ffns(backbone, cfg.moe, groups, lambda i: is_moe_layer(i, cfg.moe.every), upcycle)
