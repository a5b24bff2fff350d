"""Expert backends: `grouped` (one grouped GEMM per weight, counts on the device) computes what `loop` computes.

For Switch and MPOE banks, plain and gated FFNs, with and without biases, with idle
experts and with every row on one expert: outputs and every parameter's and the
input's gradients equal the loop backend's. grouped_mm has no float64 kernel, so the
comparison is in float32 with a tight tolerance (both sides run the same GEMMs in a
different grouping); float64 takes the documented fallback and is checked too.
"""

import copy
import functools

import pytest
import torch

from mpoe.config import MoEConfig
from mpoe.models.experts import DenseFFN, MPOEExperts, build_expert_bank
from mpoe.models.experts import grouped as grouped_backend
from mpoe.models.experts.grouped import GROUPED_MM, grouped_mm_fits
from mpoe.parallel.expert_placement import ExpertPlacement

D_MODEL, D_FF = 16, 32  # row strides 16-byte aligned in float32 and bfloat16, as grouped_mm requires
COUNTS = {
    "mixed": [5, 0, 9, 2],
    "one_expert": [0, 0, 16, 0],
    "first_idle_last_busy": [0, 3, 0, 13],
}
needs_grouped_mm = pytest.mark.skipif(GROUPED_MM is None, reason="this torch has no grouped_mm")


def _banks(kind: str, gated: bool, bias: bool, dtype=torch.float32, bond_dim=None):
    torch.manual_seed(0)
    dense = DenseFFN.random(D_MODEL, D_FF, gated=gated, bias=bias, std=0.3)
    if bias:  # non-zero biases, so that a bias added to the wrong rows shows
        dense.b_in.normal_(std=0.3)
        dense.b_out.normal_(std=0.3)
    activation = "gated-gelu" if gated else "gelu_new"
    cfg = MoEConfig(kind=kind, num_experts=4, bond_dim=bond_dim, aux_init_noise=0.3, expert_impl="loop")
    loop = build_expert_bank(cfg, D_MODEL, D_FF, activation, ExpertPlacement(), dense).to(dtype)
    if kind == "switch":  # distinct experts
        with torch.no_grad():
            for p in loop.parameters():
                p.add_(0.1 * torch.randn_like(p))
    grouped = copy.deepcopy(loop)
    grouped.use_impl("grouped")
    return loop, grouped


def _hold_layout(bank, layout: str) -> None:
    """Fix an MPOE bank's grouped layout (contract | rows | cols), which `mpo.cheapest_layout` picks by size;
    '' leaves the choice to it."""
    if layout:
        bank.grouped_weight = functools.partial(MPOEExperts.grouped_weight, bank, layout=layout)


def _run(bank, x, counts):
    x = x.detach().clone().requires_grad_()
    out = bank(x, counts)
    # drawn on the CPU (a CPU generator cannot fill a CUDA tensor) in float32, then moved: the same g on every device
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in bank.named_parameters()}


def _assert_same(loop_result, grouped_result, rel: float):
    """Equal up to rounding: elementwise within rel of the tensor's largest entry (sums run in another order)."""
    (out_l, gx_l, grads_l), (out_g, gx_g, grads_g) = loop_result, grouped_result
    pairs = {"output": (out_g, out_l), "grad x": (gx_g, gx_l)}
    assert grads_g.keys() == grads_l.keys()
    pairs.update({name: (grads_g[name], grads_l[name]) for name in grads_l})
    for name, (got, want) in pairs.items():
        assert got is not None, name
        scale = float(want.abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=0, atol=rel * max(scale, 1e-3), msg=lambda m, n=name: f"{n}: {m}")


@needs_grouped_mm
@pytest.mark.parametrize("counts", list(COUNTS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_grouped_equals_loop(kind, gated, bias, counts, monkeypatch):
    loop, grouped = _banks(kind, gated, bias)
    c = COUNTS[counts]
    x = torch.randn(sum(c), D_MODEL)
    calls = []
    monkeypatch.setattr(grouped_backend, "GROUPED_MM", lambda *a, **k: calls.append(1) or GROUPED_MM(*a, **k))
    monkeypatch.setattr(grouped_backend, "per_expert_linear", None)  # the fallback must not be taken here
    result = _run(grouped, x, torch.tensor(c))
    assert len(calls) == (3 if gated else 2)  # one grouped GEMM per weight matrix
    _assert_same(_run(loop, x, c), result, rel=1e-5)


@needs_grouped_mm
@pytest.mark.parametrize("counts", list(COUNTS))
@pytest.mark.parametrize("layout", ["contract", "rows", "cols"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_grouped_mpoe_equals_loop_in_every_layout(gated, layout, counts, monkeypatch):
    """Whichever layout `mpo.cheapest_layout` would pick: W in order, or rebuilt with its rows (columns)
    reordered and the rows' input (output) columns permuted to match."""
    loop, grouped = _banks("mpoe", gated, bias=True)
    used = []

    def forced(name, num_rows):
        weight = MPOEExperts.grouped_weight(grouped, name, num_rows, layout)
        used.append((weight.in_perm is not None, weight.out_perm is not None))
        return weight

    monkeypatch.setattr(grouped, "grouped_weight", forced)
    c = COUNTS[counts]
    x = torch.randn(sum(c), D_MODEL)
    result = _run(grouped, x, torch.tensor(c))
    assert set(used) == {{"contract": (False, False), "rows": (True, False), "cols": (False, True)}[layout]}
    _assert_same(_run(loop, x, c), result, rel=1e-5)


class _StrayGradients(torch.autograd.Function):
    """grouped_mm as pytorch#172439 reports it on Blackwell: right outputs, and weight gradients of groups
    without rows that are not zero."""

    @staticmethod
    def forward(ctx, x, weight, offs):
        ctx.save_for_backward(offs)
        with torch.enable_grad():
            x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
            out = GROUPED_MM(x_, w_, offs=offs)
        ctx.graph = (x_, w_, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        (offs,) = ctx.saved_tensors
        x_, w_, out = ctx.graph
        gx, gw = torch.autograd.grad(out, (x_, w_), grad)
        idle = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
        return gx, gw + 7.0 * idle.to(gw.dtype)[:, None, None], None


@needs_grouped_mm
@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_on_a_gpu_whose_grouped_mm_gives_idle_experts_gradients_they_get_zero(kind, monkeypatch):
    """On such a GPU (the check is faked here; the kernel's stray gradients too), the grouped bank still gives
    what the loop backend gives: idle experts' weights get zero gradients."""
    loop, grouped = _banks(kind, gated=False, bias=True)
    c = COUNTS["first_idle_last_busy"]
    x = torch.randn(sum(c), D_MODEL)
    monkeypatch.setattr(grouped_backend, "GROUPED_MM", lambda x, w, offs: _StrayGradients.apply(x, w, offs))
    stray = _run(grouped, x, torch.tensor(c))
    with pytest.raises(AssertionError):  # the fake kernel does spoil the gradients
        _assert_same(_run(loop, x, c), stray, rel=1e-5)
    monkeypatch.setattr(grouped_backend, "stray_gradients_for_idle_experts", lambda x: True)
    loop.zero_grad(set_to_none=True)
    grouped.zero_grad(set_to_none=True)
    _assert_same(_run(loop, x, c), _run(grouped, x, torch.tensor(c)), rel=1e-5)


@pytest.mark.parametrize("kind", ["switch", "mpoe", "mpoe:rows", "mpoe:cols"])
def test_grouped_float64_falls_back_and_still_equals_loop(kind):
    """The loop op takes the permuted layouts' matrices too (a transposed view for 'cols')."""
    kind, _, layout = kind.partition(":")
    loop, grouped = _banks(kind, gated=False, bias=True, dtype=torch.float64)
    _hold_layout(grouped, layout)
    c = COUNTS["mixed"]
    x = torch.randn(sum(c), D_MODEL, dtype=torch.float64)
    assert not grouped_mm_fits(x, loop.stacked_weight("w_in"))
    _assert_same(_run(loop, x, c), _run(grouped, x, torch.tensor(c)), rel=1e-12)


@needs_grouped_mm
def test_grouped_backward_takes_an_expanded_gradient():
    """out.sum().backward() hands the last grouped GEMM a stride-0 gradient, which grouped_mm rejects as it is."""
    loop, grouped = _banks("switch", gated=False, bias=False)
    c = torch.tensor(COUNTS["mixed"])
    x = torch.randn(int(c.sum()), D_MODEL)
    grouped(x, c).sum().backward()
    loop(x, c).sum().backward()
    torch.testing.assert_close(grouped.w_out.grad, loop.w_out.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_grouped_with_no_rows_gives_zero_gradients(kind):
    _, grouped = _banks(kind, gated=True, bias=True)
    x = torch.zeros(0, D_MODEL, requires_grad=True)
    out = grouped(x, torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, D_MODEL)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in grouped.parameters())


def test_grouped_mpoe_central_gradient_is_summed_over_experts():
    """Independent truth: the central tensor's gradient is the sum of what each expert alone would give."""
    _, bank = _banks("mpoe", gated=False, bias=False)
    c = COUNTS["mixed"]
    x = torch.randn(sum(c), D_MODEL)
    bank(x, torch.tensor(c)).pow(2).sum().backward()
    total = {n: p.grad.clone() for n, p in bank.central.items()}
    per_expert = {n: torch.zeros_like(g) for n, g in total.items()}
    for e, xe in enumerate(x.split(c)):
        bank.zero_grad(set_to_none=True)
        only = [n if k == e else 0 for k, n in enumerate(c)]
        bank(xe, torch.tensor(only)).pow(2).sum().backward()
        for n, p in bank.central.items():
            per_expert[n] += p.grad
    for n in total:  # float32 sums in another order: an entry near 0 may differ by a few 1e-6
        torch.testing.assert_close(total[n], per_expert[n], rtol=1e-4, atol=1e-5)


def test_expert_impl_auto_is_loop_on_cpu_and_bad_impl_is_one_line():
    loop, _ = _banks("switch", gated=False, bias=True)
    assert loop.use_impl("auto") == "loop, fp32, cpu" and loop.backend.name == "loop"
    with pytest.raises(ValueError, match="moe.expert_impl='fused' is invalid: use one of auto, loop, grouped"):
        loop.use_impl("fused")


def test_grouped_rejects_counts_of_the_wrong_length():
    _, grouped = _banks("switch", gated=False, bias=True)
    with pytest.raises(ValueError, match="4 integer counts"):
        grouped(torch.zeros(3, D_MODEL), torch.tensor([3, 0]))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-6))


@needs_grouped_mm
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])], ids=["cpu", "cuda"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("kind", ["switch", "mpoe:contract", "mpoe:rows", "mpoe:cols"])
def test_grouped_bf16_matches_fp32_loop_without_host_sync(kind, gated, device):
    """In bf16, the grouped bank (MPOE: in each of its layouts) matches the fp32 loop backend within bf16's
    precision, as a relative norm: bf16 storage of the weights and rows alone puts single elements of a gated
    FFN several percent off. On CUDA it runs fwd+bwd without a device-to-host sync."""
    kind, _, layout = kind.partition(":")
    loop, grouped = _banks(kind, gated, bias=True)
    loop, grouped = loop.to(device), grouped.to(device, torch.bfloat16)
    _hold_layout(grouped, layout)
    c = [40, 0, 100, 16]
    x = torch.randn(sum(c), D_MODEL, device=device)
    counts = torch.tensor(c, device=device)
    expected = _run(loop, x, c)
    xb = x.to(torch.bfloat16).requires_grad_()
    if device == "cuda":
        grouped(xb, counts).float().pow(2).sum().backward()  # warm-up: first calls initialise kernels, cuBLAS
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = grouped(xb, counts)
            out.float().pow(2).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        grouped.zero_grad(set_to_none=True)  # the comparison below must see one backward's gradients
    out, gx, grads = _run(grouped, xb, counts)
    assert _relative_error(out, expected[0]) < 2e-2
    assert _relative_error(gx, expected[1]) < 2e-2
    for name, g in grads.items():
        assert _relative_error(g, expected[2][name]) < 3e-2, name
    for p in grouped.param_roles().per_expert():  # expert 1 had no rows: exactly zero (Blackwell: the guard's work)
        assert not p.grad[1].any()


@needs_grouped_mm
@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_linear_seam_is_the_same_in_both_backends(kind):
    """ExpertBank.linear, one weight for all local experts, agrees between backends (counts as list or tensor)."""
    loop, grouped = _banks(kind, gated=True, bias=True)
    c = COUNTS["mixed"]
    x = torch.randn(sum(c), D_MODEL)
    with torch.no_grad():
        for name in ("w_in", "w_gate"):
            torch.testing.assert_close(grouped.linear(x, torch.tensor(c), name), loop.linear(x, c, name))
        h = torch.randn(sum(c), D_FF)
        torch.testing.assert_close(grouped.linear(h, c, "w_out"), loop.linear(h, torch.tensor(c), "w_out"))
