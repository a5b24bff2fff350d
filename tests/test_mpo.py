"""MPO decomposition against independent truths: exact reconstruction, SVD error, the paper's counts."""

import math

import pytest
import torch

from mpoe.models import mpo

PAPER_IN, PAPER_OUT = [3, 4, 4, 4, 4], [4, 4, 8, 6, 4]


def _interleaved(weight, ins, outs):
    """The 2n-way tensor with axes (i1, j1, ..., in, jn), built independently of mpo.py."""
    n = len(ins)
    order = [a for k in range(n) for a in (k, n + k)]
    return weight.reshape(*ins, *outs).permute(*order)


@pytest.mark.parametrize(
    "ins,outs",
    [([3, 4], [5, 2]), ([2, 3, 2], [2, 2, 3]), ([2, 2, 3, 2], [3, 2, 2, 1]), ([2, 1, 3, 2, 2], [1, 2, 2, 3, 2])],
)
def test_full_bond_reconstructs_exactly(ins, outs):
    w = torch.randn(math.prod(ins), math.prod(outs), dtype=torch.float64)
    tensors = mpo.decompose(w, ins, outs)
    assert [tuple(t.shape) for t in tensors] == mpo.tensor_shapes(ins, outs)
    assert tensors[0].shape[0] == 1 and tensors[-1].shape[-1] == 1
    torch.testing.assert_close(mpo.contract(tensors), w, rtol=0, atol=1e-10)


def test_paper_shape_768x3072():
    torch.manual_seed(0)
    w = torch.randn(768, 3072) * 0.02
    tensors = mpo.decompose(w, PAPER_IN, PAPER_OUT)
    assert mpo.full_bond_dims(PAPER_IN, PAPER_OUT) == [1, 12, 192, 384, 16, 1]
    assert [t.numel() for t in tensors] == [144, 36864, 2359296, 147456, 256]
    assert sum(t.numel() for t in tensors) == 2_544_016 == mpo.mpo_num_params(PAPER_IN, PAPER_OUT)
    central = tensors[mpo.central_index(5)].numel()
    assert central == mpo.central_num_params(PAPER_IN, PAPER_OUT)
    assert round(100 * central / 2_544_016, 1) == 92.7
    torch.testing.assert_close(mpo.contract(tensors), w, rtol=0, atol=2e-6)


@pytest.mark.parametrize("bond", [None, 1, 3, 8])
def test_param_counts_match_formulas(bond):
    ins, outs = [2, 3, 4, 2], [3, 2, 2, 4]
    tensors = mpo.decompose(torch.randn(48, 48), ins, outs, bond_dim=bond)
    d = mpo.full_bond_dims(ins, outs, bond)
    assert [t.shape[0] for t in tensors] + [1] == d
    assert sum(t.numel() for t in tensors) == mpo.mpo_num_params(ins, outs, bond)
    assert tensors[2].numel() == mpo.central_num_params(ins, outs, bond) == d[2] * 4 * 2 * d[3]
    if bond is not None:
        assert max(d) <= bond


def test_single_truncated_bond_error_equals_discarded_singular_values():
    """n = 2: one bond; Eckart-Young says the error is the tail of the singular values."""
    ins, outs = [4, 6], [5, 3]
    w = torch.randn(24, 15, dtype=torch.float64)
    s = torch.linalg.svdvals(_interleaved(w, ins, outs).reshape(20, 18))
    for bond in (1, 5, 12):
        err = mpo.truncation_error(w, ins, outs, bond)
        expected = float((s[bond:] ** 2).sum())
        assert err.actual == pytest.approx(expected, rel=1e-9)
        assert err.bound == pytest.approx(expected, rel=1e-9)


def test_one_of_several_bonds_truncated_gives_equality():
    ins, outs = [2, 3, 4], [2, 4, 3]  # full bonds (4, 12): cap 6 truncates only the second
    assert mpo.full_bond_dims(ins, outs) == [1, 4, 12, 1]
    w = torch.randn(24, 24, dtype=torch.float64)
    err = mpo.truncation_error(w, ins, outs, 6)
    assert err.actual > 1e-3
    assert err.actual == pytest.approx(err.bound, rel=1e-9)


def test_several_truncated_bonds_stay_within_bound():
    ins, outs = [2, 3, 2, 2], [3, 2, 2, 2]
    w = torch.randn(24, 24, dtype=torch.float64)
    err = mpo.truncation_error(w, ins, outs, 3)
    assert 0 < err.actual <= err.bound * (1 + 1e-9)
    assert mpo.truncation_error(w, ins, outs, None).actual < 1e-20


@pytest.mark.parametrize("ins,outs", [([2, 3], [4, 2]), ([2, 3], [2, 3, 2]), ([2, 2], [3, 3])])
def test_bad_factors_raise(ins, outs):
    with pytest.raises(ValueError, match="factors"):
        mpo.decompose(torch.randn(6, 12), ins, outs)


def test_factorize():
    assert mpo.factorize(768) == [3, 4, 4, 4, 4]
    assert mpo.factorize(3072) == [4, 4, 8, 6, 4]
    assert mpo.factorize(1024) == [4, 4, 4, 4, 4]
    assert mpo.factorize(4096) == [4, 4, 8, 8, 4]
    for dim, n in [(512, 5), (2048, 5), (100, 5), (7, 5), (96, 3), (360, 4), (64, 5)]:
        f = mpo.factorize(dim, n)
        assert len(f) == n and math.prod(f) == dim
        assert f[mpo.central_index(n)] == max(f)
    assert mpo.factorize(7) == [1, 1, 7, 1, 1]


def test_dense_and_chain_paths_agree_with_the_matrix():
    torch.manual_seed(0)
    w, b = torch.randn(24, 36, dtype=torch.float64), torch.randn(36, dtype=torch.float64)
    tensors = mpo.decompose(w, [2, 3, 4], [3, 4, 3])
    torch.testing.assert_close(mpo.contract(tensors), w)
    x = torch.randn(10, 24, dtype=torch.float64)
    dense, chain = mpo.mpo_matmul(x, tensors, "dense", b), mpo.mpo_matmul(x, tensors, "chain", b)
    torch.testing.assert_close(dense, chain)
    torch.testing.assert_close(dense, x @ w + b)
    torch.testing.assert_close(mpo.mpo_matmul(x, tensors, "auto", b), dense)
    assert mpo.mpo_matmul(x[:0], tensors, "auto", b).shape == (0, 36)


def test_paths_give_equal_gradients():
    torch.manual_seed(1)
    tensors = [
        t.requires_grad_() for t in mpo.decompose(torch.randn(24, 20, dtype=torch.float64), [2, 3, 4], [2, 5, 2], 4)
    ]
    x = torch.randn(7, 24, dtype=torch.float64)
    grads = []
    for method in ("dense", "chain"):
        g = torch.autograd.grad(mpo.mpo_matmul(x, tensors, method).pow(2).sum(), tensors)
        grads.append(g)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_auto_picks_the_cheaper_path():
    shapes = mpo.tensor_shapes(PAPER_IN, PAPER_OUT, 16)
    dense0, chain0 = mpo.matmul_flops(0, shapes)
    assert chain0 == 0 < dense0
    dense, chain = mpo.matmul_flops(4096, mpo.tensor_shapes(PAPER_IN, PAPER_OUT))
    assert dense < chain
    dense_cost, chain_cost = mpo.matmul_costs(0, shapes)
    assert chain_cost == 0 < dense_cost
    dense_cost, chain_cost = mpo.matmul_costs(512, mpo.tensor_shapes(PAPER_IN, PAPER_OUT, 8))
    dense_flops, chain_flops = mpo.matmul_flops(512, mpo.tensor_shapes(PAPER_IN, PAPER_OUT, 8))
    assert chain_flops < dense_flops and dense_cost < chain_cost  # fewer FLOPs, yet memory traffic decides
    # n = 1: both are one GEMM of N*I*J multiply-adds
    assert mpo.matmul_flops(3, [(1, 4, 5, 1)]) == (2 * (20 + 3 * 20), 2 * 3 * 20)


def test_contract_broadcasts_leading_batch_dims():
    """Stacked per-expert tensors around one shared central tensor give each expert's matrix."""
    ins, outs = [2, 3, 2, 2, 1], [1, 2, 2, 3, 2]
    chains = [mpo.decompose(torch.randn(24, 24, dtype=torch.float64), ins, outs) for _ in range(3)]
    shared = chains[0][2]
    batched = [torch.stack([c[k] for c in chains]) for k in range(5)]
    batched[2] = shared
    expected = torch.stack([mpo.contract(c[:2] + [shared] + c[3:]) for c in chains])
    torch.testing.assert_close(mpo.contract(batched), expected)


@pytest.mark.parametrize(
    "ins, outs, bond",
    [
        ([3, 4, 4, 4, 4], [4, 4, 8, 6, 4], 16),
        ([2, 3, 2, 2, 1], [1, 2, 2, 3, 2], None),
        ([2, 3], [3, 2], None),
        ([4], [5], None),
    ],
)
def test_split_halves_multiply_to_contract_with_rows_or_columns_reordered(ins, outs, bond):
    """M[(c, a), (b, e)] = sum_d left[a, b, d] right[d, c, e], written out with einsum.

    It is W (or W^T) with rows reordered."""

    def product(left, right):
        a, b, c, e = left.shape[-3], left.shape[-2], right.shape[-2], right.shape[-1]
        return torch.einsum("...abd,...dce->...cabe", left, right).reshape(*left.shape[:-3], c * a, b * e)

    torch.manual_seed(4)
    w = torch.randn(math.prod(ins), math.prod(outs), dtype=torch.float64)
    tensors = mpo.decompose(w, ins, outs, bond)
    if len(tensors) == 1:  # nothing to cut
        assert mpo.split_halves(tensors) is None
        return
    batched = [t.unsqueeze(0).repeat(3, 1, 1, 1, 1) + 0.1 * torch.randn(3, *t.shape, dtype=t.dtype) for t in tensors]
    batched[mpo.central_index(len(batched))] = tensors[mpo.central_index(len(tensors))]  # shared, unbatched
    for chain in (tensors, batched):
        chain = [t.detach().requires_grad_() for t in chain]
        full = mpo.contract(chain)
        left, right, perm = mpo.split_halves(chain)
        rows = product(left, right)
        left, right, cperm = mpo.split_halves(chain, transposed=True)
        cols_t = product(left, right)
        assert sorted(perm.tolist()) == list(range(full.shape[-2])) and sorted(cperm.tolist()) == list(
            range(full.shape[-1])
        )
        torch.testing.assert_close(rows, full[..., perm, :])
        torch.testing.assert_close(cols_t, full[..., cperm].transpose(-2, -1))
        g = torch.randn_like(full)
        expected = torch.autograd.grad(full, chain, g)
        for got in (
            torch.autograd.grad(rows, chain, g[..., perm, :]),
            torch.autograd.grad(cols_t, chain, g[..., cperm].transpose(-2, -1)),
        ):
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b)


def test_decompose_of_a_meta_weight_gives_the_shapes_without_an_svd():
    w = torch.empty(768, 3072, device="meta")
    tensors = mpo.decompose(w, [3, 4, 4, 4, 4], [4, 4, 8, 6, 4], bond_dim=16)
    assert all(t.is_meta for t in tensors)
    assert [tuple(t.shape) for t in tensors] == mpo.tensor_shapes([3, 4, 4, 4, 4], [4, 4, 8, 6, 4], 16)
    with pytest.raises(ValueError, match="does not match factors"):
        mpo.decompose(w, [3, 4, 4, 4, 4], [4, 4, 8, 6, 2])


@pytest.mark.parametrize(
    "ins, outs, bond",
    [
        ([3, 4, 4, 4, 4], [4, 4, 8, 6, 4], 16),
        ([4, 4, 8, 6, 4], [3, 4, 4, 4, 4], 16),
        ([2, 3, 2, 2, 1], [1, 2, 2, 3, 2], None),
        ([2, 3], [3, 2], None),
    ],
)
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_permuted_product_is_w_with_rows_or_columns_reordered(ins, outs, bond, side):
    """Against the contracted W indexed by the returned permutation; batched experts around a shared central
    tensor, gradients included (float64: the two differ only in the order of their sums)."""
    torch.manual_seed(5)
    w = torch.randn(math.prod(ins), math.prod(outs), dtype=torch.float64)
    tensors = mpo.decompose(w, ins, outs, bond)
    c = mpo.central_index(len(tensors))
    chain = [
        t if k == c else t.unsqueeze(0) + 0.1 * torch.randn(3, *t.shape, dtype=t.dtype) for k, t in enumerate(tensors)
    ]
    chain = [t.detach().requires_grad_() for t in chain]
    matrix, perm = mpo.permuted_product(chain, side)
    assert sorted(perm.tolist()) == list(range(len(perm)))
    full = mpo.contract(chain)
    want = full[:, perm, :] if side == "rows" else full[:, :, perm].transpose(-2, -1)
    torch.testing.assert_close(matrix, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(matrix)
    got = torch.autograd.grad(matrix, chain, g)
    expected = torch.autograd.grad(want, chain, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cheapest_layout_permutes_for_few_rows_per_expert_and_contracts_for_many():
    """768 x 3072 at bond 16: the W-sized reorders of `contract` cost 4 L I J; the permuted layouts cost a
    fraction of that plus 4 N I (rows) or 4 N J (cols)."""
    w_in = mpo.tensor_shapes(PAPER_IN, PAPER_OUT, bond_dim=16)
    w_out = mpo.tensor_shapes(PAPER_OUT, PAPER_IN, bond_dim=16)
    assert mpo.cheapest_layout(w_in, 8, 16384) == "rows"  # permute the 768-wide input, not the 3072-wide one
    assert mpo.cheapest_layout(w_out, 8, 16384) == "cols"  # permute the 768-wide output
    assert mpo.cheapest_layout(w_in, 8, 262144) == "contract"
    assert mpo.cheapest_layout(w_in, 64, 65536) == "rows"
    # 48 x 192 at bond 16 is nearly full rank: halves as large as W, nothing to save
    small = mpo.tensor_shapes(mpo.factorize(48), mpo.factorize(192), bond_dim=16)
    assert mpo.cheapest_layout(small, 64, 4096) == "contract"
