"""The training run: set up data, model and DeepSpeed engine; run the steps; log, evaluate, checkpoint; finish.

Every rank runs this in lockstep (expert-parallel all-to-alls and DeepSpeed's
reductions are collectives); only rank 0 writes the run directory files and
shows the progress bar. Batches are cut on the CPU and moved to the engine's
device; statistics stay on the device and are read once per logged step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mpoe.config import TrainConfig, derive, eval_sequences, global_batch_size, grad_accum_steps
from mpoe.models import family as families
from mpoe.models.accounting import count_params, format_table
from mpoe.models.build import build_model, moe_layers
from mpoe.models.experts import resolve_expert_backends
from mpoe.models.grad_mask import GradientMask, select_masked_params
from mpoe.models.regional_compile import compile_blocks
from mpoe.parallel.collectives import all_reduce, host_barrier, host_broadcast
from mpoe.parallel.deepspeed import engine as ds_engine
from mpoe.parallel.deepspeed import gradients as ds_gradients
from mpoe.parallel.deepspeed.accelerator import accelerator_name
from mpoe.parallel.expert_placement import ExpertPlacement, expert_placement
from mpoe.parallel.process_groups import rank_world
from mpoe.train.checkpoint import autoresume
from mpoe.train.checkpoint import store as checkpoint
from mpoe.train.data import sequences as data_lib
from mpoe.train.data.objectives import build_objective
from mpoe.train.data.task_data import TaskData
from mpoe.train.data.task_data import prepare as prepare_task
from mpoe.train.metrics.experts import CentralUpdate, expert_divergence
from mpoe.train.metrics.flops import Peak, device_peak, flops_per_token, raised_to_cover
from mpoe.train.metrics.grad_norms import grad_norms, role_params, zero_role_norms
from mpoe.train.metrics.task_scores import score as score_task
from mpoe.train.metrics.writer import Interval, MetricsLogger
from mpoe.train.runtime import console, faults, interrupt

log = logging.getLogger("mpoe.train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the message is one line."""


@dataclass
class Training:
    """What the step loop needs, made once by `_setup`."""

    cfg: TrainConfig
    engine: object
    objective: object
    sampler: data_lib.SequenceSampler
    val: list[tuple[torch.Tensor, int]]
    logger: MetricsLogger
    placement: ExpertPlacement
    grad_mask: Optional[object]
    roles: dict
    accum: int
    world: int
    rank: int
    ckpt_dir: Path
    identity: dict
    start_step: int
    resumed_from: Optional[Path]
    tokens_per_step: int
    flops_per_token: float
    peak: Peak
    counts: dict
    skipped_total: int = 0
    bad_in_a_row: int = 0
    lr_used: float = 0.0  # the learning rate of the last optimizer step, for its log record
    val_loss: Optional[float] = None
    val_tokens: int = 0
    last: dict = field(default_factory=dict)  # the last logged record
    faults: faults.Faults = faults.NONE  # injected by tests through the environment (runtime/faults.py)
    wall_before: float = 0.0  # seconds the run's earlier parts took, as the checkpoint it resumed from says
    task_data: Optional[TaskData] = None  # data=task: the task's rows, scored at the end (metrics/task_scores.py)
    central_update: Optional[CentralUpdate] = None  # MPOE: how far each layer's central tensors move in a step

    @property
    def device(self) -> torch.device:
        return self.engine.device


def run(cfg: TrainConfig, run_dir: Path, run_config: Optional[dict] = None) -> dict:
    t0 = time.perf_counter()
    tr = _setup(cfg, run_dir, run_config)
    if isinstance(tr, dict):  # a dry run: the parameter table is all there is
        return tr
    progress = _progress(cfg, tr.rank, tr.start_step)
    interval = Interval(tr.device)
    train_start = time.perf_counter()
    step = tr.start_step
    for step in range(tr.start_step, cfg.trainer.max_steps):
        if interrupt.stop_agreed():  # SIGINT/SIGTERM on any rank: stop before this step (interrupt.py)
            break
        done = step + 1
        evaluate_now = done % cfg.trainer.eval_every == 0 or done == cfg.trainer.max_steps
        log_now = done % cfg.trainer.log_every == 0 or evaluate_now
        norms = _train_step(tr, step, interval, log_now)
        if log_now:
            _log(tr, done, interval, norms, evaluate_now, progress)
            interval = Interval(tr.device)
        if progress is not None:
            progress.update(1)
        save_every = cfg.trainer.save_every
        if save_every and done % save_every == 0 and done != cfg.trainer.max_steps:
            _save(tr, done, t0)
    if progress is not None:
        progress.close()
    if interrupt.stopped():  # checkpoint the `step` steps done; main.py says where it is and how to resume
        tr.logger.close()
        t = cfg.trainer
        saved = _save(tr, step, t0) if step > tr.start_step else None
        raise interrupt.Interrupted(interrupt.requested(), step, t.max_steps, saved or tr.resumed_from)
    return _finish(tr, t0, time.perf_counter() - train_start)


def _setup(cfg: TrainConfig, run_dir: Path, run_config: Optional[dict]):
    """Data, model, engine, samplers, resume. A dry run returns its parameter counts instead."""
    rank, world = rank_world()
    t = cfg.trainer
    placement = expert_placement(cfg.parallel.ep_size)
    if t.dry_run:
        token_data = None
        vocab, eot, pad = cfg.model.vocab_size, 0, 1
    else:
        token_data = _prepare_data(cfg, rank)
        vocab, eot, pad = token_data.vocab_size, token_data.eot_id, token_data.pad_id
    model = build_model(cfg, vocab, eot, pad, placement)
    embedding = families.get(model.family).embedding_params(model.backbone)
    counts = count_params(model, embedding, cfg.moe.top_k, cfg.parallel.ep_size)
    logger = MetricsLogger(run_dir, rank == 0, None if t.dry_run else cfg.logging.wandb, run_config)
    if rank == 0:  # through logging: Hydra writes it to the console and main.log
        log.info(
            f"model {cfg.model.name} with moe={cfg.moe.kind} ({len(moe_layers(model))} MoE layers), "
            f"{world} process(es):\n{format_table(counts)}"
        )
    if t.dry_run:
        logger.summary({**counts, "dry_run": True})
        logger.close()
        return counts

    if t.compile:
        blocks = compile_blocks(model, t.compile_backend)
        if rank == 0:
            log.info(f"trainer.compile: {blocks} transformer blocks compiled ({t.compile_backend}) at their first use")
            if accelerator_name() == "cpu" and cfg.moe.kind != "dense":
                log.info(
                    "trainer.compile on the CPU: the loop expert backend reads token counts on the host, so it "
                    "runs eagerly between compiled parts; compile is meant for CUDA"
                )
    engine = ds_engine.initialize(model, cfg, world)
    experts = resolve_expert_backends(model, engine.device)  # the engine placed the model: choose for its device
    if rank == 0 and experts:
        log.info(experts)
    grad_mask = _grad_mask(cfg, model)
    objective = build_objective(cfg, token_data)
    raw_len = objective.raw_length
    accum = grad_accum_steps(cfg, world)
    sampler = data_lib.SequenceSampler(
        token_data.windows("train", raw_len), t.micro_batch_size, accum, world, rank, t.seed
    )
    val_sequences = token_data.windows("val", raw_len)
    val = data_lib.eval_batches(val_sequences, t.micro_batch_size, eval_sequences(cfg), world, rank)

    ckpt_dir = run_dir / "checkpoints"
    identity = {
        "world_size": world,
        "ep_size": cfg.parallel.ep_size,
        "zero_stage": ds_engine.zero_stage(cfg),  # the stage run (bf16/fp16 run at least 1)
        "model": cfg.model.name,
        "moe": cfg.moe.kind,
        "num_experts": cfg.moe.num_experts,
        "central_tensors": ds_engine.central_layout(cfg.optim.central_lr_scale),  # the optimizer's sets differ
    }
    start_step, resumed_from = _resume(cfg, engine, ckpt_dir, identity, placement, rank)
    per_token, peak = _flops_reference(cfg, model, counts, raw_len, engine.device)
    return Training(
        cfg=cfg,
        engine=engine,
        objective=objective,
        sampler=sampler,
        val=val,
        logger=logger,
        placement=placement,
        grad_mask=grad_mask,
        roles=role_params(model),
        accum=accum,
        world=world,
        rank=rank,
        ckpt_dir=ckpt_dir,
        identity=identity,
        start_step=start_step,
        resumed_from=resumed_from,
        tokens_per_step=global_batch_size(cfg, world) * raw_len,
        flops_per_token=per_token,
        peak=peak,
        counts=counts,
        faults=faults.from_environment(rank),
        wall_before=checkpoint.read_meta(resumed_from).get("wall_s", 0.0) if resumed_from is not None else 0.0,
        task_data=token_data if cfg.data.name == "task" else None,
        central_update=CentralUpdate(engine.module) if cfg.moe.kind == "mpoe" else None,
    )


def _resume(
    cfg: TrainConfig, engine, ckpt_dir: Path, identity: dict, placement: ExpertPlacement, rank: int
) -> tuple[int, Optional[Path]]:
    """The step to start from and the checkpoint it comes from: (0, None), or the resumed checkpoint's.

    Rank 0 looks at the run directory and tells the others, so that all resume from the same checkpoint (or
    stop with the same line), whatever a shared file system shows each node soon after a restart."""
    decided = [_resume_source(cfg.trainer.resume, ckpt_dir) if rank == 0 else None]
    host_broadcast(decided)
    resume_from, error = decided[0]
    if error is not None:
        raise error
    if resume_from is None:
        return 0, None
    layout_keys = ("world_size", "ep_size", "zero_stage")
    meta = checkpoint.load(
        engine,
        resume_from,
        {k: identity[k] for k in layout_keys},
        {k: v for k, v in identity.items() if k not in layout_keys},
        placement,
        cfg.moe.num_experts,
    )
    if rank == 0:
        log.info(f"resumed from {resume_from} at step {meta['step']}")
    return meta["step"], resume_from


def _resume_source(resume: Optional[str], ckpt_dir: Path) -> tuple[Optional[Path], Optional[Exception]]:
    """(the checkpoint to resume from or None, or the error that stops the run) for trainer.resume."""
    if resume is None:  # main.py refuses this before Hydra writes; a run dir from a pattern is known only here
        return None, autoresume.start_over_refusal(ckpt_dir)
    try:
        return checkpoint.resolve(resume, ckpt_dir), None
    except checkpoint.CheckpointError as e:
        return None, e


def _to_device(batch: dict, device: torch.device) -> dict:
    """Batches are cut on the CPU (pinned-free, tiny); the model wants them where its parameters are."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _train_step(tr: Training, step: int, interval: Interval, log_now: bool) -> dict:
    """One optimizer step over `accum` micro-batches; returns the per-role gradient norms when logging."""
    engine, cfg = tr.engine, tr.cfg
    done = step + 1
    tr.faults.step_begins(done)
    if tr.grad_mask is not None:
        tr.grad_mask.set_step(step)
    norms: dict = {}
    skipped_before = engine.skipped_steps
    tr.lr_used = engine.get_lr()[0]  # the scheduler moves on inside engine.step(): log the lr this step used
    for micro in range(tr.accum):
        batch = _to_device(tr.objective.batch(tr.sampler.batch(step, micro)), tr.device)
        out = engine(**batch)
        out.loss = tr.faults.loss(done, out.loss)
        engine.backward(out.loss)
        skip = False
        if micro == tr.accum - 1:  # the step's gradients are complete: engine.step() applies them
            if engine.zero_optimization_stage() == 0:
                norms = grad_norms(engine.module, tr.roles, tr.placement.ep_group) if log_now else {}
                skip = not ds_gradients.gradients_finite(engine)
            elif log_now:
                norms = zero_role_norms(engine, tr.roles)
            if log_now and tr.central_update is not None:
                tr.central_update.snapshot()
        with ds_gradients.skipped_step(engine) if skip else contextlib.nullcontext():
            engine.step()
        if micro == tr.accum - 1 and log_now and tr.central_update is not None:
            norms["central_update_norm"] = tr.central_update.norms()
        interval.add(out, cfg.trainer.micro_batch_size * tr.objective.raw_length)
    if engine.skipped_steps > skipped_before:  # DeepSpeed applied no update: non-finite gradients
        tr.skipped_total += 1
        tr.bad_in_a_row += 1
        if tr.bad_in_a_row >= cfg.trainer.max_bad_steps:
            raise NonFiniteLossError(
                f"{tr.bad_in_a_row} steps in a row (up to step {done}) had a non-finite loss or gradient, "
                f"trainer.max_bad_steps={cfg.trainer.max_bad_steps}: lower optim.lr or check the data; "
                f"the last good checkpoint in {tr.ckpt_dir} is intact"
            )
    else:
        tr.bad_in_a_row = 0
    return norms


def _log(tr: Training, done: int, interval: Interval, norms: dict, evaluate_now: bool, progress) -> None:
    """One metrics record: the interval's statistics, gradient norms, MFU, and validation when due."""
    # At ZeRO 0 the loop's own norms (a 0.0 one too); ZeRO 1/2 keep no p.grad: DeepSpeed's norm
    grad_norm = norms.pop("grad_norm") if "grad_norm" in norms else ds_gradients.global_grad_norm(tr.engine)
    rec = interval.record(done, tr.lr_used, grad_norm)
    rec.update(norms)
    rec["steps_skipped"] = tr.skipped_total
    if tr.cfg.moe.kind != "dense":  # how far apart the experts have moved (0 = still the upcycled copies)
        rec["expert_divergence"] = expert_divergence(tr.engine.module, tr.placement.ep_group)
    achieved = rec["tokens_per_s"] * tr.flops_per_token / tr.world  # model FLOP/s per rank
    tr.peak = raised_to_cover(tr.peak, achieved)
    rec["mfu"] = achieved / tr.peak.flops_per_s
    rec["mfu_peak_tflops"] = tr.peak.flops_per_s / 1e12
    rec["tokens_seen"] = done * tr.tokens_per_step
    if evaluate_now:
        tr.val_loss, tr.val_tokens = evaluate(tr.engine, tr.val, tr.objective)
        rec.update(val_loss=tr.val_loss, val_ppl=math.exp(min(tr.val_loss, 50.0)), val_tokens=tr.val_tokens)
    tr.logger.log(rec)
    tr.last = rec
    if progress is not None:
        shown = {"val_ppl": f"{rec['val_ppl']:.1f}"} if "val_ppl" in rec else {}
        progress.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", **shown)


def _save(tr: Training, step: int, t0: float) -> Path:
    """A checkpoint after `step` steps; its meta.json records the run's time so far, which a resumed run goes on
    counting from (steps redone after a crash count once)."""
    meta = {**tr.identity, "wall_s": tr.wall_before + time.perf_counter() - t0}
    return checkpoint.save(tr.engine, tr.ckpt_dir, step, meta, tr.cfg.trainer.keep_last, tr.faults)


def _finish(tr: Training, t0: float, train_s: float) -> dict:
    """Final evaluation if none ran, the last checkpoint, summary.json."""
    t, cfg = tr.cfg.trainer, tr.cfg
    if tr.val_loss is None:  # evaluate-only run, or a resumed run that had already finished
        tr.val_loss, tr.val_tokens = evaluate(tr.engine, tr.val, tr.objective)
    final_step = max(tr.start_step, t.max_steps)
    if t.max_steps > 0:
        _save(tr, final_step, t0)
    steps_run = max(t.max_steps - tr.start_step, 0)
    summary = {
        **tr.counts,
        "train_loss": tr.last.get("loss") if steps_run else None,  # the last logged interval's (console.py prints it)
        "val_loss": tr.val_loss,
        "val_ppl": math.exp(min(tr.val_loss, 50.0)),
        "val_tokens": tr.val_tokens,
        "tokens_seen": final_step * tr.tokens_per_step,
        "steps": final_step,
        "wall_s": tr.wall_before + time.perf_counter() - t0,  # all parts of the run, not only this one
        "tokens_per_s": steps_run * tr.tokens_per_step / train_s if steps_run else None,
        "model": cfg.model.name,
        "moe": cfg.moe.kind,
        "world_size": tr.world,
        "steps_skipped": tr.skipped_total,
        "mfu_peak_tflops": tr.peak.flops_per_s / 1e12,
        "mfu_peak_source": tr.peak.source,
    }
    if tr.task_data is not None:
        summary.update(
            score_task(tr.engine, tr.task_data, tr.objective, t.micro_batch_size, tr.logger.run_dir, tr.rank == 0)
        )
    tr.logger.summary(summary)
    tr.logger.close()
    return summary


@torch.no_grad()
def evaluate(engine, batches: list[tuple[torch.Tensor, int]], objective) -> tuple[float, int]:
    """(mean LM loss per target token, target tokens) over the whole validation set, all ranks together.

    The model's loss is a mean over a batch's target tokens; weighting it by that
    count makes the result independent of how the set is split into batches and ranks.
    """
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss x tokens, tokens
    for raw, counted in batches:
        batch = objective.batch(raw)
        tokens = objective.target_tokens(batch, counted)
        batch = _to_device(batch, engine.device)
        if tokens:
            loss = engine(**batch).lm_loss
            sums += torch.stack([loss.double() * tokens, loss.new_tensor(tokens, dtype=torch.float64)])
        else:
            engine(**batch)  # a filler batch: this rank's share ran out, but expert parallelism needs its forward
    engine.train()
    total, tokens = all_reduce(sums).tolist()
    return total / max(tokens, 1.0), int(tokens)


def _prepare_data(cfg: TrainConfig, rank: int) -> data_lib.TokenData:
    """Each node's first process reads the documents, tokenizes and caches; the others map its cache.

    Per node, not per world: the cache directory (~/.cache/mpoe by default) is usually a node's own disk,
    where rank 0's files are out of reach. Rank 0 then tells the others the key that names the cache files
    (they are the same on every node: same documents, same tokenizer), so that a node's other processes never
    hold the documents; they read them only if those files are missing there. On a shared cache directory each
    node's first process writes the same files at the same time (atomically), no slower than rank 0 alone."""
    data = cfg.data  # the config is read-only: a checkpoint's own tokenizer, when it ships one, goes into a copy
    if cfg.model.pretrained and not data.tokenizer:
        data = derive(data, tokenizer=data_lib.checkpoint_tokenizer_dir(cfg.model.pretrained))
    if data.name == "task":  # a task is small and read the same way everywhere: every process encodes it
        return prepare_task(derive(cfg, data=data))
    first_on_node = rank == 0 or int(os.environ.get("LOCAL_RANK", rank)) == 0
    token_data = data_lib.prepare(data) if first_on_node else None
    if not dist.is_initialized():
        return token_data
    # Over the host group, whose timeout allows for tokenizing a large corpus (the world's would abort the wait).
    host_barrier()  # every node's first process has written its cache
    key = [token_data.key if rank == 0 else None]
    host_broadcast(key)
    return token_data or data_lib.load_prepared(data, key[0]) or data_lib.prepare(data)


def _flops_reference(cfg: TrainConfig, model, counts: dict, seq_len: int, device: torch.device) -> tuple[float, Peak]:
    """Model FLOPs per token, and the peak FLOP/s of this device in the training dtype."""
    config = model.backbone.config
    family = families.get(model.family)
    per_token = flops_per_token(
        counts["params_active_compute"],
        counts["params_embedding"],
        config.vocab_size,
        family.ffn_shape(config).d_model,
        family.attention_layers(config),
        seq_len,
        counts["params_lm_head"],
    )
    return per_token, device_peak(cfg.trainer.precision, device)


def _grad_mask(cfg: TrainConfig, model):
    if not cfg.moe.grad_mask.enabled:
        return None
    gm = cfg.moe.grad_mask
    return GradientMask(select_masked_params(model, gm.target), gm.keep_prob, gm.rescale, cfg.trainer.seed)


def _progress(cfg: TrainConfig, rank: int, start: int):
    if rank != 0 or not cfg.logging.progress or cfg.trainer.max_steps <= start:
        return None
    return console.progress(cfg.trainer.max_steps, start)
