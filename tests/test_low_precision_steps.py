"""bf16 and fp16 optimizer steps, through the training loop's `_train_step` and a real DeepSpeed engine.

bf16/fp16 run DeepSpeed's ZeRO (>= 1) optimizer whatever `parallel.zero_stage` says
(`engine.zero_stage` says why). DeepSpeed's CPU accelerator refuses fp16 without oneDNN
fp16 kernels, yet its fp16 path is plain torch: the tests here let the accelerator accept
fp16 so that the engine mpoe trains with on a GPU is built and stepped on the CPU. The
truths are independent of the code under test: the optimizer's own step counter, master
weights and loss scale, and autograd's gradients of the same half-precision model.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from _cli import metrics, train
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.loss_scaler import DELAYED_SHIFT
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import safe_get_full_fp32_param

from mpoe.config import (
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
    grad_accum_steps,
)
from mpoe.models.build import build_model
from mpoe.parallel.deepspeed import engine as ds_engine
from mpoe.parallel.deepspeed import gradients as ds_gradients
from mpoe.parallel.deepspeed.optimizer_state import adam_view
from mpoe.parallel.expert_placement import expert_placement
from mpoe.parallel.local_world import spawn_world
from mpoe.parallel.process_groups import init_distributed
from mpoe.train import loop
from mpoe.train.data.objectives import CausalLM
from mpoe.train.data.sequences import SequenceSampler
from mpoe.train.metrics.grad_norms import role_params
from mpoe.train.metrics.writer import Interval
from mpoe.train.runtime import faults

SEQ, BATCH, VOCAB = 16, 2, 64


def _cfg(
    precision: str,
    zero: int = 0,
    grad_clip: float = 1.0,
    max_bad_steps: int = 10,
    accum: int = 1,
    world: int = 1,
    ep: int = 1,
) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            d_model=32, d_ff=64, num_layers=2, num_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ
        ),
        moe=MoEConfig(kind="mpoe", num_experts=4, top_k=1, every=2),
        optim=OptimConfig(warmup_steps=1, grad_clip=grad_clip),
        parallel=ParallelConfig(zero_stage=zero, ep_size=ep),
        trainer=TrainerConfig(
            max_steps=100,
            micro_batch_size=BATCH,
            global_batch_size=BATCH * accum * world,
            seq_len=SEQ,
            precision=precision,
            max_bad_steps=max_bad_steps,
        ),
    )


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Let DeepSpeed's CPU accelerator take fp16 (it asks oneDNN for AVX512-FP16 kernels it does not use here)."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        monkeypatch.setattr(type(accelerator), "is_fp16_supported", lambda self: True)


def _build(cfg: TrainConfig, world: int = 1, rank: int = 0) -> loop.Training:
    """What `loop._setup` builds, on random tokens: the model, the DeepSpeed engine, the sampler. With world > 1
    the process group must exist; otherwise this starts a world of one (conftest tears it down after the test)."""
    if world == 1:
        init_distributed("gloo")
    placement = expert_placement(cfg.parallel.ep_size)
    model = build_model(cfg, VOCAB, 0, 0, placement)
    engine = ds_engine.initialize(model, cfg, world)
    tokens = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(0))
    accum = grad_accum_steps(cfg, world)
    return loop.Training(
        cfg=cfg,
        engine=engine,
        objective=CausalLM(SEQ),
        sampler=SequenceSampler(tokens, BATCH, accum, world, rank, 0),
        val=[],
        logger=None,
        placement=placement,
        grad_mask=None,
        roles=role_params(model),
        accum=accum,
        world=world,
        rank=rank,
        ckpt_dir=None,
        identity={},
        start_step=0,
        resumed_from=None,
        tokens_per_step=BATCH * accum * world * SEQ,
        flops_per_token=1.0,
        peak=None,
        counts={},
    )


def _step(tr: loop.Training, step: int, log_now: bool = False) -> dict:
    tr.faults = faults.from_environment(tr.rank)  # as `loop._setup` does; the tests set MPOE_FAULT_* between steps
    return loop._train_step(tr, step, Interval(tr.device), log_now)


def _adam_steps(tr: loop.Training) -> int:
    """How many times torch AdamW itself stepped (its `step` count): a skipped step leaves it alone."""
    opt = tr.engine.optimizer
    opt = opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer  # ZeRO wraps AdamW
    return max((int(s["step"]) for s in opt.state.values()), default=0)


def _weights(tr: loop.Training) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tr.engine.module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _no_own_check(monkeypatch):
    """Where DeepSpeed checks for overflow itself, the loop must not check (nor replace its step)."""

    def refuse(engine):
        raise AssertionError("the loop checked the gradients itself where DeepSpeed's optimizer does")

    monkeypatch.setattr(ds_gradients, "gradients_finite", refuse)


def test_low_precision_runs_deepspeeds_zero_optimizer_from_a_clean_start(fp16_on_cpu):
    """bf16/fp16 at parallel.zero_stage=0 run ZeRO 1: no AdamW step before the first update (DeepSpeed's
    ZeRO-0 fp16/bf16 wrapper takes one with zero gradients when built), master weights equal the model's."""
    expected = {("fp32", 0): 0, ("bf16", 0): 1, ("fp16", 0): 1, ("bf16", 2): 2, ("fp32", 1): 1}
    for (precision, zero), stage in expected.items():
        cfg = _cfg(precision, zero)
        assert ds_engine.zero_stage(cfg) == stage, (precision, zero)
        tr = _build(cfg)
        assert tr.engine.zero_optimization_stage() == stage
        if precision != "fp32":
            # bf16 ZeRO 1 with float32 gradient accumulation is DeepSpeed's BF16_Optimizer
            wrapper = BF16_Optimizer if (precision, stage) == ("bf16", 1) else DeepSpeedZeroOptimizer
            assert isinstance(tr.engine.optimizer, wrapper)
            assert _adam_steps(tr) == 0, "AdamW stepped before the first update"
            for p in tr.engine.module.parameters():
                assert torch.equal(safe_get_full_fp32_param(p), p.float())
            _step(tr, 0)
            assert _adam_steps(tr) == 1
        dist.destroy_process_group()


def _hysteresis(tr: loop.Training) -> int:
    """Overflows in a row before DeepSpeed's dynamic loss scaler halves the scale (fp16.hysteresis, default 2)."""
    return tr.engine.dynamic_loss_scale_args()[DELAYED_SHIFT]


def test_fp16_overflows_lower_the_loss_scale_then_the_next_step_applies(fp16_on_cpu, monkeypatch):
    tr = _build(_cfg("fp16"))
    _no_own_check(monkeypatch)
    opt = tr.engine.optimizer
    scale, overflows = opt.loss_scale, _hysteresis(tr)
    assert scale == 2.0**16  # DeepSpeed's initial dynamic loss scale (fp16.initial_scale_power 16)
    _step(tr, 0)
    assert (tr.skipped_total, _adam_steps(tr), opt.loss_scale) == (0, 1, scale)

    nan_steps = range(2, 2 + overflows)  # loop's 1-based step numbers
    monkeypatch.setenv("MPOE_FAULT_NAN_AT_STEPS", ",".join(map(str, nan_steps)))
    before = _weights(tr)
    for step in nan_steps:
        _step(tr, step - 1)
    assert opt.loss_scale == scale / 2, "DeepSpeed's own overflow handling must run: it lowers the scale"
    assert (tr.skipped_total, tr.bad_in_a_row, tr.engine.skipped_steps) == (overflows,) * 3  # counted as skipped
    assert _adam_steps(tr) == 1 and _same(before, _weights(tr))  # and nothing was applied

    _step(tr, nan_steps[-1])
    assert (tr.skipped_total, tr.bad_in_a_row, tr.engine.skipped_steps) == (overflows, 0, overflows)
    assert _adam_steps(tr) == 2 and not _same(before, _weights(tr))
    assert opt.loss_scale == scale / 2


def test_fp16_scale_too_large_for_half_precision_comes_down_until_steps_apply(fp16_on_cpu, monkeypatch):
    """A real overflow, no NaN injected: the scaled gradients exceed fp16's range until DeepSpeed has lowered the
    scale enough. This needs the loss scaled in backward and DeepSpeed's step in charge (which lowers the scale)."""
    tr = _build(_cfg("fp16", max_bad_steps=30))
    _no_own_check(monkeypatch)
    opt = tr.engine.optimizer
    opt.loss_scale = 2.0**40  # any gradient component above 2**-24 overflows fp16 (max 65504) when scaled by it
    step = 0
    while _adam_steps(tr) == 0:
        _step(tr, step)
        step += 1
    assert tr.skipped_total == step - 1 >= 10  # each overflow was skipped and counted
    assert opt.loss_scale == 2.0 ** (40 - (tr.skipped_total - _hysteresis(tr) + 1))  # and halved the scale


def test_fp16_non_finite_steps_in_a_row_stop_the_run(fp16_on_cpu, monkeypatch):
    tr = _build(_cfg("fp16", max_bad_steps=3))
    _no_own_check(monkeypatch)
    monkeypatch.setenv("MPOE_FAULT_NAN_AT_STEPS", "2,3,4")
    _step(tr, 0)
    _step(tr, 1)
    _step(tr, 2)
    with pytest.raises(loop.NonFiniteLossError, match="3 steps in a row .*trainer.max_bad_steps=3"):
        _step(tr, 3)
    assert tr.skipped_total == 3 and _adam_steps(tr) == 1


def _true_step_gradient(tr: loop.Training) -> dict[str, torch.Tensor]:
    """The step's gradient by plain autograd on a twin of the engine's half-precision module, outside DeepSpeed (whose
    gradient hooks sit on the module's parameters): each micro-batch's loss / accum (as `engine.backward` scales
    it), summed in float64, averaged over the ranks."""
    twin = build_model(tr.cfg, VOCAB, 0, 0, tr.placement).to(next(tr.engine.module.parameters()).dtype)
    twin.load_state_dict(tr.engine.module.state_dict())
    names, params = zip(*twin.named_parameters())
    truth = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    rng = torch.random.get_rng_state()
    for micro in range(tr.accum):
        batch = loop._to_device(tr.objective.batch(tr.sampler.batch(0, micro)), tr.device)
        grads = torch.autograd.grad(twin(**batch).loss / tr.accum, params, allow_unused=True)
        for t, g in zip(truth, grads):
            if g is not None:
                t += g.double()
    torch.random.set_rng_state(rng)
    if tr.world > 1:
        flat = torch.cat([t.flatten() for t in truth])
        dist.all_reduce(flat)
        truth = [part.view_as(t) / tr.world for part, t in zip(flat.split([t.numel() for t in truth]), truth)]
    return dict(zip(names, truth))


def _check_step_gradient(
    tr: loop.Training,
    truth: dict[str, torch.Tensor],
    norms: dict,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    norm_rel: float = 1e-5,
) -> None:
    """AdamW's first moment after one unclipped step is (1 - beta1) x the step's gradient (within rtol, and atol x
    the largest entry), and the logged per-role norms are that gradient's (within norm_rel). Collective (DeepSpeed's
    per-parameter reads of its partitions)."""
    adam = adam_view(tr.engine)
    names = {id(p): name for name, p in tr.engine.module.named_parameters()}
    for name, p in tr.engine.module.named_parameters():
        given = adam.read(p)["exp_avg"].double() / (1 - tr.cfg.optim.beta1)
        want = truth[name]
        torch.testing.assert_close(given, want, rtol=rtol, atol=atol * max(want.abs().max().item(), 1e-12))
    for role, ps in tr.roles.items():
        want = math.sqrt(sum(truth[names[id(p)]].pow(2).sum().item() for p in ps))
        assert ps and norms[f"grad_norm_{role}"] == pytest.approx(want, rel=norm_rel), role


def test_fp16_step_sees_the_true_gradients(fp16_on_cpu):
    """AdamW's first moment after one step is (1 - beta1) x the gradient it was given: with no clipping, the true
    gradient of the half-precision model, however the loss was scaled. The logged norms are that gradient's."""
    tr = _build(_cfg("fp16", grad_clip=0.0))
    tr.engine.optimizer.loss_scale = 2.0**10  # a scale this model's gradients fit in fp16 with
    truth = _true_step_gradient(tr)  # no scaling, no DeepSpeed

    norms = _step(tr, 0, log_now=True)

    assert tr.skipped_total == 0 and _adam_steps(tr) == 1
    # the role norms from the ZeRO partitions, the loss scale divided out
    _check_step_gradient(tr, truth, norms, rtol=2e-2, atol=2e-3, norm_rel=1e-2)
    whole = math.sqrt(sum(t.pow(2).sum().item() for t in truth.values()))
    assert tr.engine.get_global_grad_norm() == pytest.approx(whole, rel=1e-2)


@pytest.mark.parametrize("zero", [1, 2])
def test_bf16_gradients_accumulate_in_float32(zero):
    """Over 8 bf16 micro-batches, the step's gradient is the float32 sum of the micro-batches' bf16 gradients
    (a bf16 sum would round each partial sum to 8 bits: ~1e-3 off)."""
    tr = _build(_cfg("bf16", zero, grad_clip=0.0, accum=8))
    truth = _true_step_gradient(tr)
    norms = _step(tr, 0, log_now=True)
    assert _adam_steps(tr) == 1
    _check_step_gradient(tr, truth, norms)


def _three_ranks_bf16_zero1(rank: int) -> None:
    tr = _build(_cfg("bf16", 1, grad_clip=0.0, world=3), world=3, rank=rank)
    # The norms' check covers a parameter split between two ranks' partitions only if a role has one.
    mappings = [(p._hp_mapping, p.numel()) for ps in tr.roles.values() for p in ps]
    split = [m for m, numel in mappings if m is not None and m.lp_fragment_address.numel < numel]
    any_split = torch.tensor(float(len(split)))
    dist.all_reduce(any_split)
    assert any_split.item() > 0, "no role parameter is split between partitions: change the model"
    truth = _true_step_gradient(tr)
    norms = _step(tr, 0, log_now=True)
    _check_step_gradient(tr, truth, norms)


@pytest.mark.slow
def test_bf16_zero1_over_three_ranks_sums_in_float32_and_logs_each_gradient_entry_once():
    """bf16 ZeRO 1 runs DeepSpeed's BF16_Optimizer, where every rank holds whole float32 gradients: the step's
    gradient is the float32 mean of the ranks' bf16 gradients (bf16 would round it: ~1e-3 off), and the per-role
    norms count each entry once, on the rank whose partition owns it (a parameter split between partitions
    included)."""
    spawn_world(_three_ranks_bf16_zero1, 3)


def test_bf16_non_finite_step_is_skipped_by_deepspeed_and_counted(monkeypatch):
    tr = _build(_cfg("bf16"))
    _no_own_check(monkeypatch)
    _step(tr, 0)
    monkeypatch.setenv("MPOE_FAULT_NAN_AT_STEPS", "2")
    before, lr = _weights(tr), tr.engine.get_lr()[0]
    _step(tr, 1)
    assert (tr.skipped_total, tr.engine.skipped_steps, _adam_steps(tr)) == (1, 1, 1)
    assert _same(before, _weights(tr)) and tr.engine.get_lr()[0] == lr  # no update, the schedule waits
    _step(tr, 2)
    assert (tr.skipped_total, tr.bad_in_a_row, _adam_steps(tr)) == (1, 0, 2)


def test_fp32_zero0_non_finite_step_is_skipped_by_the_loop_and_counted(monkeypatch):
    tr = _build(_cfg("fp32"))
    checks = []
    real = ds_gradients.gradients_finite
    monkeypatch.setattr(ds_gradients, "gradients_finite", lambda engine: checks.append(1) or real(engine))
    _step(tr, 0)
    monkeypatch.setenv("MPOE_FAULT_NAN_AT_STEPS", "2")
    before = _weights(tr)
    _step(tr, 1)
    assert len(checks) == 2  # torch AdamW has no check of its own: the loop's runs every step
    assert (tr.skipped_total, tr.engine.skipped_steps, _adam_steps(tr)) == (1, 1, 1)
    assert _same(before, _weights(tr))
    _step(tr, 2)
    assert (tr.skipped_total, tr.bad_in_a_row, _adam_steps(tr)) == (1, 0, 2)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_a_gpu_recovers_from_an_overflow_and_logs_unscaled_norms(tmp_path, mpoe_cache):
    """`mpoe-train trainer.precision=fp16` on CUDA (real fp16 kernels): a NaN step is skipped and counted, the
    run goes on, and the logged gradient norm of step 1 is fp32's, not 65536 times it."""
    env = dict(os.environ, MPOE_CACHE=mpoe_cache, WANDB_MODE="disabled", WANDB_SILENT="true")
    env.pop("DS_ACCELERATOR", None)
    common = ("moe=mpoe", "trainer.max_steps=8", "trainer.eval_every=8", "logging.progress=false")
    train(tmp_path / "fp32", mpoe_cache, *common, "trainer.precision=fp32", environment=env, timeout=900)
    env["MPOE_FAULT_NAN_AT_STEPS"] = "3"
    train(tmp_path / "fp16", mpoe_cache, *common, "trainer.precision=fp16", environment=env, timeout=900)
    fp32, fp16 = metrics(tmp_path / "fp32"), metrics(tmp_path / "fp16")
    assert len(fp16) == 8 and all(math.isfinite(r["loss"]) for r in fp16 if r["step"] != 3)
    assert fp16[1]["steps_skipped"] < fp16[2]["steps_skipped"] == fp16[-1]["steps_skipped"]  # step 3 only
    assert fp16[0]["grad_norm"] == pytest.approx(fp32[0]["grad_norm"], rel=0.05)
    assert fp16[0]["grad_norm_central"] == pytest.approx(fp32[0]["grad_norm_central"], rel=0.05)


@pytest.mark.parametrize("precision, zero", [("fp32", 0), ("bf16", 1)])
def test_on_cuda_deepspeed_steps_torchs_fused_adamw_and_it_updates_as_plain_adamw(monkeypatch, precision, zero):
    """The `fused` request travels through DeepSpeed's config into torch's AdamW (checked here on the CPU, where
    torch has a fused AdamW too, by making the engine believe it runs on CUDA); the CPU keeps the default."""
    plain = _build(_cfg(precision, zero=zero)).engine
    monkeypatch.setattr(ds_engine, "accelerator_name", lambda: "cuda")
    fused = _build(_cfg(precision, zero=zero)).engine

    def torch_adamw(engine):  # ZeRO 0 steps torch's optimizer itself; BF16_Optimizer wraps it
        return getattr(engine.optimizer, "optimizer", engine.optimizer)

    assert torch_adamw(fused).defaults["fused"] is True and not torch_adamw(plain).defaults.get("fused")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in plain.module.parameters()]
    for engine in (plain, fused):
        for _ in range(3):
            engine.backward(engine(input_ids=tokens).loss)
            engine.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, plain.module.parameters()))  # the steps moved them
    for p, q in zip(plain.module.parameters(), fused.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
