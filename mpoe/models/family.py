"""Model families behind one interface: what the rest of mpoe needs to know about an HF model.

A family (GPT-2, T5, ...) says how to build its Hugging Face model from our
`ModelConfig` or a local checkpoint, where its dense FFNs are and how to read
their weights, how big they are, which parameters are embeddings, how a window
of raw tokens becomes its inputs (the objective) and which special token ids it
uses. `build.py`, accounting, export and the training loop ask the family and
never test its name. The objective is named, not imported (models do not import
`mpoe.train`): `mpoe.train.data.objectives` maps the name to the class.

A new family is one module, `mpoe/models/<name>.py`, defining a `Family` subclass
and `FAMILY = ThatFamily()`, and its name added to `mpoe.config.MODEL_FAMILIES`
(the options `model.family` is validated against before anything is imported).
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers.activations import NewGELUActivation

from mpoe.config import MODEL_FAMILIES, ConfigError
from mpoe.models.experts import activation_fn

if TYPE_CHECKING:
    from torch import nn

    from mpoe.config import ModelConfig
    from mpoe.models.experts import DenseFFN


def get(name: str) -> Family:
    """The family called `name` (model.family): `FAMILY` of the module mpoe/models/<name>.py."""
    if name not in MODEL_FAMILIES:
        raise ConfigError(f"model.family={name!r} is invalid: use one of {', '.join(MODEL_FAMILIES)}")
    return importlib.import_module(f"mpoe.models.{name}").FAMILY


@dataclass(frozen=True)
class FFNShape:
    """A dense FFN's shape, in the expert banks' naming."""

    d_model: int
    d_ff: int
    activation: str  # an expert activation name ('gated-' prefix for gated FFNs)
    bias: bool  # whether the FFN's linear layers have biases (the experts copy that)


class Family(ABC):
    """One model family. Subclasses set `name` and the HF classes, and implement the abstract methods."""

    name: str  # model.family, and the `model_type` in a checkpoint's config.json
    model_class: Any  # the HF model class (e.g. GPT2LMHeadModel)
    config_class: Any  # its HF config class

    # -- building -----------------------------------------------------------------------------

    @abstractmethod
    def hf_config(self, cfg: ModelConfig, embedding_rows: int, eot_id: int, pad_id: int) -> Any:
        """The HF config for our shape; `embedding_rows` is the final token-table size."""

    def embedding_rows(self, tokenizer_vocab: int) -> int:
        """Token-table rows for a tokenizer of `tokenizer_vocab` ids (a family may add its own ids)."""
        return tokenizer_vocab

    @abstractmethod
    def pretrained_overrides(self, cfg: ModelConfig) -> dict:
        """Config values a local checkpoint's own are overridden with (training choices such as dropout)."""

    def from_config(self, config: Any) -> nn.Module:
        """The HF model with fresh weights for `config` (its tanh-GELUs fused: `fuse_tanh_gelu`)."""
        backbone = self.model_class(config)
        fuse_tanh_gelu(backbone)
        return backbone

    def build(self, cfg: ModelConfig, tokenizer_vocab: int, eot_id: int, pad_id: int) -> nn.Module:
        """From scratch with our shape, or model.pretrained's shape and weights (a local directory only)."""
        if cfg.pretrained:
            self.check_pretrained(cfg.pretrained)
            # float32 whatever dtype the checkpoint was saved in (transformers loads it as saved): DeepSpeed casts
            # the model for bf16/fp16 and keeps float32 masters, but an fp32 run would train a bf16 file's weights
            # in bf16, with no masters, and the MPO upcycling would decompose bf16 weights.
            backbone = self.model_class.from_pretrained(
                cfg.pretrained,
                local_files_only=True,
                attn_implementation="sdpa",
                dtype=torch.float32,
                **self.pretrained_overrides(cfg),
            )
            fuse_tanh_gelu(backbone)
            return backbone
        return self.from_config(self.hf_config(cfg, self.embedding_rows(tokenizer_vocab), eot_id, pad_id))

    def check_pretrained(self, path: str) -> dict:
        """The checkpoint's config.json, or a one-line ConfigError naming model.pretrained."""
        return read_pretrained_config(path, self.name)

    # -- FFNs ----------------------------------------------------------------------------------

    @abstractmethod
    def ffn_shape(self, config: Any) -> FFNShape:
        """The shape of the dense FFNs of a model with HF config `config`."""

    @abstractmethod
    def replace_ffns(
        self, backbone: nn.Module, is_moe: Callable[[int], bool], make_moe: Callable[[nn.Module], nn.Module]
    ) -> list:
        """Swap the FFN of block i (counted within each stack) for make_moe(old_ffn) where is_moe(i);
        returns which blocks were replaced."""

    @abstractmethod
    def dense_ffn(self, ffn: nn.Module) -> DenseFFN:
        """The weights of one of this family's FFN modules, for upcycling experts from it."""

    # -- accounting ----------------------------------------------------------------------------

    @abstractmethod
    def embedding_params(self, backbone: nn.Module) -> int:
        """Parameters in the embedding tables (an untied LM head is counted apart, by accounting)."""

    @abstractmethod
    def attention_layers(self, config: Any) -> int:
        """How many attention layers a token passes through (for model FLOPs)."""

    @abstractmethod
    def token_embedding_key(self) -> str:
        """The state-dict name of the token table, within the HF model."""

    # -- training ------------------------------------------------------------------------------

    objective: str  # how raw token windows become inputs: a name in mpoe.train.data.objectives.OBJECTIVES

    @abstractmethod
    def model_inputs(
        self, input_ids: torch.Tensor, labels: Optional[torch.Tensor], decoder_input_ids: Optional[torch.Tensor]
    ) -> dict:
        """Keyword arguments for the HF model's forward, such that it returns the LM loss."""

    @abstractmethod
    def lm_hidden_states(self, backbone: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states the LM head reads and the target id of each (-100: none), for `inputs` as
        `model_inputs` makes them: the HF model's own forward up to its head, without computing logits
        (`mpoe.models.lm_loss` takes head and loss together)."""

    def pad_id(self, backbone: nn.Module, tokenizer_pad_id: int) -> int:
        """The pad id the model uses (the tokenizer's unless the model's config fixes its own)."""
        return tokenizer_pad_id

    # Whether a training or evaluation forward lets HF build its KV cache (None: the HF config's `use_cache`).
    # A family sets False where HF's no-cache path costs nothing; compiled blocks always run without one.
    training_kv_cache: Optional[bool] = None

    @abstractmethod
    def blocks(self, backbone: nn.Module) -> list[nn.Module]:
        """The transformer blocks, in order (the units `trainer.compile` compiles one by one)."""


def fuse_tanh_gelu(backbone: nn.Module) -> None:
    """Replace HF's `gelu_new` modules (GPT-2's dense FFNs, T5 v1.1's) by the module the experts run for
    `gelu_new` (`experts.activation_fn`): the same tanh-GELU as one kernel, `F.gelu(approximate="tanh")`.

    Why: `gelu_new` is written as about eight elementwise ops, each a pass over the [tokens, d_ff] activations,
    with their intermediates kept for backward; the one kernel is as exact (both are within float rounding of
    the float64 formula). The HF config keeps its `gelu_new`, so exported models are unchanged.
    """
    for module in backbone.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, activation_fn("gelu_new"))


def read_pretrained_config(path: str, family: str) -> dict:
    """A local HF checkpoint's config.json, checked to be a `family` model; ConfigError (one line) if not."""
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
