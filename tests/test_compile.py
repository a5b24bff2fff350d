"""`trainer.compile`: every transformer block compiled on its own (mpoe.models.regional_compile).

- On the path CUDA takes at ep_size 1 (bf16, grouped experts, sync-free dispatch), each
  block is one graph (fullgraph=True would raise at a graph break), and blocks of the
  same structure share a graph: the number of graphs is the number of distinct block
  structures times two (training, and evaluation under no_grad), whatever the depth,
  plus the chunked LM loss's math (with and without gradients).
- Compiled training is the eager training: same losses and gradients in-process, and a
  compiled `mpoe-train` run logs the eager run's losses and resumes from an eager run's
  checkpoint (the state dict's names do not change).

Dynamo's `eager` / `aot_eager` backends trace forward and backward as inductor does,
without generating kernels: inductor's compilations take minutes on this CPU. Inductor
itself runs in the `gpu` tests (tests/test_gpu.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _cli import metrics, summary, train
from torch._dynamo.utils import counters

from mpoe.config import ConfigError, ModelConfig, MoEConfig, TrainConfig, TrainerConfig
from mpoe.models.build import build_model
from mpoe.models.experts.grouped import GROUPED_MM
from mpoe.models.regional_compile import compile_blocks
from mpoe.parallel.expert_placement import ExpertPlacement


def _model(kind: str, family: str, layers: int, dtype: torch.dtype, expert_impl: str = "grouped", recompute=False):
    model_cfg = ModelConfig(
        name=f"{family}_tiny", family=family, d_model=32, d_ff=64, num_layers=layers, num_heads=2,
        vocab_size=256, max_position_embeddings=32, dropout=0.0,
    )  # fmt: skip
    moe = MoEConfig(
        kind=kind, num_experts=4, every=2, top_k=2, capacity_factor=None, expert_impl=expert_impl,
        recompute_mpo_weights=recompute,
    )  # fmt: skip
    cfg = TrainConfig(model=model_cfg, moe=moe, trainer=TrainerConfig(seq_len=16, micro_batch_size=2))
    torch.manual_seed(0)
    model = build_model(cfg, 256, 0, 0, ExpertPlacement()).to(dtype)
    for module in model.modules():
        if hasattr(module, "dispatcher"):
            module.dispatcher.sync_free = True  # what CUDA runs at ep_size 1
    return model


def _batch(family: str) -> dict:
    tokens = torch.randint(1, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": tokens, **({"labels": tokens.roll(1, 1)} if family == "t5" else {})}


# Distinct block structures in a 4-layer model with MoE every 2nd layer: GPT-2 dense and MoE; T5 per stack
# (encoder, decoder) its first block (which owns the relative position bias), dense, and MoE.
STRUCTURES = {"gpt2": 2, "t5": 6}


@pytest.mark.skipif(GROUPED_MM is None, reason="this torch has no grouped_mm")
@pytest.mark.parametrize(  # both banks, both families, and MPOE's weights recomputed in backward
    "kind, family, recompute", [("mpoe", "gpt2", False), ("switch", "t5", False), ("mpoe", "gpt2", True)]
)
def test_on_the_gpu_path_a_block_is_one_graph_shared_by_blocks_of_its_structure(kind, family, recompute):
    torch._dynamo.reset()
    counters.clear()
    model = _model(kind, family, layers=4, dtype=torch.bfloat16, recompute=recompute).train()
    assert compile_blocks(model, backend="eager", fullgraph=True) == (4 if family == "gpt2" else 8)
    batch = _batch(family)
    for _ in range(2):  # the second step reuses the graphs
        model(**batch).loss.backward()
    model.eval()
    with torch.no_grad():
        model(**batch)
    # + the chunked LM loss's math: with gradients (training) and without (evaluation)
    assert counters["stats"]["unique_graphs"] == 2 * STRUCTURES[family] + 2


@pytest.mark.parametrize(
    "family, kind, expert_impl", [("gpt2", "dense", "auto"), ("gpt2", "mpoe", "grouped"), ("t5", "switch", "loop")]
)
def test_compiled_blocks_give_the_eager_loss_and_gradients(family, kind, expert_impl):
    """fp32 on the CPU: the loop backend and the fp32 grouped fallback break the graph at their host reads
    (the default run below compiles the MPOE loop backend)."""
    torch._dynamo.reset()
    eager = _model(kind, family, layers=4, dtype=torch.float32, expert_impl=expert_impl).train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="aot_eager")
    batch = _batch(family)
    expected, got = eager(**batch), compiled(**batch)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-6, atol=1e-6)
    names = [n for n, p in eager.named_parameters() if p.grad is not None]
    assert names == [n for n, p in compiled.named_parameters() if p.grad is not None]
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiled in place: same names


def test_an_unknown_compile_backend_is_one_line():
    with pytest.raises(ConfigError, match="trainer.compile_backend"):
        TrainerConfig(compile_backend="tensorrt")


@pytest.mark.slow
def test_a_compiled_run_resumes_an_eager_checkpoint_and_logs_the_eager_losses(tmp_path, mpoe_cache):
    """The default model with dense FFNs, fp32 (the MoE blocks' equivalence is checked in-process above, and
    compiled expert parallelism in tests/test_dispatch.py: this run is about checkpoints). aot_eager traces
    forward and backward as inductor does (AOTAutograd) and runs the traced ops as they are, so the losses are
    the eager run's; the checkpoint loads because compiling in place keeps the state dict's names."""
    common = ("moe=dense", "trainer.max_steps=6", "trainer.eval_every=6")
    train(tmp_path / "eager", mpoe_cache, *common, "trainer.save_every=3")
    step3 = next((tmp_path / "eager" / "checkpoints").glob("step_*3"))
    train(tmp_path / "compiled", mpoe_cache, *common, "trainer.compile=true", "trainer.compile_backend=aot_eager",
          f"trainer.resume={step3}")  # fmt: skip
    eager = {r["step"]: r["loss"] for r in metrics(tmp_path / "eager")}
    compiled = {r["step"]: r["loss"] for r in metrics(tmp_path / "compiled")}
    assert sorted(compiled) == [4, 5, 6]
    for step, loss in compiled.items():
        assert math.isclose(loss, eager[step], rel_tol=1e-5), (step, loss, eager[step])
    val = summary(tmp_path / "eager")["val_loss"], summary(tmp_path / "compiled")["val_loss"]
    assert math.isclose(*val, rel_tol=1e-5), val


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_on_cuda_inductor_compiles_each_block_whole_and_matches_eager_in_bf16(kind):
    torch._dynamo.reset()
    eager = _model(kind, "gpt2", layers=4, dtype=torch.bfloat16).cuda().train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="inductor", fullgraph=True)
    batch = {k: v.cuda() for k, v in _batch("gpt2").items()}
    expected, got = eager(**batch), compiled(**batch)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, expected.loss, rtol=2e-2, atol=2e-2)  # bf16: fused kernels round anew
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None and p.grad.any():  # (an expert no token chose has a zero gradient)
            cos = torch.nn.functional.cosine_similarity(q.grad.float().flatten(), p.grad.float().flatten(), dim=0)
            assert cos > 0.99, (name, cos)
