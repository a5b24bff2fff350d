"""The sync-free dispatch path (ep_size 1 on CUDA) computes what the exact path computes; importing is inert.

The sync-free path lists tokens * top_k dispatch rows whatever was dropped; rows of
dropped pairs go to the last expert with gate weight 0. Run here on the CPU (forced),
with capacity dropping and dropless, Switch and MPOE, with both expert backends:
outputs, the input's and every parameter's gradients equal the exact path's with
the loop backend (today's CPU code).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from mpoe.config import MoEConfig
from mpoe.models.experts import resolve_expert_backends
from mpoe.models.moe_builder import build_moe_layer
from mpoe.parallel.expert_placement import ExpertPlacement

D_MODEL, D_FF = 16, 32

CASES = {
    "switch_top2_capacity": dict(kind="switch", num_experts=4, top_k=2, capacity_factor=1.0),
    "switch_top1_dropless": dict(kind="switch", num_experts=4, top_k=1),
    "mpoe_top1_capacity": dict(kind="mpoe", num_experts=4, top_k=1, capacity_factor=0.5, aux_init_noise=0.2),
}


def _step(layer, x, w):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    ((out * w).sum() + layer.stats.aux_loss).backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("case", list(CASES))
def test_sync_free_dispatch_equals_exact_dispatch(case, impl):
    torch.manual_seed(0)
    exact = build_moe_layer(MoEConfig(**CASES[case], expert_impl="loop"), D_MODEL, D_FF, "gelu_new", ExpertPlacement())
    free = copy.deepcopy(exact)
    free.dispatcher.sync_free = True
    free.bank.use_impl(impl)
    x, w = torch.randn(24, D_MODEL), torch.randn(24, D_MODEL)
    (out_e, gx_e, grads_e), (out_f, gx_f, grads_f) = _step(exact, x, w), _step(free, x, w)
    if "capacity" in case:
        assert free.stats.tokens_dropped > 0  # the padding rows are exercised
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_e, rtol=1e-5, atol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_sync_free_dispatch_rows_and_counts():
    """tokens * top_k rows; counts on the rows' device, summing to them; padding on the last expert only."""
    from mpoe.parallel.dispatch import AllToAllDispatcher

    d = AllToAllDispatcher(3, ExpertPlacement(), top_k=2, sync_free=True)
    tokens = torch.arange(4.0).unsqueeze(1).repeat(1, 2)  # token i is [i, i]
    routing = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]]).bool()  # 5 kept pairs of 8
    probs = routing * 0.5
    rows, counts = d.dispatch(tokens, probs, routing)
    assert isinstance(counts, torch.Tensor) and counts.tolist() == [2, 2, 4]
    assert rows[:, 0].tolist() == [0, 2, 0, 1, 2, 0, 0, 0]  # by expert, then token; 3 padding rows (zeros)
    out = d.combine(rows * 10)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [5.0, 5.0], [20.0, 20.0], [0.0, 0.0]]))
    assert d.stats.routed_tokens == 5


def test_padding_rows_that_would_overflow_leave_no_nan():
    """A padding row is zeros, not a copy of token 0: token 0 through the last expert (which the router did not
    choose for it) overflows to inf here, and 0 * inf would put a NaN in token 0's output and the gradients."""
    from mpoe.parallel.dispatch import AllToAllDispatcher

    d = AllToAllDispatcher(3, ExpertPlacement(), top_k=1, sync_free=True)
    tokens = torch.tensor([[1e10, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], requires_grad=True)
    routing = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]]).bool()  # token 3 dropped: 1 padding row
    probs = (routing * 0.5).requires_grad_()
    scale = torch.tensor([1.0, 1.0, 1e30], requires_grad=True)  # the last expert's output overflows for token 0
    rows, counts = d.dispatch(tokens, probs, routing)
    out = d.combine(rows * scale.repeat_interleave(counts).unsqueeze(1))
    out.sum().backward()
    expected = torch.tensor([[5e9, 0.5], [1.0, 1.5], [2.0, 2.5], [0.0, 0.0]])
    torch.testing.assert_close(out.detach(), expected)
    for grad in (tokens.grad, probs.grad, scale.grad):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("impl, sync_free", [("loop", False), ("grouped", True)])
def test_the_dispatcher_reads_the_host_only_where_the_expert_backend_does(impl, sync_free, monkeypatch):
    """The path follows the backend chosen when the bank was placed, not the rows' device: the grouped backend
    takes its counts on the device, so dispatch does too (here on the CPU); the loop backend reads them anyway."""
    torch.manual_seed(0)
    layer = build_moe_layer(
        MoEConfig(kind="mpoe", num_experts=4, expert_impl=impl), D_MODEL, D_FF, "gelu_new", ExpertPlacement()
    )
    counted = []
    original = type(layer.dispatcher)._dispatch_local_counted
    monkeypatch.setattr(
        type(layer.dispatcher), "_dispatch_local_counted", lambda d, *a: counted.append(1) or original(d, *a)
    )
    layer(torch.randn(24, D_MODEL))
    assert layer.bank.counts_on_device is sync_free
    assert counted == ([] if sync_free else [1])


def test_importing_dispatch_changes_no_warning_filter():
    # Its imports first: what torch or expert_placement.py do at import time is not dispatch.py's doing (torch._dynamo,
    # which torch.compiler.disable imports, adds a filter for sympy's deprecation warnings).
    code = (
        "import warnings, torch._dynamo, torch.distributed._functional_collectives, mpoe.parallel.expert_placement; "
        "before = list(warnings.filters); "
        "import mpoe.parallel.dispatch; assert warnings.filters == before, 'dispatch changed the warning filters'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
    reason="moe.expert_impl=auto is the grouped backend from sm90 (below, torch's grouped GEMM reads the host)",
)
@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_gpu_dispatch_bank_combine_run_without_host_sync(kind):
    """ep_size 1 on CUDA, bf16, capacity dropping: router -> dispatch -> grouped bank -> combine, with the
    router's losses, fwd+bwd, never syncs (its statistics stay on the device until the loop reads them)."""
    torch.manual_seed(0)
    cfg = MoEConfig(kind=kind, num_experts=8, top_k=2, capacity_factor=1.0)
    layer = build_moe_layer(cfg, 64, 128, "gelu_new", ExpertPlacement()).cuda().to(torch.bfloat16)
    resolve_expert_backends(layer)  # moe.expert_impl=auto: grouped for bf16 from sm90
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = layer(x)
        (out.float().pow(2).sum() + layer.stats.aux_loss + layer.stats.z_loss).backward()

    step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.bank.backend.name == "grouped"
