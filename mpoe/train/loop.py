"""The training run: data, model, DeepSpeed engine, the step loop, evaluation, checkpoints.

Every rank runs this function in lockstep (expert-parallel all-to-alls and
DeepSpeed's reductions are collectives); only rank 0 writes the run directory
files and shows the progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mpoe.config import TrainConfig, global_batch_size, grad_accum_steps
from mpoe.models.accounting import count_params, format_table
from mpoe.models.build import build_model, moe_layers
from mpoe.parallel import engine as ds_engine
from mpoe.parallel.groups import expert_groups, rank_world
from mpoe.train import checkpoint, faults, interrupt
from mpoe.train import data as data_lib
from mpoe.train.flops import flops_per_token, gemm_flops_per_s
from mpoe.train.grad_norms import grad_norms, role_params
from mpoe.train.metrics import MetricsLogger
from mpoe.train.objectives import build_objective

log = logging.getLogger("mpoe.train")


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _prepare_data(cfg: TrainConfig, rank: int) -> data_lib.TokenData:
    """Rank 0 builds the tokenizer and token caches first; the others then read them."""
    if cfg.model.pretrained and not cfg.data.tokenizer:  # a checkpoint's own tokenizer, when it ships one
        cfg.data.tokenizer = data_lib.checkpoint_tokenizer_dir(cfg.model.pretrained)
    if rank == 0:
        token_data = data_lib.prepare(cfg.data)
    if dist.is_initialized():
        dist.barrier()
    return token_data if rank == 0 else data_lib.prepare(cfg.data)


def _embedding_params(model) -> int:
    backbone = model.backbone
    if model.family == "gpt2":
        from mpoe.models.gpt2 import embedding_params
    else:
        from mpoe.models.t5 import embedding_params
    return embedding_params(backbone)


@torch.no_grad()
def evaluate(engine, batches: list[torch.Tensor], objective) -> float:
    """Mean LM loss over the validation batches of every rank."""
    engine.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += engine(**objective.batch(batch)).lm_loss.item()
        count += 1
    engine.train()
    total, count = _all_reduce_sum([total, count])
    return total / max(count, 1)


class _Interval:
    """Sums over the steps between two log lines."""

    def __init__(self):
        self.start = time.perf_counter()
        self.loss = self.lm_loss = self.aux_loss = self.z_loss = 0.0
        self.micro = 0
        self.tokens = 0
        self.tokens_dropped = 0
        self.load: Optional[list[torch.Tensor]] = None
        self.entropy: Optional[list[float]] = None

    def add(self, out, tokens: int) -> None:
        self.loss += out.loss.item()
        self.lm_loss += out.lm_loss.item()
        self.aux_loss += out.aux_loss.item()
        self.z_loss += out.z_loss.item()
        self.micro += 1
        self.tokens += tokens
        self.tokens_dropped += out.tokens_dropped
        if out.tokens_per_expert:
            counts = [c.detach().double() for c in out.tokens_per_expert]
            self.load = counts if self.load is None else [a + b for a, b in zip(self.load, counts)]
            self.entropy = (
                out.router_entropy
                if self.entropy is None
                else [a + b for a, b in zip(self.entropy, out.router_entropy)]
            )

    def record(self, step: int, lr: float, grad_norm: float) -> dict:
        sums = _all_reduce_sum(
            [self.loss, self.lm_loss, self.aux_loss, self.z_loss, self.micro, self.tokens, self.tokens_dropped]
        )
        loss, lm_loss, aux, z, micro, tokens, dropped = sums
        elapsed = time.perf_counter() - self.start
        rec = {
            "step": step,
            "loss": loss / micro,
            "lm_loss": lm_loss / micro,
            "aux_loss": aux / micro,
            "z_loss": z / micro,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "tokens_dropped": int(dropped),
        }
        if self.load is not None:
            rec["expert_load"] = [(c / c.sum().clamp_min(1)).tolist() for c in self.load]
            rec["load_imbalance"] = [float(c.max() / c.mean().clamp_min(1e-9)) for c in self.load]
            entropy = _all_reduce_sum(self.entropy)
            rec["router_entropy"] = [e / micro for e in entropy]
        return rec


def run(cfg: TrainConfig, run_dir: Path, run_config: Optional[dict] = None) -> dict:
    rank, world = rank_world()
    t0 = time.perf_counter()
    groups = expert_groups(cfg.parallel.ep_size)
    if cfg.trainer.dry_run:
        token_data = None
        vocab, eot, pad = cfg.model.vocab_size, 0, 1
    else:
        token_data = _prepare_data(cfg, rank)
        vocab, eot, pad = token_data.vocab_size, token_data.eot_id, token_data.pad_id
    model = build_model(cfg, vocab, eot, pad, groups)
    counts = count_params(model, _embedding_params(model), cfg.moe.top_k, cfg.parallel.ep_size)
    logger = MetricsLogger(run_dir, rank == 0, None if cfg.trainer.dry_run else cfg.logging.wandb, run_config)
    if rank == 0:  # through logging: Hydra writes it to the console and main.log
        log.info(
            f"model {cfg.model.name} with moe={cfg.moe.kind} ({len(moe_layers(model))} MoE layers), "
            f"{world} process(es):\n{format_table(counts)}"
        )
    if cfg.trainer.dry_run:
        logger.summary({**counts, "dry_run": True})
        logger.close()
        return counts

    engine = ds_engine.initialize(model, cfg, world)
    grad_mask = _grad_mask(cfg, model)
    t = cfg.trainer
    objective = build_objective(cfg, token_data)
    raw_len = objective.raw_length
    accum = grad_accum_steps(cfg, world)
    sampler = data_lib.SequenceSampler(
        data_lib.pack(token_data.train, raw_len), t.micro_batch_size, accum, world, rank, t.seed
    )
    val = data_lib.eval_batches(data_lib.pack(token_data.val, raw_len), t.micro_batch_size, t.eval_batches, world, rank)

    ckpt_dir = run_dir / "checkpoints"
    identity = {
        "world_size": world,
        "ep_size": cfg.parallel.ep_size,
        "zero_stage": cfg.parallel.zero_stage,
        "model": cfg.model.name,
        "moe": cfg.moe.kind,
        "num_experts": cfg.moe.num_experts,
    }
    start_step = 0
    resume_from = checkpoint.resolve(t.resume, ckpt_dir)
    if resume_from is not None:
        layout_keys = ("world_size", "ep_size", "zero_stage")
        meta = checkpoint.load(
            engine,
            resume_from,
            {k: identity[k] for k in layout_keys},
            {k: v for k, v in identity.items() if k not in layout_keys},
            groups,
            cfg.moe.num_experts,
        )
        start_step = meta["step"]
        if rank == 0:
            log.info(f"resumed from {resume_from} at step {start_step}")

    tokens_per_step = global_batch_size(cfg, world) * raw_len
    flops_per_token, gemm_rate = _flops_reference(cfg, model, counts, raw_len)
    progress = _progress(cfg, rank, start_step)
    interval = _Interval()
    roles = role_params(model)
    val_loss = None
    train_start = time.perf_counter()
    skipped_total, bad_in_a_row = 0, 0
    for step in range(start_step, t.max_steps):
        if interrupt.stop_agreed():  # SIGINT/SIGTERM on any rank: stop before this step (interrupt.py)
            break
        faults.maybe_kill_at_step(step + 1)
        if grad_mask is not None:
            grad_mask.set_step(step)
        done = step + 1
        evaluate_now = done % t.eval_every == 0 or done == t.max_steps
        log_now = done % t.log_every == 0 or evaluate_now
        norms = {}
        for micro in range(accum):
            out = engine(**objective.batch(sampler.batch(step, micro)))
            if faults.nan_at(done):
                out.loss = out.loss * float("nan")
            engine.backward(out.loss)
            if micro == accum - 1 and cfg.parallel.zero_stage == 0:
                norms = grad_norms(engine.module, roles, groups.ep_group) if log_now else {}
                skip = not _gradients_finite(engine)
            else:
                skip = False
            skipped_before = engine.skipped_steps
            with _skipped_step(engine.optimizer) if skip else contextlib.nullcontext():
                engine.step()
            interval.add(out, t.micro_batch_size * raw_len)
        if engine.skipped_steps > skipped_before:  # DeepSpeed applied no update: non-finite gradients
            skipped_total += 1
            bad_in_a_row += 1
            if bad_in_a_row >= t.max_bad_steps:
                raise NonFiniteLossError(
                    f"{bad_in_a_row} steps in a row (up to step {done}) had a non-finite loss or gradient, "
                    f"trainer.max_bad_steps={t.max_bad_steps}: lower optim.lr or check the data; "
                    f"the last good checkpoint in {ckpt_dir} is intact"
                )
        else:
            bad_in_a_row = 0
        if log_now:
            rec = interval.record(
                done, engine.get_lr()[0], norms.pop("grad_norm", None) or ds_engine.global_grad_norm(engine)
            )
            rec.update(norms)
            rec["steps_skipped"] = skipped_total
            rec["mfu"] = rec["tokens_per_s"] * flops_per_token / (gemm_rate * world)
            rec["tokens_seen"] = done * tokens_per_step
            if evaluate_now:
                val_loss = evaluate(engine, val, objective)
                rec.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            logger.log(rec)
            if progress is not None:
                progress.set_postfix(
                    loss=f"{rec['loss']:.3f}",
                    tok_s=f"{rec['tokens_per_s']:.0f}",
                    **({"val_ppl": f"{rec['val_ppl']:.1f}"} if "val_ppl" in rec else {}),
                )
            interval = _Interval()
        if progress is not None:
            progress.update(1)
        if t.save_every and done % t.save_every == 0 and done != t.max_steps:
            checkpoint.save(engine, ckpt_dir, done, identity, t.keep_last)
    if progress is not None:
        progress.close()
    if interrupt.stopped():  # checkpoint the `step` steps done; main.py says where it is and how to resume
        logger.close()
        saved = checkpoint.save(engine, ckpt_dir, step, identity, t.keep_last) if step > start_step else resume_from
        raise interrupt.Interrupted(interrupt.requested(), step, t.max_steps, saved)
    train_s = time.perf_counter() - train_start

    if val_loss is None:  # evaluate-only run, or a resumed run that had already finished
        val_loss = evaluate(engine, val, objective)
    final_step = max(start_step, t.max_steps)
    if t.max_steps > 0:
        checkpoint.save(engine, ckpt_dir, final_step, identity, t.keep_last)
    steps_run = max(t.max_steps - start_step, 0)
    summary = {
        **counts,
        "train_loss": rec["loss"] if steps_run else None,  # the last logged interval's (console.py prints it)
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "tokens_seen": final_step * tokens_per_step,
        "steps": final_step,
        "wall_s": time.perf_counter() - t0,
        "tokens_per_s": steps_run * tokens_per_step / train_s if steps_run else None,
        "model": cfg.model.name,
        "moe": cfg.moe.kind,
        "world_size": world,
        "steps_skipped": skipped_total,
    }
    logger.summary(summary)
    logger.close()
    return summary


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the message is one line."""


def _gradients_finite(engine) -> bool:
    """At ZeRO 0, after the reduction: are all gradients finite on every rank?"""
    sq = sum(float(p.grad.double().pow(2).sum()) for p in engine.module.parameters() if p.grad is not None)
    return math.isfinite(_all_reduce_sum([sq])[0])  # any rank's NaN reaches all ranks


@contextlib.contextmanager
def _skipped_step(optimizer):
    """ZeRO 0: let DeepSpeed run `engine.step()` as a skipped step, as it does for an fp16 overflow.

    The engine, seeing `optimizer.overflow`, neither steps the LR schedule nor counts the
    step as applied (it increments `skipped_steps`), as ZeRO 1/2 do by themselves; the
    gradients are zeroed (so clipping sees finite numbers) and the optimizer's own step,
    which would still move the weights through momentum and weight decay, is not run.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.zero_()
    optimizer.overflow = True
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step
        optimizer.overflow = False


def _flops_reference(cfg: TrainConfig, model, counts: dict, seq_len: int) -> tuple[float, float]:
    """Model FLOPs per token and this device's measured GEMM rate in the training dtype."""
    config = model.backbone.config
    d_model = getattr(config, "n_embd", None) or config.d_model
    layers = getattr(config, "n_layer", None) or (config.num_layers + config.num_decoder_layers)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.trainer.precision]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        dtype = torch.float32
    per_token = flops_per_token(
        counts["params_active"], counts["params_embedding"], config.vocab_size, d_model, layers, seq_len
    )
    return per_token, gemm_flops_per_s(dtype=dtype, device=device)


def _grad_mask(cfg: TrainConfig, model):
    if not cfg.moe.grad_mask.enabled:
        return None
    from mpoe.models.grad_mask import GradientMask, select_masked_params

    gm = cfg.moe.grad_mask
    return GradientMask(select_masked_params(model, gm.target), gm.keep_prob, gm.rescale, cfg.trainer.seed)


def _progress(cfg: TrainConfig, rank: int, start: int):
    if rank != 0 or not cfg.logging.progress or cfg.trainer.max_steps <= start:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
