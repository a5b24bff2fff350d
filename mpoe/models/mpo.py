"""Matrix product operators (MPO): decompose a weight matrix, contract it back, count it.

Choices (the paper, Gao et al. COLING 2022, leaves them to us):

- Layout. A weight is stored in the ``x @ W`` layout, shape (I, J) with
  I = prod(in_factors), J = prod(out_factors); row index = (i_1, ..., i_n)
  and column index = (j_1, ..., j_n) in row-major order (i_1 slowest). The
  2n-way tensor's axes are permuted to (i_1, j_1, i_2, j_2, ..., i_n, j_n)
  and local tensor k has shape (d_{k-1}, i_k, j_k, d_k), d_0 = d_n = 1.
- Splitting. Sequential SVD left to right (TT-SVD): at split k the current
  matrix (d_{k-1} * i_k * j_k, rest) is factored, U becomes T_k and
  S @ Vh carries on to the right, so T_1..T_{n-1} are left-orthonormal and
  the last tensor carries the norm. The SVD runs in float64 and the result is
  cast back to the weight's dtype.
- Truncation. ``bond_dim`` caps *every* bond at the same value, keeping the
  largest singular values at each split; bonds are d_k = min(full_k, bond_dim)
  with full_k = min(prod_{m<=k} i_m j_m, prod_{m>k} i_m j_m), so shapes never
  depend on the data (a rank-deficient matrix keeps its zero singular values).
  The squared Frobenius error is bounded by the sum of the discarded squared
  singular values over all splits (Oseledets 2011), with equality when only one
  bond is truncated.
- Central tensor. The middle one, index n // 2: with n = 5 it holds the two
  largest bonds and so most parameters (92.7% for 768 x 3072 at full bonds).
- Applying. ``x @ W`` is computed either by contracting W (outer tensors first,
  the central one last, cut at the central tensor's smaller bond, so the
  expensive step is one product of size I*J*bond)
  then one GEMM with the tokens, or by pushing the tokens through the chain one
  tensor at a time. ``mpo_matmul`` picks whichever costs less for the actual
  number of tokens: FLOPs plus a weight for every element written, since the
  chain rewrites a tokens-sized state at each step and on a CPU that memory
  traffic, not FLOPs, decides (zero tokens -> the chain, which costs nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# The released code's factorisations (n = 5), plus T5-small's sizes.
PAPER_FACTORS = {
    512: [2, 4, 4, 4, 4],
    768: [3, 4, 4, 4, 4],
    1024: [4, 4, 4, 4, 4],
    2048: [4, 4, 8, 4, 4],
    3072: [4, 4, 8, 6, 4],
    4096: [4, 4, 8, 8, 4],
}


def central_index(n: int) -> int:
    return n // 2


def _check_factors(shape: Sequence[int], in_factors: Sequence[int], out_factors: Sequence[int]) -> None:
    if len(in_factors) != len(out_factors) or len(in_factors) < 1:
        raise ValueError(
            f"in_factors {list(in_factors)} and out_factors {list(out_factors)} must be non-empty and of equal length"
        )
    if tuple(shape) != (math.prod(in_factors), math.prod(out_factors)):
        raise ValueError(
            f"weight shape {tuple(shape)} does not match factors: prod({list(in_factors)}) = {math.prod(in_factors)}, "
            f"prod({list(out_factors)}) = {math.prod(out_factors)}"
        )


def full_bond_dims(in_factors: Sequence[int], out_factors: Sequence[int], bond_dim: Optional[int] = None) -> list[int]:
    """d_0..d_n: d_k = min(prod_{m<=k} i_m j_m, prod_{m>k} i_m j_m), capped by bond_dim."""
    _check_factors((math.prod(in_factors), math.prod(out_factors)), in_factors, out_factors)
    sizes = [i * j for i, j in zip(in_factors, out_factors)]
    n, dims = len(sizes), [1]
    for k in range(1, n):
        d = min(math.prod(sizes[:k]), math.prod(sizes[k:]))
        dims.append(d if bond_dim is None else min(d, bond_dim))
    return dims + [1]


def tensor_shapes(in_factors, out_factors, bond_dim=None) -> list[tuple[int, int, int, int]]:
    d = full_bond_dims(in_factors, out_factors, bond_dim)
    return [(d[k], i, j, d[k + 1]) for k, (i, j) in enumerate(zip(in_factors, out_factors))]


def mpo_num_params(in_factors, out_factors, bond_dim=None) -> int:
    return sum(math.prod(s) for s in tensor_shapes(in_factors, out_factors, bond_dim))


def central_num_params(in_factors, out_factors, bond_dim=None) -> int:
    return math.prod(tensor_shapes(in_factors, out_factors, bond_dim)[central_index(len(in_factors))])


def _tt_svd(weight: Tensor, in_factors, out_factors, bond_dim) -> tuple[list[Tensor], list[float]]:
    """The local tensors and, per split, the sum of discarded squared singular values."""
    _check_factors(weight.shape, in_factors, out_factors)
    if bond_dim is not None and bond_dim < 1:
        raise ValueError(f"bond_dim={bond_dim} must be >= 1 or None (full rank)")
    n = len(in_factors)
    w = weight.detach().to(torch.float64).reshape(*in_factors, *out_factors)
    w = w.permute(*[a for k in range(n) for a in (k, n + k)])
    dims = full_bond_dims(in_factors, out_factors, bond_dim)
    tensors, discarded, rest = [], [], w.reshape(-1)
    for k in range(n - 1):
        rows = dims[k] * in_factors[k] * out_factors[k]
        u, s, vh = torch.linalg.svd(rest.reshape(rows, -1), full_matrices=False)
        r = dims[k + 1]
        discarded.append(float((s[r:] ** 2).sum()))
        tensors.append(u[:, :r].reshape(dims[k], in_factors[k], out_factors[k], r))
        rest = s[:r, None] * vh[:r]
    tensors.append(rest.reshape(dims[n - 1], in_factors[-1], out_factors[-1], 1))
    return [t.to(weight.dtype).contiguous() for t in tensors], discarded


def decompose(
    weight: Tensor, in_factors: Sequence[int], out_factors: Sequence[int], bond_dim: Optional[int] = None
) -> list[Tensor]:
    """Split `weight` (I, J) into n local tensors (d_{k-1}, i_k, j_k, d_k) by sequential truncated SVD.

    A weight on the meta device gives meta tensors of the right shapes and no SVD
    (a dry run counts the parameters of models whose SVDs would take minutes).
    """
    if weight.is_meta:
        _check_factors(weight.shape, in_factors, out_factors)
        return [
            torch.empty(s, dtype=weight.dtype, device="meta") for s in tensor_shapes(in_factors, out_factors, bond_dim)
        ]
    return _tt_svd(weight, list(in_factors), list(out_factors), bond_dim)[0]


class TruncationError(NamedTuple):
    actual: float  # ||W - contract(decompose(W, bond_dim))||_F^2
    bound: float  # sum of the discarded squared singular values over all splits


def truncation_error(weight: Tensor, in_factors, out_factors, bond_dim) -> TruncationError:
    tensors, discarded = _tt_svd(weight, list(in_factors), list(out_factors), bond_dim)
    w = weight.detach().to(torch.float64)
    approx = contract([t.to(torch.float64) for t in tensors])
    return TruncationError(float(((w - approx) ** 2).sum()), sum(discarded))


def split_index(shapes: Sequence[Sequence[int]]) -> int:
    """Where `contract` cuts the chain in two: at the central tensor's smaller bond.

    The final product costs I*J*bond. On a tie (capped bonds are all equal) the
    cut whose two halves hold fewer elements wins: the halves are rebuilt, and
    reordered, every forward (for 768 x 3072 at bond 16 cutting right of the
    central tensor leaves halves of 6,528 x 16 elements instead of 12,480 x 16).
    """
    n, c = len(shapes), central_index(len(shapes))
    sizes = [s[1] * s[2] for s in shapes]
    candidates = [k for k in (c, c + 1) if 1 <= k <= n - 1]
    if not candidates:
        return n
    # min over (cost, k) tuples rather than min(..., key=lambda): torch 2.9's torch.compile cannot trace the latter
    return min([(shapes[k][0], math.prod(sizes[:k]) + math.prod(sizes[k:]), k) for k in candidates])[-1]


def _halves(tensors: Sequence[Tensor], split: int) -> tuple[Tensor, Optional[Tensor]]:
    """Left half as (..., i_1 j_1 ... i_s j_s, d_s) and right half as (..., d_s, i_s+1 j_s+1 ... i_n j_n).

    Outer tensors are merged first (they are small) and the central one last, so
    the only large product is the final one, (rows, d_s) @ (d_s, columns).
    Leading batch dims (e.g. local experts) broadcast.
    """
    n = len(tensors)
    mat = lambda t, rows: t.reshape(*t.shape[:-4], rows, -1)  # (..., rows, rest)
    left = mat(tensors[0], tensors[0].shape[-4] * tensors[0].shape[-3] * tensors[0].shape[-2])
    for t in tensors[1:split]:
        left = left @ mat(t, t.shape[-4])
        left = left.reshape(*left.shape[:-2], -1, t.shape[-1])
    if split == n:
        return left, None
    right = mat(tensors[n - 1], tensors[n - 1].shape[-4])  # (..., d_{n-1}, i_n j_n)
    for t in reversed(tensors[split : n - 1]):
        right = mat(t, t.shape[-4] * t.shape[-3] * t.shape[-2]) @ right
        right = right.reshape(*right.shape[:-2], t.shape[-4], -1)
    return left, right


def _ordered_halves(tensors: Sequence[Tensor], split: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The chain cut at `split` (default `split_index`), each half reordered while small.

    Halves: left (..., i_L, j_L, d), right (..., d, i_R, j_R).

    right is None when the chain has no cut (left is then the whole matrix, d = 1).
    """
    n = len(tensors)
    ins = [t.shape[-3] for t in tensors]
    outs = [t.shape[-2] for t in tensors]
    nl = split_index([t.shape[-4:] for t in tensors]) if split is None else split  # tensors in the left half
    il, jl, ir, jr = math.prod(ins[:nl]), math.prod(outs[:nl]), math.prod(ins[nl:]), math.prod(outs[nl:])
    left, right = _halves(tensors, nl)
    lb, d = left.shape[:-2], left.shape[-1]
    o = len(lb)
    left = left.reshape(*lb, *[a for k in range(nl) for a in (ins[k], outs[k])], d)
    left = left.permute(*range(o), *range(o, o + 2 * nl, 2), *range(o + 1, o + 2 * nl, 2), o + 2 * nl)
    left = left.reshape(*lb, il, jl, d)
    if right is None:
        return left, None
    nr, rb = n - nl, right.shape[:-2]
    o = len(rb)
    right = right.reshape(*rb, d, *[a for k in range(nl, n) for a in (ins[k], outs[k])])
    right = right.permute(*range(o + 1), *range(o + 1, o + 1 + 2 * nr, 2), *range(o + 2, o + 1 + 2 * nr, 2))
    return left, right.reshape(*rb, d, ir, jr)


def contract(tensors: Sequence[Tensor]) -> Tensor:
    """The matrix back: shape (prod i_k, prod j_k); tensors (..., d, i, j, d') with batch dims give (..., I, J).

    The two halves are reordered while small ((i_L, j_L, d) and (d, i_R, j_R)),
    so the only pass over the full matrix is one 4-D swap (j_L <-> i_R).
    """
    left, right = _ordered_halves(tensors)
    il, jl, d = left.shape[-3:]
    if right is None:
        return left.reshape(*left.shape[:-3], il, jl)
    ir, jr = right.shape[-2:]
    w = left.reshape(*left.shape[:-3], il * jl, d) @ right.reshape(*right.shape[:-3], d, ir * jr)
    b = w.shape[:-2]
    w = w.reshape(*b, il, jl, ir, jr).transpose(-3, -2)
    return w.reshape(*b, il * ir, jl * jr)


def split_halves(
    tensors: Sequence[Tensor], transposed: bool = False, split: Optional[int] = None
) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """The chain's two halves (cut at `split`, default `split_index`), shaped so that their product is W with
    its rows reordered; None if it has no cut.

    Returns (left (..., a, b, d), right (..., d, c, e), perm). The matrix
    M[(c, a), (b, e)] = sum_d left[a, b, d] * right[d, c, e], built as c products
    of (a*b, d) @ (d, e) written side by side (`experts.loop_ops.per_expert_mpo_linear`
    does so expert by expert), needs no pass that reorders it:
      transposed=False: a, b, c, e = i_L, j_L, i_R, j_R; M is W with row r = W's row perm[r],
                        so x @ W = x[:, perm] @ M.
      transposed=True:  a, b, c, e = j_L, i_L, j_R, i_R; M is W^T with row r = W's column perm[r],
                        so (x @ W)[:, perm] = x @ M^T.
    (`contract` instead forms (i_L, j_L) x (i_R, j_R) and then swaps j_L <-> i_R: one more
    read and write of W in forward and of grad W in backward.)
    """
    left, right = _ordered_halves(tensors, split)
    if right is None:
        return None
    if transposed:  # the same product for W^T: swap the roles of i and j
        left, right = left.transpose(-3, -2), right.transpose(-2, -1)
    a, c = left.shape[-3], right.shape[-2]
    return left, right, torch.arange(a * c, device=left.device).view(a, c).t().flatten()


def _cut_sizes(shapes: Sequence[Sequence[int]], k: int) -> tuple[int, int, int, int, int]:
    """(i_L, j_L, i_R, j_R, d) of the chain cut before tensor k (lists in math.prod: torch.compile cannot
    trace a generator there)."""
    i_l, j_l = math.prod([s[1] for s in shapes[:k]]), math.prod([s[2] for s in shapes[:k]])
    i_r, j_r = math.prod([s[1] for s in shapes[k:]]), math.prod([s[2] for s in shapes[k:]])
    return i_l, j_l, i_r, j_r, shapes[k][0]


def permuted_split(shapes: Sequence[Sequence[int]], side: str) -> tuple[int, int]:
    """(cut, elements moved per chain) for `permuted_product`, at the cut that moves the fewest.

    The left half (i_L, j_L, d) is copied once per i_R index ('rows': I * j_L * d elements) or
    per j_R index ('cols': J * i_L * d), written in forward, written and summed in backward: 3x.
    Each half is built, reordered and made contiguous for the product, forward and backward: 8x."""
    best = None
    for k in range(1, len(shapes)):
        i_l, j_l, i_r, j_r, d = _cut_sizes(shapes, k)
        copy = i_l * i_r * j_l * d if side == "rows" else j_l * j_r * i_l * d
        cost = (3 * copy + 8 * (i_l * j_l * d + d * i_r * j_r), k)
        best = cost if best is None else min(best, cost)
    if best is None:
        raise ValueError("a chain of one tensor has no cut: use num_mpo_factors >= 2")
    return best[1], best[0]


def permuted_product(tensors: Sequence[Tensor], side: str) -> tuple[Tensor, Tensor]:
    """W with its rows ('rows') or columns ('cols') reordered, built by one broadcast matmul and no pass over W.

    `contract` forms (i_L, j_L) x (i_R, j_R) and then swaps j_L <-> i_R: a read and a
    write of all of W (and of grad W in backward). `split_halves`' M, formed as one
    matmul batched over c with the small left half broadcast, is written with its
    rows already in (c, a) order: W with its rows permuted ('rows'), or W^T with its
    rows permuted ('cols', i and j swapped). Returns (matrix, perm), matrix with
    leading batch dims:
      'rows': M [..., I, J] = W[perm, :],       so x @ W = x[:, perm] @ M;
      'cols': Mt [..., J, I] = W[:, perm]^T,    so (x @ W)[:, perm] = x @ Mt^T.
    """
    split, _ = permuted_split([t.shape[-4:] for t in tensors], side)
    left, right, perm = split_halves(tensors, transposed=side == "cols", split=split)
    a, b, d = left.shape[-3:]
    c, e = right.shape[-2:]
    batched_left = left.reshape(*left.shape[:-3], 1, a * b, d)  # broadcast over c by matmul
    m = torch.matmul(batched_left, right.transpose(-3, -2))  # (..., c, a * b, e)
    return m.reshape(*m.shape[:-3], c * a, b * e), perm


def cheapest_layout(shapes: Sequence[Sequence[int]], copies: int, num_rows: int) -> str:
    """How to hand `copies` stacked chains (one per local expert) to a grouped GEMM over `num_rows` rows, by the
    elements moved besides the GEMMs, forward and backward:
    - 'contract' (`contract`): W in order; its j_L <-> i_R reorder reads and writes all of W in forward
      and all of grad W in backward (4 I J), and its halves are reordered both ways (4x their size).
    - 'rows' / 'cols' (`permuted_product`): no pass over W (`permuted_split`'s elements instead), and
      the rows' input (output) columns permuted, forward and backward: 4 num_rows I (J).
    Few rows per expert, where the W-sized passes dominate, take a permuted layout; so do chains whose
    halves are small against W (bonds capped well below their full size)."""
    d_in, d_out = math.prod([s[1] for s in shapes]), math.prod([s[2] for s in shapes])
    if len(shapes) == 1:
        return "contract"
    i_l, j_l, i_r, j_r, d = _cut_sizes(shapes, split_index(shapes))
    costs = [(copies * (4 * d_in * d_out + 4 * d * (i_l * j_l + i_r * j_r)), "contract")]
    for side, width in (("rows", d_in), ("cols", d_out)):
        costs.append((copies * permuted_split(shapes, side)[1] + 4 * num_rows * width, side))
    return min(costs)[1]


def apply_chain(x: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """x @ W without forming W: push x (N, I) through the chain one local tensor at a time."""
    n_tokens, i_left, j_done = x.shape[0], x.shape[1], 1
    state = x.reshape(n_tokens, 1, 1, i_left)  # (N, J done, bond, I left)
    for t in tensors:
        r, a, j, e = t.shape
        i_left //= a
        state = state.reshape(n_tokens, j_done, r, a, i_left)
        state = torch.einsum("npraB,raje->npjeB", state, t)
        j_done *= j
        state = state.reshape(n_tokens, j_done, e, i_left)
    return state.reshape(n_tokens, j_done)


def matmul_flops(n_tokens: int, shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(contract W then GEMM, push tokens through the chain) multiply-add FLOPs, forward."""
    n, s = len(shapes), split_index(shapes)
    ins, outs = [sh[1] for sh in shapes], [sh[2] for sh in shapes]
    d = [sh[0] for sh in shapes] + [1]
    merge, rows, cols = 0, 1, 1
    for k in range(s):  # left half, left to right
        merge += rows * d[k] * ins[k] * outs[k] * d[k + 1]
        rows *= ins[k] * outs[k]
    for k in range(n - 1, s - 1, -1):  # right half, right to left
        merge += d[k] * ins[k] * outs[k] * cols * d[k + 1]
        cols *= ins[k] * outs[k]
    if s < n:
        merge += rows * d[s] * cols
    dense = merge + n_tokens * math.prod(ins) * math.prod(outs)
    chain = sum(
        n_tokens * math.prod(outs[:k]) * math.prod(ins[k + 1 :]) * d[k] * ins[k] * outs[k] * d[k + 1] for k in range(n)
    )
    return 2 * dense, 2 * chain


# One element written to memory costs about as much time as this many FLOPs on a CPU (a
# default for `mpo_matmul`; the expert banks' loop backend sets its own, `experts.loop.POLICY`).
# Pure FLOP counts favour the chain path, whose every step rewrites a tokens-sized state.
MEMORY_COST = 100


def matmul_costs(
    n_tokens: int, shapes: Sequence[Sequence[int]], weight_passes: int = 3, memory_cost: float = MEMORY_COST
) -> tuple[float, float]:
    """(dense, chain) cost in FLOP-equivalents: FLOPs + memory_cost x elements written.

    weight_passes: full-size writes of W the dense path pays per step: 3 for `mpo_matmul`
    (W, its reordering pass, and grad W under autograd), 1 for the expert banks'
    `experts.loop_ops.per_expert_mpo_linear` (W once; grad W stays in a reused buffer).
    memory_cost: FLOP-equivalents per element written (machine-dependent; see MEMORY_COST).
    """
    dense_flops, chain_flops = matmul_flops(n_tokens, shapes)
    n = len(shapes)
    ins, outs = [s[1] for s in shapes], [s[2] for s in shapes]
    d = [s[0] for s in shapes] + [1]
    dense_writes = weight_passes * math.prod(ins) * math.prod(outs) + n_tokens * math.prod(outs)
    chain_writes = sum(2 * n_tokens * math.prod(outs[: k + 1]) * math.prod(ins[k + 1 :]) * d[k + 1] for k in range(n))
    return dense_flops + memory_cost * dense_writes, chain_flops + memory_cost * chain_writes


def mpo_matmul(x: Tensor, tensors: Sequence[Tensor], method: str = "auto", bias: Optional[Tensor] = None) -> Tensor:
    """x (N, I) @ W (I, J) (+ bias), W given by its local tensors; method 'auto' | 'dense' | 'chain'."""
    if method == "auto":
        dense, chain = matmul_costs(x.shape[0], [t.shape for t in tensors])
        method = "chain" if chain < dense else "dense"
    if method == "dense":
        w = contract(tensors)
        return x @ w if bias is None else torch.addmm(bias, x, w)
    if method == "chain":
        y = apply_chain(x, tensors)
        return y if bias is None else y + bias
    raise ValueError(f"method={method!r}: use 'auto', 'dense' or 'chain'")


def factorize(dim: int, n: int = 5) -> list[int]:
    """n factors of dim: the paper's for its sizes, else balanced with the largest in the middle."""
    if dim < 1 or n < 1:
        raise ValueError(f"factorize(dim={dim}, n={n}): both must be >= 1")
    if n == 5 and dim in PAPER_FACTORS:
        return list(PAPER_FACTORS[dim])
    primes, rest, p = [], dim, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    bins = [1] * n
    for q in sorted(primes, reverse=True):  # largest prime into the smallest bin
        bins[bins.index(min(bins))] *= q
    ordered = sorted(bins, reverse=True)
    out = [0] * n
    c, step = central_index(n), 0
    positions = [c]
    while len(positions) < n:  # centre, then outwards right/left
        step += 1
        for pos in (c + step, c - step):
            if 0 <= pos < n and len(positions) < n:
                positions.append(pos)
    for pos, f in zip(positions, ordered):
        out[pos] = f
    return out
