"""`moe.recompute_mpo_weights`: the MPOE bank's grouped backend keeps no rebuilt W from forward, and computes what
it computes without the option, bit for bit (the same ops on the same values, the rebuild run once more)."""

import copy
import functools

import pytest
import torch

from mpoe.config import ConfigError, MoEConfig
from mpoe.models.experts import DenseFFN, MPOEExperts, build_expert_bank
from mpoe.models.experts.grouped import GROUPED_MM
from mpoe.parallel.expert_placement import ExpertPlacement

pytestmark = pytest.mark.skipif(GROUPED_MM is None, reason="this torch has no grouped_mm")
D_MODEL, D_FF = 16, 32


def _bank(gated: bool, bias: bool, dtype: torch.dtype, bond_dim=None, d_model=D_MODEL, d_ff=D_FF):
    torch.manual_seed(0)
    dense = DenseFFN.random(d_model, d_ff, gated=gated, bias=bias, std=0.3)
    if bias:
        dense.b_in.normal_(std=0.3)
        dense.b_out.normal_(std=0.3)
    cfg = MoEConfig(kind="mpoe", num_experts=4, bond_dim=bond_dim, aux_init_noise=0.3, expert_impl="grouped")
    activation = "gated-gelu" if gated else "gelu_new"
    return build_expert_bank(cfg, d_model, d_ff, activation, ExpertPlacement(), dense).to(dtype)


def _run(bank, x, counts):
    x = x.detach().clone().requires_grad_()
    out = bank(x, counts)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * g).sum().backward()
    return [out.detach(), x.grad] + [p.grad for _, p in sorted(bank.named_parameters())]


@pytest.mark.parametrize("layout", ["", "contract", "rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gated, bias", [(False, True), (True, False)], ids=["plain-bias", "gated-nobias"])
def test_recomputed_weights_give_the_same_outputs_and_gradients_bit_for_bit(layout, dtype, gated, bias):
    kept = _bank(gated, bias, dtype, bond_dim=3)
    recomputed = copy.deepcopy(kept)
    recomputed.recompute_weights = True
    for bank in (kept, recomputed):
        if layout:
            bank.grouped_weight = functools.partial(MPOEExperts.grouped_weight, bank, layout=layout)
    counts = torch.tensor([5, 0, 9, 2])  # an idle expert too
    x = torch.randn(16, D_MODEL).to(dtype)
    for want, got in zip(_run(kept, x, counts), _run(recomputed, x, counts)):
        assert got is not None and torch.equal(got, want)


def _net_forward_bytes(bank, x, counts) -> int:
    """Bytes a forward leaves allocated (what autograd keeps for backward, plus the output)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = bank(x, counts)  # held until counted: with it, the graph and what it keeps would be freed
    kept = sum(event.self_cpu_memory_usage for event in prof.events())
    del out
    return kept


@pytest.mark.parametrize("rows_per_expert, bias", [(2, False), (512, True)])
def test_recomputed_weights_are_not_kept_from_forward(rows_per_expert, bias):
    """A forward keeps at least each matrix's rebuilt W ([L, I, J]) without the option, and with it less by more
    than that: nothing else is kept instead (with many rows per expert, say, the GEMM outputs before the bias)."""
    kept = _bank(gated=False, bias=bias, dtype=torch.bfloat16, d_model=64, d_ff=256)  # full bond
    recomputed = copy.deepcopy(kept)
    recomputed.recompute_weights = True
    counts = torch.full((4,), rows_per_expert)
    x = torch.randn(4 * rows_per_expert, 64, dtype=torch.bfloat16, requires_grad=True)
    w_bytes = 4 * 64 * 256 * 2  # one matrix's W, all local experts, bf16
    with_w, without_w = _net_forward_bytes(kept, x, counts), _net_forward_bytes(recomputed, x, counts)
    assert with_w >= 2 * w_bytes
    assert without_w < with_w - 2 * w_bytes


class _CountGroupedMM(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten._grouped_mm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["contract", "rows", "cols"])
def test_backward_recomputes_the_weights_but_not_the_gemms(layout):
    """fwd + bwd runs grouped_mm 3 times per matrix (forward, grad x, grad W) with the option as without it."""
    calls = []
    for recompute in (False, True):
        bank = _bank(gated=False, bias=True, dtype=torch.bfloat16, bond_dim=3)
        bank.recompute_weights = recompute
        bank.grouped_weight = functools.partial(MPOEExperts.grouped_weight, bank, layout=layout)
        with _CountGroupedMM() as mode:
            _run(bank, torch.randn(16, D_MODEL).to(torch.bfloat16), torch.tensor([5, 0, 9, 2]))
        calls.append(mode.calls)
    assert calls == [6, 6]


def test_recompute_is_an_option_of_mpoes_grouped_backend():
    with pytest.raises(ConfigError, match="moe.recompute_mpo_weights.*moe=mpoe"):
        MoEConfig(kind="switch", recompute_mpo_weights=True)
    with pytest.raises(ConfigError, match="moe.recompute_mpo_weights.*expert_impl=grouped or auto"):
        MoEConfig(kind="mpoe", expert_impl="loop", recompute_mpo_weights=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_recomputed_weights_match_bit_for_bit_and_lower_the_peak():
    """bf16 on CUDA, the shape of GPT-2 small's experts: the same numbers, and a forward + backward whose peak
    memory holds less than the kept W of both matrices over again."""
    kept = _bank(gated=False, bias=True, dtype=torch.bfloat16, d_model=768, d_ff=3072).cuda()
    recomputed = copy.deepcopy(kept)
    recomputed.recompute_weights = True
    counts = torch.full((4,), 512, device="cuda")
    x = torch.randn(2048, 768, device="cuda", dtype=torch.bfloat16)
    peaks, results = [], []
    for bank in (kept, recomputed, kept, recomputed):  # the second round: the allocator and kernels warm
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(_run(bank, x, counts))
        peaks.append(torch.cuda.max_memory_allocated() - base)
        bank.zero_grad(set_to_none=True)
    for want, got in zip(results[2], results[3]):
        assert torch.equal(got, want)
    w_bytes = 4 * 768 * 3072 * 2
    assert peaks[3] < peaks[2] - w_bytes


def test_a_compiled_bank_recomputes_to_the_same_numbers():
    """torch.compile (aot_eager: AOTAutograd's partition of the checkpointed region, without inductor's minutes of
    C++ compiling on a CPU) gives eager's values and gradients, bit for bit, in one graph."""
    torch._dynamo.reset()
    eager = _bank(gated=True, bias=True, dtype=torch.bfloat16, bond_dim=3)
    eager.recompute_weights = True
    compiled = copy.deepcopy(eager)
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager", fullgraph=True)
    counts, x = torch.tensor([5, 0, 9, 2]), torch.randn(16, D_MODEL).to(torch.bfloat16)
    for want, got in zip(_run(eager, x, counts), _run(compiled, x, counts)):
        assert torch.equal(got, want)
