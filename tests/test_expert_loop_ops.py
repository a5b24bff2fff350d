"""The loop backend's per-expert ops against per-expert reference code (float64, autograd on plain tensors)."""

import pytest
import torch

from mpoe.models import mpo
from mpoe.models.experts.loop_ops import per_expert_linear, per_expert_mpo_linear

COUNTS = [3, 0, 5, 2]


def test_per_expert_linear_matches_per_expert_loop():
    torch.manual_seed(3)
    x = torch.randn(sum(COUNTS), 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(sum(COUNTS), 7, dtype=torch.float64)
    reference = torch.cat([xe @ w[e] + b[e] for e, xe in enumerate(x.split(COUNTS))])
    expected = torch.autograd.grad(reference, (x, w, b), g)
    out = per_expert_linear(x, COUNTS, b, stacked=w)
    torch.testing.assert_close(out, reference)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), g), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_per_expert_mpo_linear_matches_per_expert_products(transposed, with_bias):
    """Each expert's rows times the matrix its halves define (written out with einsum), and all gradients."""
    torch.manual_seed(7)
    L, (a, b, d, c, e) = len(COUNTS), (3, 4, 2, 5, 2)
    left = torch.randn(L, a, b, d, dtype=torch.float64, requires_grad=True)
    right = torch.randn(L, d, c, e, dtype=torch.float64, requires_grad=True)
    in_dim, out_dim = (b * e, c * a) if transposed else (c * a, b * e)
    x = torch.randn(sum(COUNTS), in_dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(L, out_dim, dtype=torch.float64, requires_grad=True) if with_bias else None
    g = torch.randn(sum(COUNTS), out_dim, dtype=torch.float64)

    matrices = torch.einsum("kabd,kdce->kcabe", left, right).reshape(L, c * a, b * e)
    reference = torch.cat(
        [
            xe @ (matrices[k].t() if transposed else matrices[k]) + (0 if bias is None else bias[k])
            for k, xe in enumerate(x.split(COUNTS))
        ]
    )
    inputs = [x, left, right] + ([bias] if with_bias else [])
    expected = torch.autograd.grad(reference, inputs, g)
    out = per_expert_mpo_linear(x, COUNTS, bias, left, right, transposed)
    torch.testing.assert_close(out, reference)
    for got, want in zip(torch.autograd.grad(out, inputs, g), expected):
        torch.testing.assert_close(got, want)


def test_per_expert_mpo_linear_builds_the_permuted_weight_of_split_halves():
    """With the halves of a real chain, x[:, perm] through the op equals x @ W of `mpo.contract` (both orientations)."""
    torch.manual_seed(8)
    ins, outs = [3, 4, 4, 4, 4], [4, 4, 8, 6, 4]
    chain = mpo.decompose(torch.randn(768, 3072, dtype=torch.float64), ins, outs, bond_dim=8)
    w = mpo.contract(chain)
    x = torch.randn(6, 768, dtype=torch.float64)
    left, right, perm = mpo.split_halves(chain)
    y = per_expert_mpo_linear(x.index_select(1, perm), [6], None, left[None], right[None])
    torch.testing.assert_close(y, x @ w)
    left, right, perm = mpo.split_halves(chain, transposed=True)
    y = per_expert_mpo_linear(x, [6], None, left[None], right[None], transposed=True)
    torch.testing.assert_close(y, (x @ w)[:, perm])


def test_per_expert_mpo_linear_with_no_rows_gives_zero_gradients():
    left = torch.randn(2, 2, 3, 2, requires_grad=True)
    right = torch.randn(2, 2, 3, 2, requires_grad=True)
    x = torch.randn(0, 6, requires_grad=True)
    out = per_expert_mpo_linear(x, [0, 0], None, left, right)
    assert out.shape == (0, 6)
    gl, gr = torch.autograd.grad(out.sum(), (left, right))
    assert not gl.any() and not gr.any()


def test_per_expert_mpo_linear_with_frozen_halves_still_gives_grad_x():
    torch.manual_seed(9)
    left = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    right = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    matrices = torch.einsum("kabd,kdce->kcabe", left, right).reshape(2, 6, 6)
    (gx,) = torch.autograd.grad(per_expert_mpo_linear(x, [2, 3], None, left, right).sum(), x)
    expected = torch.cat(
        [
            torch.ones(2, 6, dtype=torch.float64) @ matrices[0].t(),
            torch.ones(3, 6, dtype=torch.float64) @ matrices[1].t(),
        ]
    )
    torch.testing.assert_close(gx, expected)


def test_per_expert_mpo_linear_in_bf16_sums_the_left_gradient_in_float32():
    """grad left = sum over the c column blocks of their products: 256 + 63 x 1 = 319, which bf16 rounds once to
    320. Summed in bf16 one block at a time, every 256 + 1 rounds back to 256 (bf16 is 2 apart there)."""
    c = 64
    left = torch.ones(1, 1, 1, 1, dtype=torch.bfloat16, requires_grad=True)  # [L, a, b, d]: M_0 is (c, 1)
    right = torch.ones(1, 1, c, 1, dtype=torch.bfloat16, requires_grad=True)  # [L, d, c, e]
    x = torch.ones(1, c, dtype=torch.bfloat16)
    x[0, 0] = 256.0
    out = per_expert_mpo_linear(x, [1], None, left, right, accumulate_max_blocks=c)
    (g_left,) = torch.autograd.grad(out.sum(), left)
    assert g_left.item() == torch.tensor(319.0).to(torch.bfloat16).item() == 320.0
