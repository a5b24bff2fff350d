"""The MPOE authors' two knobs (issue 29): `moe.gate_scale=straight_through` and `optim.central_lr_scale`.

Truths: a hand-derived router gradient (d(p / stop_gradient(p)) / d logits = onehot - softmax), the per-expert
bank applied to each expert's own rows, the warmup + cosine formula written out here, the optimizer's
parameter sets as they were before the key existed, and the losses of a run killed and resumed against the
uninterrupted run's.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _cli import metrics, train

from mpoe.config import (
    ConfigError,
    GradMaskConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
    derive,
)
from mpoe.models.build import build_model, moe_layers
from mpoe.models.experts import DenseFFN
from mpoe.models.moe_builder import build_moe_layer
from mpoe.parallel.deepspeed import engine as ds_engine
from mpoe.parallel.deepspeed.accelerator import accelerator_name
from mpoe.parallel.expert_placement import ExpertPlacement, expert_placement
from mpoe.parallel.process_groups import init_distributed
from mpoe.train import loop
from mpoe.train.data.objectives import CausalLM
from mpoe.train.data.sequences import SequenceSampler
from mpoe.train.metrics.grad_norms import role_params
from mpoe.train.metrics.writer import Interval

D_MODEL, D_FF, E, TOKENS, CLASSES = 8, 16, 4, 24, 5


# --- moe.gate_scale ------------------------------------------------------------------------------------------------


def _identical_experts_layer(kind: str, top_k: int, gate_scale: str):
    """An MoE layer whose experts all start as one dense FFN (upcycled), router losses off: only the task's loss
    reaches the router. Returns (layer, the dense FFN)."""
    cfg = MoEConfig(
        kind=kind,
        num_experts=E,
        top_k=top_k,
        gate_scale=gate_scale,
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
        router_init_std=0.5,  # a router far from uniform: each token's choice is clear
        expert_impl="loop",
    )
    dense = DenseFFN.random(D_MODEL, D_FF, std=0.3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    return build_moe_layer(cfg, D_MODEL, D_FF, "gelu_new", ExpertPlacement(), dense=dense), dense


def _inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(TOKENS, D_MODEL, generator=g)
    head = torch.randn(D_MODEL, CLASSES, generator=g)
    labels = torch.randint(0, CLASSES, (TOKENS,), generator=g)
    return x, head, labels


def _lm_loss(out, head, labels):
    """Cross-entropy of a linear head over the layer's output: an LM-style loss and nothing else."""
    return F.cross_entropy(out @ head, labels)


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_straight_through_top1_gives_the_router_the_hand_derived_gradient_at_step_0(kind):
    layer, dense = _identical_experts_layer(kind, 1, "straight_through")
    x, head, labels = _inputs()
    _lm_loss(layer(x), head, labels).backward()
    got = layer.router.gate.weight.grad

    # By hand, in float64: the output is the dense FFN's y (gate 1); the loss's gradient g = dL/dy; the gate
    # p_c / stop_gradient(p_c) of the chosen expert c has d/dlogits = onehot(c) - softmax(logits).
    x64, head64 = x.double(), head.double()
    y = _dense64(dense)(x64, "gelu_new")
    y.requires_grad_(True)
    _lm_loss(y, head64, labels).backward()
    s = (y.grad * y.detach()).sum(-1)  # dL/d(gate) per token
    logits = x64 @ layer.router.gate.weight.detach().double().t()
    p = logits.softmax(-1)
    onehot = F.one_hot(logits.argmax(-1), E).double()
    want = ((onehot - p) * s[:, None]).t() @ x64
    assert want.norm() > 1e-2  # a real gradient, not a vanishing one
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def _dense64(dense: DenseFFN) -> DenseFFN:
    return DenseFFN(*(None if t is None else t.double() for t in (dense.w_in, dense.b_in, dense.w_out, dense.b_out)))


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_normalised_top2_over_identical_experts_gives_the_router_no_gradient(kind):
    layer, _ = _identical_experts_layer(kind, 2, "prob")
    x, head, labels = _inputs()
    _lm_loss(layer(x), head, labels).backward()
    reference, _ = _identical_experts_layer(kind, 1, "straight_through")
    _lm_loss(reference(x), head, labels).backward()
    # The gate weights add up to 1 over two equal outputs: the output does not depend on them.
    assert layer.router.gate.weight.grad.norm() < 1e-5 * reference.router.gate.weight.grad.norm()


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_straight_through_forward_is_the_chosen_experts_output_exactly(kind):
    layer, dense = _identical_experts_layer(kind, 1, "straight_through")
    x, _, _ = _inputs()
    with torch.no_grad():
        out = layer(x)
        routed = layer.router(x)
        assert torch.equal(routed.probs, routed.routing_map.float())  # gate exactly 1 where kept, 0 elsewhere
        # The experts on the tokens sorted by chosen expert (the layout the dispatcher hands them), no gate applied.
        chosen = routed.routing_map.float().argmax(-1)
        order = torch.argsort(chosen, stable=True)
        expert_out = layer.bank(x[order], [int((chosen == e).sum()) for e in range(E)])
        assert torch.equal(out[order], expert_out)
        torch.testing.assert_close(out, dense(x, "gelu_new"), rtol=1e-4, atol=1e-5)


def test_prob_gate_is_the_routers_probability():
    """gate_scale=prob: the output is the expert's times p (top-1, softmax over all experts), as before."""
    layer, dense = _identical_experts_layer("switch", 1, "prob")
    x, _, _ = _inputs()
    with torch.no_grad():
        p = (x @ layer.router.gate.weight.t()).softmax(-1).max(-1).values
        torch.testing.assert_close(layer(x), p[:, None] * dense(x, "gelu_new"), rtol=1e-4, atol=1e-6)


# --- optim.central_lr_scale: in-process engines ---------------------------------------------------------------------

SEQ, BATCH, VOCAB = 16, 2, 64


def _cfg(scale: float, precision: str = "fp32", zero: int = 0, warmup: int = 3, steps: int = 8) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            d_model=32, d_ff=64, num_layers=2, num_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ
        ),
        moe=MoEConfig(kind="mpoe", num_experts=4, top_k=1, every=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=warmup, central_lr_scale=scale),
        parallel=ParallelConfig(zero_stage=zero),
        trainer=TrainerConfig(
            max_steps=steps, micro_batch_size=BATCH, global_batch_size=BATCH, seq_len=SEQ, precision=precision
        ),
    )


def _build(cfg: TrainConfig, param_sets=None) -> loop.Training:
    """What `loop._setup` builds, on random tokens, in a world of one (conftest ends it after the test).
    `param_sets(model)`: build the engine from these optimizer sets instead of `ds_engine.initialize`."""
    if not dist.is_initialized():
        init_distributed("gloo")
    placement = expert_placement(1)
    model = build_model(cfg, VOCAB, 0, 0, placement)
    if param_sets is None:
        engine = ds_engine.initialize(model, cfg, 1)
    else:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_sets(model),
            config=ds_engine.deepspeed_config(cfg, 1, accelerator_name()),
            dist_init_required=False,
        )
        ds_engine.start_schedule(engine)
    tokens = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(0))
    return loop.Training(
        cfg=cfg,
        engine=engine,
        objective=CausalLM(SEQ),
        sampler=SequenceSampler(tokens, BATCH, 1, 1, 0, 0),
        val=[],
        logger=None,
        placement=placement,
        grad_mask=None,
        roles=role_params(model),
        accum=1,
        world=1,
        rank=0,
        ckpt_dir=None,
        identity={},
        start_step=0,
        resumed_from=None,
        tokens_per_step=BATCH * SEQ,
        flops_per_token=1.0,
        peak=None,
        counts={},
    )


def _step(tr: loop.Training, step: int, log_now: bool = False) -> tuple[float, dict]:
    interval = Interval(tr.device)
    norms = loop._train_step(tr, step, interval, log_now)
    return interval.record(step + 1, tr.lr_used, 0.0)["loss"], norms


def _central(tr: loop.Training) -> list[torch.Tensor]:
    return [p for layer in moe_layers(tr.engine.module) for p in layer.bank.param_roles().central]


def _auxiliary(tr: loop.Training) -> list[torch.Tensor]:
    return [p for layer in moe_layers(tr.engine.module) for p in layer.bank.param_roles().auxiliary]


def _clone(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    ("precision", "zero", "impl"), [("fp32", 0, "loop"), ("bf16", 1, "loop"), ("fp32", 0, "grouped_recompute")]
)
def test_scale_zero_freezes_the_central_tensors_with_no_optimizer_state(precision, zero, impl):
    cfg = _cfg(0.0, precision, zero)
    if impl == "grouped_recompute":  # the GPU's backend, rebuilding each expert's W in backward from frozen tensors
        cfg = derive(cfg, moe=derive(cfg.moe, expert_impl="grouped", recompute_mpo_weights=True))
    tr = _build(cfg)
    central, auxiliary = _central(tr), _auxiliary(tr)
    assert central and auxiliary
    central0, auxiliary0 = _clone(central), _clone(auxiliary)
    norms = [_step(tr, step, log_now=True)[1] for step in range(3)]

    assert all(torch.equal(p, q) for p, q in zip(central, central0))  # bit for bit
    assert all(not torch.equal(p, q) for p, q in zip(auxiliary, auxiliary0))  # the rest trains
    assert all(not p.requires_grad and p.grad is None for p in central)
    frozen = {id(p) for p in central}
    assert all(id(p) not in frozen for s in tr.engine.optimizer.param_groups for p in s["params"])
    assert "central" not in {s.get("name") for s in tr.engine.optimizer.param_groups}
    if zero == 0:  # torch's AdamW keys its state by the module's parameters
        assert all(id(p) not in frozen for p in tr.engine.optimizer.state)
        assert all(p in tr.engine.optimizer.state for p in auxiliary)
    else:  # ZeRO links each parameter it holds state for to its partition
        assert all(getattr(p, "_hp_mapping", None) is None for p in central)
        assert all(getattr(p, "_hp_mapping", None) is not None for p in auxiliary)
    # The gradient norms per role are still logged: the frozen role's is 0, the others' are not.
    assert [n["grad_norm_central"] for n in norms] == [0.0, 0.0, 0.0]
    assert all(n["grad_norm_auxiliary"] > 0 and n["grad_norm_router"] > 0 for n in norms)


def _schedule_ratio(iteration: int, warmup: int, total: int, min_ratio: float) -> float:
    """DeepSpeed's WarmupCosineLR with linear warmup from 0, written out (it warms up over at least 2 steps)."""
    warmup = max(2, warmup)
    if iteration < warmup:
        return iteration / warmup
    progress = min(1.0, (iteration - warmup + 1) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize(("precision", "zero"), [("fp32", 0), ("bf16", 1)])
def test_central_sets_run_at_scale_times_the_others_lr_through_warmup_and_cosine(precision, zero):
    scale, cfg = 0.25, _cfg(0.25, precision, zero, warmup=3, steps=8)
    tr = _build(cfg)
    sets = tr.engine.optimizer.param_groups
    names = [s.get("name") for s in sets]
    assert "central" in names and "decay" in names
    central = {id(p) for p in _central(tr)}
    central_sets = [s for s in sets if s.get("name", "").startswith("central")]
    others = [s for s in sets if not s.get("name", "").startswith("central")]
    if zero == 0:  # the central set holds exactly the central tensors
        assert {id(p) for s in central_sets for p in s["params"]} == central
        assert all(id(p) not in central for s in others for p in s["params"])
    central0 = _clone(_central(tr))
    for step in range(cfg.trainer.max_steps):
        want = cfg.optim.lr * _schedule_ratio(step, 3, 8, cfg.optim.min_lr_ratio)  # the lr update `step` applies
        for s in others:
            assert s["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), (step, s.get("name"))
        for s in central_sets:
            assert s["lr"] == pytest.approx(scale * want, rel=1e-12, abs=1e-18), step
        _step(tr, step)
    assert all(not torch.equal(p, q) for p, q in zip(_central(tr), central0))  # trained, at its own rate


def _sets_before_the_key(model) -> list[dict]:
    """The optimizer's parameter sets before optim.central_lr_scale existed: decay matrices, not 1-d tensors."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    sets = [{"params": decay, "weight_decay": 0.01, "name": "decay"}]
    return sets + ([{"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}] if no_decay else [])


def test_scale_one_keeps_the_sets_and_the_training_of_before():
    cfg = _cfg(1.0, steps=4)
    new = _build(cfg)
    old_sets = _sets_before_the_key(new.engine.module)
    got = ds_engine.optimizer_param_sets(new.engine.module, cfg.optim)
    assert [(s["name"], s["weight_decay"], set(s) - {"params"}) for s in got] == [
        (s["name"], s["weight_decay"], set(s) - {"params"}) for s in old_sets
    ]
    assert [[id(p) for p in s["params"]] for s in got] == [[id(p) for p in s["params"]] for s in old_sets]
    new_losses = [_step(new, step)[0] for step in range(4)]
    dist.destroy_process_group()
    old = _build(cfg, param_sets=_sets_before_the_key)
    assert [_step(old, step)[0] for step in range(4)] == new_losses
    assert all(torch.equal(p, q) for p, q in zip(new.engine.module.parameters(), old.engine.module.parameters()))


def test_a_grad_mask_on_frozen_central_tensors_is_refused_in_one_line():
    for target in ("central", "all"):
        with pytest.raises(ConfigError, match=r"^moe\.grad_mask\.target=.*optim\.central_lr_scale=0") as e:
            TrainConfig(
                moe=MoEConfig(grad_mask=GradMaskConfig(enabled=True, target=target)),
                optim=OptimConfig(central_lr_scale=0.0),
            )
        assert "\n" not in str(e.value)
    TrainConfig(
        moe=MoEConfig(grad_mask=GradMaskConfig(enabled=True, target="auxiliary")),
        optim=OptimConfig(central_lr_scale=0.0),
    )


# --- optim.central_lr_scale: real runs, killed and resumed -----------------------------------------------------------

RESUMED = ["moe=mpoe", "trainer.max_steps=6", "trainer.save_every=1", "trainer.keep_last=6", "trainer.eval_every=6"]


def _by_step(rows):
    return {r["step"]: r for r in rows if "loss" in r}  # a resumed run appends; the last row of a step wins


def _module_state(run, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:08d}" / "rank_00000.pt", weights_only=False)["module"]


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["0.1", "0"])
def test_a_killed_run_resumes_the_exact_losses(tmp_path, mpoe_cache, scale):
    overrides = [*RESUMED, f"optim.central_lr_scale={scale}"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(whole, mpoe_cache, *overrides)
    os.environ["MPOE_FAULT_KILL_AT_STEP"] = "5"
    try:
        assert train(resumed, mpoe_cache, *overrides, check=False).returncode != 0
    finally:
        os.environ.pop("MPOE_FAULT_KILL_AT_STEP")
    train(resumed, mpoe_cache, *overrides, "trainer.resume=auto")
    a, b = _by_step(metrics(whole)), _by_step(metrics(resumed))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert (b[step]["loss"], b[step]["lr"]) == (a[step]["loss"], a[step]["lr"]), step

    if scale == "0":  # the run trained everything but the central tensors, whose gradient norm it logs as 0
        # Update 1 runs at lr 0 (the warmup starts there: `ds_engine.start_schedule`), so checkpoint 1 holds the
        # initial (upcycled) weights.
        first, last = _module_state(whole, 1), _module_state(whole, 6)
        central = [k for k in first if ".central." in k]
        auxiliary = [k for k in first if ".auxiliary." in k]
        assert central and auxiliary
        assert all(torch.equal(first[k], last[k]) for k in central)
        assert all(not torch.equal(first[k], last[k]) for k in auxiliary)
        assert all(a[step]["grad_norm_central"] == 0.0 < a[step]["grad_norm_auxiliary"] for step in a)
