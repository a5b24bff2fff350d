"""The chunked LM loss (mpoe.models.lm_loss, trainer.lm_loss=chunked) against plain autograd and HF's own loss.

Truths: torch's cross_entropy on the full logits in float64 (loss and both gradients), and the HF model computing
logits and loss itself (trainer.lm_loss=hf), for GPT-2 and T5 with tied and untied heads, dense and MoE."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mpoe.config import ConfigError, TrainerConfig
from mpoe.models.build import build_model
from mpoe.models.lm_loss import IGNORE_INDEX, chunk_math_fusable, linear_cross_entropy
from mpoe.parallel.expert_placement import ExpertPlacement
from tests.test_models import VOCAB, tiny_batch, tiny_cfg


def _problem(rows=37, d=24, vocab=53, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = IGNORE_INDEX  # some rows count for nothing
    return hidden, weight, targets


def _reference(hidden, weight, targets):
    """Loss and gradients by autograd through the full float64 logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, ignore_index=IGNORE_INDEX)
    return (loss, *torch.autograd.grad(loss * 3.5, (h, w)))


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 1000])
def test_loss_and_gradients_equal_autograd_in_float64(chunk_rows):
    hidden, weight, targets = _problem()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    # a scaled loss (as DeepSpeed's loss scale or accumulation) scales the gradients
    grad_h, grad_w = torch.autograd.grad(loss * 3.5, (hidden, weight))
    ref_loss, ref_h, ref_w = _reference(hidden, weight, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-12, atol=1e-14)


def test_without_grad_it_only_computes_the_loss():
    hidden, weight, targets = _problem()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(hidden, weight, targets)[0], rtol=1e-12, atol=0)


def test_frozen_head_gets_no_gradient():
    hidden, weight, targets = _problem()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    loss.backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, _reference(hidden, weight, targets)[1] / 3.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_are_as_exact_as_hfs_way(dtype):
    """bf16/fp16, a mean over 4096 tokens: gradients within 1.5x the error (against float64 math) of HF's way,
    logits in the dtype, float32 cross-entropy, autograd. Ours forms the gradient of the summed loss (entries
    in [-1, 1]) and divides in backward; forming 1/4096-sized entries first would lose them in fp16."""
    hidden, weight, targets = _problem(rows=4096, d=64, vocab=500, dtype=dtype)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=1000)
    ours = torch.autograd.grad(loss, (hidden, weight))
    hf_loss = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX)
    hfs = torch.autograd.grad(hf_loss, (hidden, weight))
    ref_loss, *ref = _reference(hidden, weight, targets)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    for mine, theirs, truth in zip(ours, hfs, ref):
        assert mine.dtype == dtype
        error = (mine.double() - truth / 3.5).norm() / truth.norm() * 3.5
        hf_error = (theirs.double() - truth / 3.5).norm() / truth.norm() * 3.5
        assert error < 1.5 * hf_error, (error, hf_error)


def test_no_counted_target_gives_nan_like_hf():
    hidden, weight, targets = _problem()
    loss = linear_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX))
    assert torch.isnan(loss)


CASES = [
    ("gpt2", "dense", {}),
    ("gpt2", "mpoe", {}),
    ("gpt2", "switch", {"tie_word_embeddings": False}),
    ("t5", "switch", {}),  # tied: HF scales the decoder output by d_model ** -0.5
    ("t5", "dense", {"tie_word_embeddings": False, "activation": "gated-gelu"}),
]


@pytest.mark.parametrize(("family", "kind", "model"), CASES, ids=[f"{f}-{k}-{len(m)}" for f, k, m in CASES])
def test_model_loss_and_all_gradients_equal_hf_loss(family, kind, model):
    """trainer.lm_loss=chunked and =hf: the same LM loss and the same gradient for every parameter (float64)."""
    base = tiny_cfg(family, kind)
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, **model))
    batch = tiny_batch(family, base)
    if family == "t5":  # some targets ignored, as padding is
        batch["labels"][:, -2:] = IGNORE_INDEX
    results = []
    for lm_loss in ("chunked", "hf"):
        cfg = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, lm_loss=lm_loss))
        net = build_model(cfg, VOCAB, 0, 1, ExpertPlacement()).double()
        out = net(**batch, return_logits=True)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    (ours, ours_grads), (hf, hf_grads) = results
    # HF's GPT-2 loss takes `logits.float()`: for a float64 model that is float32, so its loss is as exact as that
    rtol, atol = (1e-6, 1e-8) if family == "gpt2" else (1e-10, 1e-13)
    torch.testing.assert_close(ours.lm_loss, hf.lm_loss.double(), rtol=rtol, atol=0)
    torch.testing.assert_close(ours.logits, hf.logits, rtol=1e-12, atol=1e-12)
    assert ours_grads.keys() == hf_grads.keys() and len(ours_grads) > 10
    for name in hf_grads:
        torch.testing.assert_close(ours_grads[name], hf_grads[name], rtol=rtol, atol=atol, msg=name)


def test_unknown_lm_loss_is_one_line():
    with pytest.raises(ConfigError, match=r"trainer.lm_loss='fast' is invalid: use one of chunked, hf"):
        TrainerConfig(lm_loss="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_chunked_loss_is_as_exact_as_hfs_way_without_host_sync():
    """On CUDA in bf16 at GPT-2's vocabulary, several chunks: forward and backward make the host wait for nothing,
    and loss and gradients are within 1.5x the error of HF's way (against float64 math)."""
    hidden, weight, targets = (t.cuda() for t in _problem(rows=6000, d=64, vocab=50257))
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_()
    weight = weight.detach().to(torch.bfloat16).requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy(hidden, weight, targets)  # CHUNK_LOGIT_BYTES: 2670 rows a chunk
        ours = torch.autograd.grad(loss, (hidden, weight))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    hf_loss = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX)
    hfs = torch.autograd.grad(hf_loss, (hidden, weight))
    ref_loss, *ref = _reference(hidden, weight, targets)
    assert abs(loss.double() - ref_loss) <= 1.5 * abs(hf_loss.double() - ref_loss) + 1e-6 * ref_loss
    for mine, theirs, truth in zip(ours, hfs, ref):
        error = (mine.double() - truth / 3.5).norm() / truth.norm() * 3.5
        hf_error = (theirs.double() - truth / 3.5).norm() / truth.norm() * 3.5
        assert error < 1.5 * hf_error, (error, hf_error)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_fusable_chunk_math_compiled_equals_the_in_place_math(dtype):
    """What trainer.compile runs per chunk (chunk_math_fusable under torch.compile, aot_eager here: the traced
    graph inductor would fuse) gives the in-place eager math's loss and gradients, with the same roundings."""
    hidden, weight, targets = _problem(rows=300, d=24, vocab=70, dtype=dtype)
    compiled = torch.compile(chunk_math_fusable, backend="aot_eager", fullgraph=True)
    results = []
    for math in (None, compiled):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, chunk_rows=128, chunk_math=math)  # 2 full chunks + 44 rows
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
