"""The combine's top-1 arithmetic against Megatron's float32 unpermute, bit for bit where it promises to be."""

from __future__ import annotations

import pytest
import torch

from mpoe.parallel.combine import gate_weighted_sum


def _top1_rows(dtype: torch.dtype, device: str = "cpu", num_tokens: int = 64, d: int = 48, padding: int = 5):
    """Rows of a top-1 capacity-dropping dispatch: some tokens dropped (no row), padding rows at the end
    pointing at token 0 with gate weight 0, as `AllToAllDispatcher` lays them out."""
    g = torch.Generator().manual_seed(0)
    kept = torch.randperm(num_tokens, generator=g)[: num_tokens - 9]  # 9 tokens dropped
    token = torch.cat([kept, torch.zeros(padding, dtype=torch.long)])
    rows = token.shape[0]
    expert_output = (torch.randn(rows, d, generator=g) * 3).to(dtype).requires_grad_()
    row_probs = torch.rand(rows, generator=g, dtype=torch.float32)
    row_probs[-padding:] = 0
    row_probs.requires_grad_()
    grad = torch.randn(num_tokens, d, generator=g).to(dtype)
    expert_output, row_probs = (t.detach().to(device).requires_grad_() for t in (expert_output, row_probs))
    return expert_output, row_probs, token.to(device), torch.Size((num_tokens, d)), grad.to(device)


def _megatron(expert_output, row_probs, token, shape):
    """Megatron-Core's unpermute with float32 probs: weight and sum in float32, cast back."""
    weighted = expert_output * row_probs.unsqueeze(-1)
    out = torch.zeros(shape, dtype=weighted.dtype, device=weighted.device)
    return out.index_add(0, token, weighted).to(expert_output.dtype)


def _grads(fn, expert_output, row_probs, token, shape, grad):
    out = fn(expert_output, row_probs, token, shape)
    return (out, *torch.autograd.grad(out, (expert_output, row_probs), grad))


def _on_cuda(*values):
    marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    return pytest.param(*values, marks=marks, id="-".join(map(str, values)))


@pytest.mark.parametrize(
    "dtype, device",
    [(torch.bfloat16, "cpu"), (torch.float16, "cpu"), (torch.float32, "cpu"), _on_cuda(torch.bfloat16, "cuda")],
)
def test_top1_output_and_row_gradients_are_megatrons_bit_for_bit(dtype, device):
    """On CUDA the float32 product is rounded inside the multiply's kernel; on the CPU through a buffer."""
    expert_output, row_probs, token, shape, grad = _top1_rows(dtype, device)
    ours = _grads(
        lambda *a: gate_weighted_sum(*a, one_row_per_token=True), expert_output, row_probs, token, shape, grad
    )
    megatron = _grads(_megatron, expert_output, row_probs, token, shape, grad)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == torch.float32
    assert torch.equal(ours[0], megatron[0])  # forward: one rounding of the float32 product
    assert torch.equal(ours[1], megatron[1])  # grad of the rows: one rounding of grad * p
    dropped = torch.ones(shape[0], dtype=torch.bool, device=device)
    dropped[token] = False
    assert dropped.sum() == 9 and (ours[0][dropped] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_top1_gate_gradient_is_within_the_rows_precision_of_the_exact_one(dtype):
    """<grad, row> sums products rounded to the rows' dtype in float32: off the exact (float64) value by at
    most the rounding of each term (2^-8 relative for bf16, 2^-11 for fp16) plus float32's sum."""
    expert_output, row_probs, token, shape, grad = _top1_rows(dtype)
    out = gate_weighted_sum(expert_output, row_probs, token, shape, one_row_per_token=True)
    (grad_probs,) = torch.autograd.grad(out, row_probs, grad)
    terms = grad.double().index_select(0, token) * expert_output.detach().double()
    exact = terms.sum(-1)
    unit = torch.finfo(dtype).eps / 2  # round to nearest: half a unit in the last place
    bound = (unit + 64 * 2.0**-24) * terms.abs().sum(-1)
    assert ((grad_probs.double() - exact).abs() <= bound).all()
    assert not torch.equal(grad_probs.double(), exact)  # the rounding is there to bound: the check can fail


def test_top_k_sums_in_float32_and_rounds_once():
    """Two rows per token: Megatron's arithmetic, which the top-1 shortcut must not be used for."""
    g = torch.Generator().manual_seed(1)
    token = torch.arange(16).repeat(2)
    expert_output = torch.randn(32, 8, generator=g).to(torch.bfloat16)
    row_probs = torch.rand(32, generator=g)
    out = gate_weighted_sum(expert_output, row_probs, token, torch.Size((16, 8)), one_row_per_token=False)
    assert torch.equal(out, _megatron(expert_output, row_probs, token, torch.Size((16, 8))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_top_k_gradients_are_megatrons_bit_for_bit_and_no_float32_rows_are_kept(dtype):
    """Backward recomputes from the rows what autograd through Megatron's arithmetic keeps in float32."""
    g = torch.Generator().manual_seed(2)
    token = torch.randperm(24, generator=g).repeat(3)[:60]  # up to 3 rows per token, some tokens with 2
    expert_output = torch.randn(60, 16, generator=g).to(dtype).requires_grad_()
    row_probs = torch.rand(60, generator=g).requires_grad_()
    shape, grad = torch.Size((24, 16)), torch.randn(24, 16, generator=g).to(dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gate_weighted_sum(expert_output, row_probs, token, shape, one_row_per_token=False)
    ours = (out, *torch.autograd.grad(out, (expert_output, row_probs), grad))
    megatron = _grads(_megatron, expert_output, row_probs, token, shape, grad)
    for a, b in zip(ours, megatron):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert sum(t.numel() * t.element_size() for t in saved if t.dim() == 2) == 60 * 16 * expert_output.element_size()
