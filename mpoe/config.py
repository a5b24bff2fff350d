"""Typed configuration for a training run.

One dataclass per concern (model, moe, data, parallel, optim, logging, trainer),
registered with Hydra's ConfigStore as the schema of `conf/train.yaml`, so a
wrong key or type is caught by OmegaConf, and a wrong *value* by `validate()`.
Every check raises `ConfigError` whose message is one line: the key, the value
and what would be valid. `mpoe.train.main` prints that line and exits before any
process group or model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

MOE_KINDS = ("dense", "switch", "mpoe")
MODEL_FAMILIES = ("gpt2", "t5")
PRECISIONS = ("fp32", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")
GRAD_MASK_TARGETS = ("central", "auxiliary", "all")
DROP_POLICIES = ("probs", "position")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
EMBEDDED_PARTS = ("all", "pydoc_topics", "docstrings")  # data=embedded: which of CPython's texts (mpoe.train.corpus)


class ConfigError(ValueError):
    """A config value that cannot work; its message is one line naming key, value and fix."""


def _fail(key: str, value: Any, valid: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {valid}")


@dataclass
class ModelConfig:
    family: str = "gpt2"  # gpt2 | t5
    name: str = "gpt2_tiny"  # the config-group option, for reports
    pretrained: Optional[str] = None  # local HF checkpoint dir (or hub name when online)
    d_model: int = 128
    d_ff: int = 512
    num_layers: int = 4
    num_decoder_layers: Optional[int] = None  # t5 only; None = num_layers
    num_heads: int = 4
    d_kv: Optional[int] = None  # t5 only; None = d_model // num_heads
    vocab_size: int = 4096  # gpt2_tiny: the size of the embedded BPE tokenizer
    max_position_embeddings: int = 256
    dropout: float = 0.0
    activation: str = "gelu_new"  # gpt2: gelu_new; t5: relu | gated-gelu
    tie_word_embeddings: bool = True


@dataclass
class GradMaskConfig:
    enabled: bool = False
    keep_prob: float = 0.5
    target: str = "central"  # central | auxiliary | all
    rescale: bool = True  # divide kept entries by keep_prob (Child-Tuning)


@dataclass
class MoEConfig:
    kind: str = "dense"  # dense | switch | mpoe
    num_experts: int = 4
    top_k: int = 1
    every: int = 2  # an MoE FFN every `every` layers (layers every-1, 2*every-1, ...)
    capacity_factor: Optional[float] = None  # training; None = dropless
    eval_capacity_factor: Optional[float] = None  # evaluation; None = dropless
    drop_policy: str = "probs"  # probs | position
    normalize_topk: Optional[bool] = None  # None = true when top_k >= 2
    pre_softmax: bool = True  # softmax over all experts, then top-k (Switch); false: top-k logits, then softmax
    score_function: str = "softmax"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    jitter_eps: float = 0.0  # multiplicative jitter on router input, training only
    router_init_std: float = 0.02
    bond_dim: Optional[int] = None  # mpoe: cap on every MPO bond; None = full (exact)
    num_mpo_factors: int = 5  # mpoe: n local tensors per matrix
    aux_init_noise: float = 0.0  # mpoe: noise on auxiliary tensors to break symmetry
    grad_mask: GradMaskConfig = field(default_factory=GradMaskConfig)

    def topk_normalized(self) -> bool:
        return self.top_k >= 2 if self.normalize_topk is None else self.normalize_topk


@dataclass
class DataConfig:
    name: str = "embedded"  # embedded | text | hub
    paths: list[str] = field(default_factory=list)  # data=text: local .txt/.json/.jsonl/.parquet
    hub_name: Optional[str] = None  # data=hub: a datasets hub name (online only)
    hub_config: Optional[str] = None
    text_field: str = "text"
    val_fraction: float = 0.05
    tokenizer: Optional[str] = None  # a tokenizer.json path; None = train BPE on the corpus
    vocab_size: int = 4096
    cache_dir: Optional[str] = None  # None = ~/.cache/mpoe
    embedded_part: str = "all"  # data=embedded: all | pydoc_topics | docstrings (e.g. a domain shift between runs)


@dataclass
class ParallelConfig:
    ep_size: int = 1
    zero_stage: int = 0
    backend: Optional[str] = None  # None = nccl on GPU, gloo on CPU


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "mpoe"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimizer steps; 0 = evaluate only
    seed: int = 0
    micro_batch_size: int = 8  # sequences per process per micro step
    global_batch_size: Optional[int] = (
        None  # sequences per optimizer step over all processes; null = micro x world (no accumulation)
    )
    seq_len: int = 128
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 0  # 0 = only the final checkpoint
    keep_last: int = 2
    resume: Optional[str] = None  # auto | a checkpoint path | null
    dry_run: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16
    max_bad_steps: int = 10


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _one_of(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        _fail(key, value, "use one of " + ", ".join(map(str, options)))


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        _fail(key, value, "must be >= 0" if allow_zero else "must be > 0")


def validate(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    """Check every value that the types cannot; raise ConfigError (one line) on the first bad one."""
    m, moe, t, p, o = cfg.model, cfg.moe, cfg.trainer, cfg.parallel, cfg.optim
    _one_of("model.family", m.family, MODEL_FAMILIES)
    for key in ("d_model", "d_ff", "num_layers", "num_heads", "vocab_size", "max_position_embeddings"):
        _positive(f"model.{key}", getattr(m, key))
    if m.d_model % m.num_heads:
        _fail("model.num_heads", m.num_heads, f"must divide model.d_model={m.d_model}")
    _one_of("moe.kind", moe.kind, MOE_KINDS)
    _positive("moe.num_experts", moe.num_experts)
    if not 1 <= moe.top_k <= moe.num_experts:
        _fail("moe.top_k", moe.top_k, f"must be between 1 and moe.num_experts={moe.num_experts}")
    _positive("moe.every", moe.every)
    for key in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, key)
        if value is not None and value <= 0:
            _fail(f"moe.{key}", value, "must be > 0, or null for dropless routing")
    _one_of("moe.drop_policy", moe.drop_policy, DROP_POLICIES)
    _one_of("moe.score_function", moe.score_function, SCORE_FUNCTIONS)
    _positive("moe.aux_loss_coef", moe.aux_loss_coef, allow_zero=True)
    _positive("moe.z_loss_coef", moe.z_loss_coef, allow_zero=True)
    _positive("moe.jitter_eps", moe.jitter_eps, allow_zero=True)
    if moe.bond_dim is not None:
        _positive("moe.bond_dim", moe.bond_dim)
    if moe.num_mpo_factors < 2:
        _fail("moe.num_mpo_factors", moe.num_mpo_factors, "must be >= 2 (the paper uses 5)")
    gm = moe.grad_mask
    if not 0.0 <= gm.keep_prob <= 1.0:
        _fail("moe.grad_mask.keep_prob", gm.keep_prob, "must be in [0, 1]")
    _one_of("moe.grad_mask.target", gm.target, GRAD_MASK_TARGETS)
    if gm.enabled and moe.kind != "mpoe":
        _fail("moe.grad_mask.enabled", True, "the gradient mask acts on MPO tensors: use moe=mpoe or disable it")

    _positive("parallel.ep_size", p.ep_size)
    if p.zero_stage not in (0, 1, 2):
        _fail("parallel.zero_stage", p.zero_stage, "use 0, 1 or 2 (stage 3 does not support MoE layers)")
    if moe.kind != "dense" and moe.num_experts % p.ep_size:
        _fail("parallel.ep_size", p.ep_size, f"must divide moe.num_experts={moe.num_experts}")
    if world_size % p.ep_size:
        _fail("parallel.ep_size", p.ep_size, f"must divide the world size {world_size} (processes)")
    if p.backend is not None:
        _one_of("parallel.backend", p.backend, ("gloo", "nccl"))

    if o.lr <= 0:
        _fail("optim.lr", o.lr, "must be > 0")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)

    _one_of("data.name", cfg.data.name, ("embedded", "text", "hub"))
    if cfg.data.name == "text" and not cfg.data.paths:
        _fail("data.paths", cfg.data.paths, "data=text needs data.paths=[file.txt,...] (txt, json, jsonl or parquet)")
    if cfg.data.name == "hub" and not cfg.data.hub_name:
        _fail("data.hub_name", None, "data=hub needs data.hub_name=<dataset on the hub>")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        _fail("data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
    _one_of("data.embedded_part", cfg.data.embedded_part, EMBEDDED_PARTS)
    if cfg.data.embedded_part != "all" and cfg.data.name != "embedded":
        _fail("data.embedded_part", cfg.data.embedded_part, "selects part of data=embedded only: use all here")

    _positive("trainer.max_steps", t.max_steps, allow_zero=True)
    for key in ("micro_batch_size", "seq_len", "log_every", "eval_every", "eval_batches", "keep_last", "max_bad_steps"):
        _positive(f"trainer.{key}", getattr(t, key))
    _positive("trainer.save_every", t.save_every, allow_zero=True)
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size is not None and (t.global_batch_size <= 0 or t.global_batch_size % per_step):
        _fail(
            "trainer.global_batch_size",
            t.global_batch_size,
            f"must be a multiple of trainer.micro_batch_size x world size = {t.micro_batch_size} x {world_size}",
        )
    if t.seq_len > m.max_position_embeddings and m.family == "gpt2":
        _fail("trainer.seq_len", t.seq_len, f"must be <= model.max_position_embeddings={m.max_position_embeddings}")
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    return cfg


def global_batch_size(cfg: TrainConfig, world_size: int) -> int:
    return cfg.trainer.global_batch_size or cfg.trainer.micro_batch_size * world_size


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    return global_batch_size(cfg, world_size) // (cfg.trainer.micro_batch_size * world_size)
