"""`trainer.activation_checkpointing`: each transformer block's forward runs again in backward (HF's gradient
checkpointing, non-reentrant) for the same losses and gradients, and a forward keeps far less."""

import copy

import pytest
import torch

from mpoe.config import ConfigError, ModelConfig, MoEConfig, TrainConfig, TrainerConfig
from mpoe.models.build import build_model
from mpoe.models.experts import resolve_expert_backends
from mpoe.parallel.expert_placement import ExpertPlacement


def _model(family: str, kind: str, checkpointing: bool, d_model=32, d_ff=64, seq_len=16):
    model = ModelConfig(
        name=f"{family}_tiny", family=family, d_model=d_model, d_ff=d_ff, num_layers=4, num_heads=2,
        vocab_size=256, max_position_embeddings=64, dropout=0.0,
    )  # fmt: skip
    trainer = TrainerConfig(seq_len=seq_len, micro_batch_size=2, activation_checkpointing=checkpointing)
    cfg = TrainConfig(model=model, moe=MoEConfig(kind=kind, num_experts=4, top_k=2), trainer=trainer)
    torch.manual_seed(0)
    return build_model(cfg, 256, 0, 0, ExpertPlacement()).train()


def _batch(family: str, batch=2, seq_len=16) -> dict:
    tokens = torch.randint(1, 250, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    return {"input_ids": tokens, **({"labels": tokens.roll(1, 1)} if family == "t5" else {})}


def _step(model, batch):
    out = model(**batch)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["dense", "switch", "mpoe"])
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_checkpointed_blocks_give_the_same_losses_and_gradients(family, kind):
    """GPT-2: bit for bit. T5: within float32 rounding, because HF's T5 under checkpointing makes its zero
    cross-attention bias require grad, and attention then takes another (equally exact) kernel path."""
    plain, checkpointed = _model(family, kind, False), _model(family, kind, True)
    batch = _batch(family)
    (want, want_grads), (got, got_grads) = _step(plain, batch), _step(checkpointed, batch)
    tolerance = dict(rtol=0, atol=0) if family == "gpt2" else dict(rtol=1e-5, atol=1e-6)
    for key in ("loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(got[key], want[key], **tolerance)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        assert (grad is None) == (got_grads[name] is None), name
        if grad is not None:
            torch.testing.assert_close(got_grads[name], grad, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def test_checkpointed_blocks_around_recomputed_mpo_weights_give_the_same_numbers():
    """Two checkpoints nested (a block's, and inside it the MPO weights' rebuild): GPT-2 still bit for bit."""
    plain, both = _model("gpt2", "mpoe", False), _model("gpt2", "mpoe", True)
    for module in both.modules():
        if hasattr(module, "bank"):
            module.bank.use_impl("grouped")
            module.bank.recompute_weights = True
    for module in plain.modules():
        if hasattr(module, "bank"):
            module.bank.use_impl("grouped")
    batch = _batch("gpt2")
    (want, want_grads), (got, got_grads) = _step(plain, batch), _step(both, batch)
    assert torch.equal(got["loss"], want["loss"])
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name


def _net_forward_bytes(model, batch) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(**batch)  # held until counted: with it, the graph and what it keeps would be freed
    kept = sum(event.self_cpu_memory_usage for event in prof.events())
    del out
    return kept


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_a_checkpointed_forward_keeps_less_than_half(family):
    shape = dict(d_model=64, d_ff=256, seq_len=64)
    batch = _batch(family, batch=4, seq_len=64)
    models = [_model(family, "mpoe", checkpointing, **shape) for checkpointing in (False, True)]
    for model in models:  # warm-up: lazy state outside the count
        model(**batch).loss.backward()
    plain, checkpointed = (_net_forward_bytes(model, batch) for model in models)
    assert 0 < checkpointed < plain / 2


def test_checkpointed_t5_blocks_do_not_compile():
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing.*use one of the two"):
        TrainConfig(
            model=ModelConfig(family="t5", name="t5_tiny"),
            trainer=TrainerConfig(activation_checkpointing=True, compile=True),
        )


def test_compiled_checkpointed_gpt2_blocks_give_the_eager_numbers():
    """bf16 on the grouped expert path, each block one graph (fullgraph), the MoE losses leaving the blocks."""
    from mpoe.models.regional_compile import compile_blocks

    torch._dynamo.reset()
    eager = _model("gpt2", "mpoe", True).to(torch.bfloat16)
    for module in eager.modules():
        if hasattr(module, "bank"):
            module.bank.use_impl("grouped")
            module.dispatcher.sync_free = True
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="aot_eager", fullgraph=True)
    batch = _batch("gpt2")
    (want, want_grads), (got, got_grads) = _step(eager, batch), _step(compiled, batch)
    for key in ("loss", "aux_loss"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-3)
    for name, grad in want_grads.items():
        if grad is not None:
            torch.testing.assert_close(got_grads[name].float(), grad.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_checkpointed_blocks_lower_the_peak_and_keep_the_loss():
    """bf16 on CUDA, GPT-2 small's width: the same loss, and a forward + backward peak well below the plain one."""
    shape = dict(d_model=768, d_ff=3072, seq_len=64)
    batch = {k: v.cuda() for k, v in _batch("gpt2", batch=8, seq_len=64).items()}
    peaks, losses = [], []
    for checkpointing in (False, True, False, True):  # the second round: the allocator and kernels warm
        model = _model("gpt2", "mpoe", checkpointing, **shape).to("cuda", torch.bfloat16)
        resolve_expert_backends(model)  # moe.expert_impl=auto, now for the GPU
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = model(**batch)
        out.loss.backward()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        losses.append(out.loss.item())
        del model, out
    assert losses[3] == pytest.approx(losses[2], rel=1e-3)
    assert peaks[3] < peaks[2]


@pytest.mark.slow
def test_a_checkpointed_run_logs_the_plain_runs_losses(tmp_path, mpoe_cache):
    from _cli import metrics, train

    runs = {option: tmp_path / option for option in ("false", "true")}
    for option, run in runs.items():
        train(run, mpoe_cache, "moe=mpoe", f"trainer.activation_checkpointing={option}", "logging.wandb.mode=disabled")
    plain, checkpointed = metrics(runs["false"]), metrics(runs["true"])
    assert len(plain) == len(checkpointed) > 0
    assert [r["loss"] for r in checkpointed] == [r["loss"] for r in plain]  # GPT-2: bit for bit


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped_mm")
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_checkpointed_blocks_on_the_cuda_path_read_the_host_only_where_hf_does(family):
    """Saving and restoring the RNG state around each block, and the recompute, add no host read to CUDA's path.
    GPT-2 without its KV cache (HF drops it under checkpointing) checks its position ids for packed sequences with
    one host read per forward, in HF's code: that read comes first, and it is the one the guard meets."""
    import traceback

    from test_gpu_path_on_cpu import HostRead, _gpu_path, no_host_reads

    model = _gpu_path(_model(family, "mpoe", True))
    for module in model.modules():
        if hasattr(module, "bank"):
            module.bank.use_impl("grouped")
    batch = _batch(family)
    model(**batch).loss.backward()  # warm-up outside the guard: lazy initialisation may read once
    if family == "t5":
        with no_host_reads():
            model(**batch).loss.backward()
        return
    with pytest.raises(HostRead) as read, no_host_reads():
        model(**batch).loss.backward()
    assert "find_packed_sequence_indices" in [frame.name for frame in traceback.extract_tb(read.tb)]


@pytest.mark.slow
def test_checkpointed_expert_parallel_blocks_log_the_plain_runs_losses(tmp_path, mpoe_cache):
    """2 processes at ep_size 2: backward's recompute runs each block's all-to-alls again, on every rank in the
    same order, and the run logs what the plain expert-parallel run logs."""
    from _cli import metrics, train

    runs = {option: tmp_path / option for option in ("false", "true")}
    for option, run in runs.items():
        train(
            run, mpoe_cache, "moe=mpoe", "parallel.ep_size=2", "parallel.zero_stage=2",
            f"trainer.activation_checkpointing={option}", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
            "logging.wandb.mode=disabled", nproc=2,
        )  # fmt: skip
    plain, checkpointed = metrics(runs["false"]), metrics(runs["true"])
    assert len(plain) == len(checkpointed) > 0
    assert [r["loss"] for r in checkpointed] == [r["loss"] for r in plain]
