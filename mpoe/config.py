"""Typed configuration for a training run.

One dataclass per concern (model, moe, data, parallel, optim, logging, trainer),
registered with Hydra's ConfigStore as the schema of `conf/train.yaml`, so a
wrong key or type is caught by OmegaConf. A wrong *value* is caught when the
object is built: each dataclass checks its fields in `__post_init__` (OmegaConf's
`to_object`, tests and benchmarks all build them that way), `TrainConfig` checks
what involves two sections, and `validate(cfg, world_size)` checks everything
again plus what depends on the number of processes, and makes the config
read-only: what was checked is what runs. Code that receives a config therefore
need not check it again, and derives what it needs into copies
(`dataclasses.replace`) or its own variables, never into the config.

Every check raises `ConfigError` whose message is one line: the key, the value
and what would be valid. `mpoe-train` composes and validates once
(mpoe.train.compose), prints that line and exits before any process group or
model is built.

The defaults here are those of `conf/train.yaml` with its default options
(gpt2_tiny, mpoe, embedded, single, adamw): tests/test_config.py checks that they agree.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field, fields, replace
from typing import Any, Optional

MOE_KINDS = ("dense", "switch", "mpoe")
MODEL_FAMILIES = ("gpt2", "t5")
PRECISIONS = ("fp32", "bf16", "fp16")
WANDB_MODES = ("offline", "online", "disabled")
GRAD_MASK_TARGETS = ("central", "auxiliary", "all")
DROP_POLICIES = ("probs", "position")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DATA_SOURCES = ("embedded", "text", "hub", "task")
EXPERT_IMPLS = ("auto", "loop", "grouped")
# moe.router / moe.dispatcher: the names of mpoe.models.moe_builder.ROUTERS / DISPATCHERS
MOE_ROUTERS = ("topk",)
MOE_DISPATCHERS = ("alltoall",)
# moe.gate_scale: prob multiplies each expert output by its gate weight; straight_through (top-1 only) by
# p / stop_gradient(p): 1 in the forward pass, the gate weight's gradient in backward (the MPOE authors' code)
GATE_SCALES = ("prob", "straight_through")
# trainer.compile_backend: inductor generates fused kernels; aot_eager and eager trace without them (to debug)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# trainer.lm_loss: chunked takes LM head and cross-entropy together over chunks (mpoe.models.lm_loss); hf is HF's
LM_LOSSES = ("chunked", "hf")
EMBEDDED_PARTS = (
    "all",
    "pydoc_topics",
    "docstrings",
)  # data=embedded: which of CPython's texts (mpoe.train.data.corpus)


class ConfigError(ValueError):
    """A config value that cannot work; its message is one line naming key, value and fix."""


def _fail(key: str, value: Any, valid: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {valid}")


class _Section:
    """The base of every config section: its fields can be set while a config is built (by OmegaConf's
    `to_object`, a test, a benchmark); once `validate` has passed it is read-only, so what was checked is what
    runs. A value derived from it (a checkpoint's own tokenizer, an export's single process) is a copy made
    with `dataclasses.replace`, which checks the new section as it builds it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_read_only"):
            raise FrozenInstanceError(
                f"{type(self).__name__}.{name}: a validated config is read-only; derive a copy with dataclasses.replace"
            )
        object.__setattr__(self, name, value)


def read_only(section: _Section) -> _Section:
    """`section` and every section inside it made read-only (in place); returns it."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, _Section):
            read_only(value)
    object.__setattr__(section, "_read_only", True)
    return section


def derive(section: _Section, **changes: Any) -> _Section:
    """A copy of `section` with `changes` (checked as it is built, as `dataclasses.replace` builds it), read-only
    where `section` was: a value derived from a validated config is as fixed as the config."""
    copy = replace(section, **changes)
    return read_only(copy) if section.__dict__.get("_read_only") else copy


@dataclass
class ModelConfig(_Section):
    family: str = "gpt2"  # gpt2 | t5
    name: str = "gpt2_tiny"  # the config-group option, for reports
    pretrained: Optional[str] = None  # a local HF checkpoint dir (read offline: local_files_only)
    d_model: int = 128
    d_ff: int = 512
    num_layers: int = 4
    num_decoder_layers: Optional[int] = None  # t5 only; None = num_layers
    num_heads: int = 4
    d_kv: Optional[int] = None  # t5 only; None = d_model // num_heads
    vocab_size: int = 4096  # gpt2_tiny: the size of the embedded BPE tokenizer
    max_position_embeddings: Optional[int] = 256  # longest input; null: no limit (t5: relative attention)
    dropout: float = 0.0
    activation: str = "gelu_new"  # gpt2: gelu_new; t5: relu | gated-gelu
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        check_model(self)


@dataclass
class GradMaskConfig(_Section):
    enabled: bool = False
    keep_prob: float = 0.5
    target: str = "central"  # central | auxiliary | all
    rescale: bool = True  # divide kept entries by keep_prob (Child-Tuning)

    def __post_init__(self) -> None:
        check_grad_mask(self)


@dataclass
class MoEConfig(_Section):
    kind: str = "mpoe"  # dense | switch | mpoe
    num_experts: int = 4
    top_k: int = 1
    every: int = 2  # an MoE FFN every `every` layers (layers every-1, 2*every-1, ...)
    capacity_factor: Optional[float] = None  # training; None = dropless
    eval_capacity_factor: Optional[float] = None  # evaluation; None = dropless
    router: str = "topk"  # which router class (mpoe.models.moe_builder.ROUTERS)
    gate_scale: str = "prob"  # prob | straight_through (top-1: output x p / stop_gradient(p))
    dispatcher: str = "alltoall"  # which dispatcher class (mpoe.models.moe_builder.DISPATCHERS)
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
    expert_impl: str = "auto"  # auto | loop | grouped: per-expert GEMMs or one grouped GEMM; auto = by device
    recompute_mpo_weights: bool = False  # mpoe, grouped backend: rebuild experts' W in backward, not keep it

    def topk_normalized(self) -> bool:
        return self.top_k >= 2 if self.normalize_topk is None else self.normalize_topk

    def __post_init__(self) -> None:
        check_moe(self)


@dataclass
class DataConfig(_Section):
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
    # data=task: a classification task (mpoe.train.data.tasks): an embedded task's name, a local directory with
    # train.* and validation.* files (csv, jsonl, parquet), or a `datasets` name (with task_config, e.g. glue/sst2)
    task: Optional[str] = None
    task_config: Optional[str] = None
    task_text_fields: list[str] = field(default_factory=list)  # empty: GLUE's column names
    task_label_field: str = "label"
    task_label_words: list[str] = field(default_factory=list)  # empty: the task's own (label i -> word i)

    def __post_init__(self) -> None:
        check_data(self)


@dataclass
class ParallelConfig(_Section):
    ep_size: int = 1
    zero_stage: int = 0
    backend: Optional[str] = None  # None = nccl on GPU, gloo on CPU

    def __post_init__(self) -> None:
        check_parallel(self)


@dataclass
class OptimConfig(_Section):
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    central_lr_scale: float = 1.0  # MPOE central tensors' learning rate = lr x this (0 freezes them)

    def __post_init__(self) -> None:
        check_optim(self)


@dataclass
class WandbConfig(_Section):
    mode: str = "offline"
    project: str = "mpoe"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_wandb(self)


@dataclass
class LoggingConfig(_Section):
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True


@dataclass
class TrainerConfig(_Section):
    max_steps: int = 500  # optimizer steps; 0 = evaluate only
    seed: int = 0
    micro_batch_size: int = 8  # sequences per process per micro step
    global_batch_size: Optional[int] = (
        None  # sequences per optimizer step over all processes; null = micro x world (no accumulation)
    )
    seq_len: int = 128
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    # The validation set: this many sequences of the validation split, whatever the number of
    # processes (sharded over them); null = eval_batches x micro_batch_size.
    eval_sequences: Optional[int] = None
    save_every: int = 0  # 0 = only the final checkpoint
    keep_last: int = 2
    resume: Optional[str] = None  # auto | a checkpoint path | null
    dry_run: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16
    max_bad_steps: int = 10
    compile: bool = False  # torch.compile each transformer block (mpoe.models.regional_compile)
    compile_backend: str = "inductor"  # inductor | aot_eager | eager
    # Recompute each transformer block's forward in backward (HF's activation checkpointing, non-reentrant): a
    # forward keeps only the blocks' inputs, for about one more forward per step.
    activation_checkpointing: bool = False
    lm_loss: str = "chunked"  # chunked | hf (who computes the LM loss: mpoe.models.lm_loss, or the HF model)

    def __post_init__(self) -> None:
        check_trainer(self)


@dataclass
class TrainConfig(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        check_train(self)


def _one_of(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        _fail(key, value, "use one of " + ", ".join(map(str, options)))


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        _fail(key, value, "must be >= 0" if allow_zero else "must be > 0")


def check_model(m: ModelConfig) -> None:
    _one_of("model.family", m.family, MODEL_FAMILIES)
    for key in ("d_model", "d_ff", "num_layers", "num_heads", "vocab_size"):
        _positive(f"model.{key}", getattr(m, key))
    if m.max_position_embeddings is not None:
        _positive("model.max_position_embeddings", m.max_position_embeddings)
    if m.d_model % m.num_heads:
        _fail("model.num_heads", m.num_heads, f"must divide model.d_model={m.d_model}")


def check_moe(moe: MoEConfig) -> None:
    _one_of("moe.kind", moe.kind, MOE_KINDS)
    _positive("moe.num_experts", moe.num_experts)
    if not 1 <= moe.top_k <= moe.num_experts:
        _fail("moe.top_k", moe.top_k, f"must be between 1 and moe.num_experts={moe.num_experts}")
    _positive("moe.every", moe.every)
    for key in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, key)
        if value is not None and value <= 0:
            _fail(f"moe.{key}", value, "must be > 0, or null for dropless routing")
    _one_of("moe.router", moe.router, MOE_ROUTERS)
    _one_of("moe.dispatcher", moe.dispatcher, MOE_DISPATCHERS)
    _one_of("moe.drop_policy", moe.drop_policy, DROP_POLICIES)
    _one_of("moe.score_function", moe.score_function, SCORE_FUNCTIONS)
    _one_of("moe.expert_impl", moe.expert_impl, EXPERT_IMPLS)
    _positive("moe.aux_loss_coef", moe.aux_loss_coef, allow_zero=True)
    _positive("moe.z_loss_coef", moe.z_loss_coef, allow_zero=True)
    _positive("moe.jitter_eps", moe.jitter_eps, allow_zero=True)
    if moe.bond_dim is not None:
        _positive("moe.bond_dim", moe.bond_dim)
    if moe.num_mpo_factors < 2:
        _fail("moe.num_mpo_factors", moe.num_mpo_factors, "must be >= 2 (the paper uses 5)")
    if moe.recompute_mpo_weights and moe.kind != "mpoe":
        _fail("moe.recompute_mpo_weights", True, "recomputes the weights MPOE rebuilds: use moe=mpoe or disable it")
    if moe.recompute_mpo_weights and moe.expert_impl == "loop":
        _fail("moe.recompute_mpo_weights", True, "acts in the grouped backend: use moe.expert_impl=grouped or auto")
    _one_of("moe.gate_scale", moe.gate_scale, GATE_SCALES)
    if moe.gate_scale == "straight_through" and moe.top_k != 1:
        _fail("moe.gate_scale", "straight_through", f"scales one expert's output: use moe.top_k=1 (not {moe.top_k})")
    if moe.grad_mask.enabled and moe.kind != "mpoe":
        _fail("moe.grad_mask.enabled", True, "the gradient mask acts on MPO tensors: use moe=mpoe or disable it")


def check_grad_mask(gm: GradMaskConfig) -> None:
    if not 0.0 <= gm.keep_prob <= 1.0:
        _fail("moe.grad_mask.keep_prob", gm.keep_prob, "must be in [0, 1]")
    _one_of("moe.grad_mask.target", gm.target, GRAD_MASK_TARGETS)


def check_data(d: DataConfig) -> None:
    _one_of("data.name", d.name, DATA_SOURCES)
    if not 0.0 < d.val_fraction < 1.0:
        _fail("data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _one_of("data.embedded_part", d.embedded_part, EMBEDDED_PARTS)
    if d.embedded_part != "all" and d.name != "embedded":
        _fail("data.embedded_part", d.embedded_part, "selects part of data=embedded only: use all here")
    if d.name == "task" and not d.task:
        _fail("data.task", d.task, "data=task needs a task: an embedded task's name, a directory or a datasets name")
    if d.task and d.name != "task":
        _fail("data.task", d.task, "is read by data=task only: add data=task")


def check_parallel(p: ParallelConfig) -> None:
    _positive("parallel.ep_size", p.ep_size)
    if p.zero_stage not in (0, 1, 2):
        _fail("parallel.zero_stage", p.zero_stage, "use 0, 1 or 2 (stage 3 does not support MoE layers)")
    if p.backend is not None:
        _one_of("parallel.backend", p.backend, ("gloo", "nccl"))


def check_optim(o: OptimConfig) -> None:
    if o.lr <= 0:
        _fail("optim.lr", o.lr, "must be > 0")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.central_lr_scale", o.central_lr_scale, allow_zero=True)


def check_wandb(w: WandbConfig) -> None:
    _one_of("logging.wandb.mode", w.mode, WANDB_MODES)


def check_trainer(t: TrainerConfig) -> None:
    _positive("trainer.max_steps", t.max_steps, allow_zero=True)
    for key in ("micro_batch_size", "seq_len", "log_every", "eval_every", "eval_batches", "keep_last", "max_bad_steps"):
        _positive(f"trainer.{key}", getattr(t, key))
    _positive("trainer.save_every", t.save_every, allow_zero=True)
    if t.eval_sequences is not None:
        _positive("trainer.eval_sequences", t.eval_sequences)
    if t.global_batch_size is not None and t.global_batch_size <= 0:
        _fail("trainer.global_batch_size", t.global_batch_size, "must be > 0, or null for micro_batch_size x processes")
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.compile_backend", t.compile_backend, COMPILE_BACKENDS)
    _one_of("trainer.lm_loss", t.lm_loss, LM_LOSSES)


def check_ep_divides_experts(ep_size: int, num_experts: int) -> None:
    """Each expert-parallel rank holds num_experts / ep_size whole experts."""
    if num_experts % ep_size:
        _fail("parallel.ep_size", ep_size, f"must divide moe.num_experts={num_experts}")


def check_train(cfg: TrainConfig) -> None:
    """The checks that involve two sections (each section checks itself when built)."""
    m, t = cfg.model, cfg.trainer
    if cfg.moe.kind != "dense":
        check_ep_divides_experts(cfg.parallel.ep_size, cfg.moe.num_experts)
    if cfg.moe.grad_mask.enabled and cfg.moe.grad_mask.target != "auxiliary" and cfg.optim.central_lr_scale == 0:
        _fail(
            "moe.grad_mask.target",
            cfg.moe.grad_mask.target,
            "optim.central_lr_scale=0 freezes the central tensors: use target=auxiliary or moe.grad_mask.enabled=false",
        )
    if cfg.data.name == "text" and not cfg.data.paths:
        _fail("data.paths", cfg.data.paths, "data=text needs data.paths=[file.txt,...] (txt, json, jsonl or parquet)")
    if cfg.data.name == "hub" and not cfg.data.hub_name:
        _fail("data.hub_name", None, "data=hub needs data.hub_name=<dataset on the hub>")
    if m.max_position_embeddings is not None and t.seq_len > m.max_position_embeddings:
        _fail("trainer.seq_len", t.seq_len, f"must be <= model.max_position_embeddings={m.max_position_embeddings}")
    if t.activation_checkpointing and t.compile and m.family == "t5":
        _fail(
            "trainer.activation_checkpointing",
            True,
            "with trainer.compile, T5's blocks do not compile (HF's T5 sets requires_grad on a tensor inside the "
            "checkpointed block): use one of the two",
        )


def _check_all(cfg: TrainConfig) -> None:
    """Every section's checks, in the order a user reads the config, then the cross-section ones."""
    check_model(cfg.model)
    check_grad_mask(cfg.moe.grad_mask)
    check_moe(cfg.moe)
    check_parallel(cfg.parallel)
    check_optim(cfg.optim)
    check_data(cfg.data)
    check_trainer(cfg.trainer)
    check_wandb(cfg.logging.wandb)
    check_train(cfg)


def validate(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    """Check every value again (fields may have been set since the objects were built) and those that depend
    on the world size; raise ConfigError (one line) on the first bad one. Returns `cfg`, now read-only."""
    _check_all(cfg)
    p, t = cfg.parallel, cfg.trainer
    if world_size % p.ep_size:
        _fail("parallel.ep_size", p.ep_size, f"must divide the world size {world_size} (processes)")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size is not None and t.global_batch_size % per_step:
        _fail(
            "trainer.global_batch_size",
            t.global_batch_size,
            f"must be a multiple of trainer.micro_batch_size x world size = {t.micro_batch_size} x {world_size}",
        )
    return read_only(cfg)


def global_batch_size(cfg: TrainConfig, world_size: int) -> int:
    return cfg.trainer.global_batch_size or cfg.trainer.micro_batch_size * world_size


def eval_sequences(cfg: TrainConfig) -> int:
    """How many validation sequences every evaluation covers, over all processes together."""
    t = cfg.trainer
    return t.eval_sequences if t.eval_sequences is not None else t.eval_batches * t.micro_batch_size


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    return global_batch_size(cfg, world_size) // (cfg.trainer.micro_batch_size * world_size)
