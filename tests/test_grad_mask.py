"""Gradient mask: statistics, targets, replica-identical masks, the keep_prob extremes."""

import pytest
import torch
from torch import nn

from mpoe.config import ConfigError, GradMaskConfig, MoEConfig
from mpoe.models.experts import DenseFFN, build_expert_bank
from mpoe.models.grad_mask import GradientMask, select_masked_params
from mpoe.parallel.expert_placement import ExpertPlacement


def _masked_ones_grad(keep_prob, rescale=True, seed=0, step=0, shape=(200, 500)):
    p = nn.Parameter(torch.zeros(shape))
    mask = GradientMask([p], keep_prob, rescale=rescale, seed=seed)
    mask.set_step(step)
    p.sum().backward()
    return p.grad


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_kept_fraction_and_rescale(keep_prob):
    grad = _masked_ones_grad(keep_prob)
    kept = grad != 0
    assert abs(kept.float().mean().item() - keep_prob) < 0.01  # 100k entries: sd < 0.0016
    assert torch.allclose(grad[kept], torch.full_like(grad[kept], 1 / keep_prob))
    plain = _masked_ones_grad(keep_prob, rescale=False)
    assert set(plain.unique().tolist()) == {0.0, 1.0}


def test_same_seed_and_step_same_mask_else_different():
    a, b = _masked_ones_grad(0.5, seed=3, step=7), _masked_ones_grad(0.5, seed=3, step=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, _masked_ones_grad(0.5, seed=3, step=8))
    assert not torch.equal(a, _masked_ones_grad(0.5, seed=4, step=7))


def test_same_mask_for_every_micro_batch_of_a_step():
    p = nn.Parameter(torch.zeros(1000))
    mask = GradientMask([p], 0.5)
    mask.set_step(1)
    g1, g2 = torch.randn(1000), torch.randn(1000)
    (p * g1).sum().backward()
    (p * g2).sum().backward()
    torch.testing.assert_close(p.grad, mask.mask(0) * mask.scale * (g1 + g2))
    assert set(mask.mask(0).unique().tolist()) == {0.0, 1.0} and mask.scale == 2.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rescaled_half_precision_gradient_is_rounded_once(dtype):
    """Truth: float32 math on the gradient's own values, times the 0/1 mask and 1/keep_prob, rounded once to the
    gradient's dtype. The old bf16 multiplier 1/0.3 -> 3.328 missed it on most kept entries and biased them by 0.2%."""
    keep_prob = 0.3
    g = torch.randn(200, 500, generator=torch.Generator().manual_seed(0)).to(dtype)
    p = nn.Parameter(torch.zeros(200, 500, dtype=dtype))
    mask = GradientMask([p], keep_prob, seed=5)
    mask.set_step(2)
    (p * g).sum().backward()
    keep = p.grad != 0
    assert keep.float().mean().item() == pytest.approx(keep_prob, abs=0.01)
    assert torch.equal(p.grad, (g.float() * keep * (1 / keep_prob)).to(dtype))

    # Unbiased: over the 30k kept entries, masked / (g / keep_prob) averages 1 up to rounding (4e-5 here);
    # the rounded multiplier gave 0.9985 in bf16 and 1.0002 in float16.
    ratio = p.grad[keep].double() / (g[keep].double() / keep_prob)
    assert ratio.mean().item() == pytest.approx(1.0, abs=1e-4)


def test_keep_prob_one_is_a_no_op_and_zero_freezes():
    g = torch.randn(50)
    p = nn.Parameter(torch.ones(50))
    GradientMask([p], 1.0)
    (p * g).sum().backward()
    assert torch.equal(p.grad, g)

    q = nn.Parameter(torch.ones(50))
    GradientMask([q], 0.0)
    opt = torch.optim.SGD([q], lr=0.1)
    (q * g).sum().backward()
    opt.step()
    assert torch.equal(q.grad, torch.zeros(50)) and torch.equal(q.detach(), torch.ones(50))


def test_stacked_expert_mask_does_not_depend_on_layout():
    whole, half = nn.Parameter(torch.zeros(4, 30, 30)), nn.Parameter(torch.zeros(2, 30, 30))
    whole.first_expert, half.first_expert = 0, 2
    for p in (whole, half):
        GradientMask([p], 0.5, seed=1).set_step(0)
        p.sum().backward()
    assert torch.equal(whole.grad[2:], half.grad)
    assert not torch.equal(whole.grad[0], whole.grad[1])


def _mpoe_bank():
    torch.manual_seed(0)
    cfg = MoEConfig(kind="mpoe", num_experts=2, aux_init_noise=0.1)
    return build_expert_bank(cfg, 12, 24, "relu", ExpertPlacement(), DenseFFN.random(12, 24, std=0.3))


def _grads(bank, target=None):
    if target is not None:
        GradientMask(select_masked_params(bank, target), 0.3, seed=0).set_step(0)
    torch.manual_seed(1)
    x = torch.randn(6, 12)
    bank(x, [4, 2]).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in bank.named_parameters()}


@pytest.mark.parametrize("target", ["central", "auxiliary", "all"])
def test_mask_touches_only_its_target(target):
    reference = _grads(_mpoe_bank())
    masked = _grads(_mpoe_bank(), target)
    prefixes = {"central": ("central.",), "auxiliary": ("auxiliary.",), "all": ("central.", "auxiliary.")}[target]
    kept_count = total = 0
    for name, g in masked.items():
        if name.startswith(prefixes):
            kept = g != 0
            kept_count, total = kept_count + int(kept.sum()), total + g.numel()
            torch.testing.assert_close(g[kept], reference[name][kept] / 0.3)
        else:
            torch.testing.assert_close(g, reference[name])
    assert total > 300 and 0.2 < kept_count / total < 0.4


def test_select_masked_params():
    bank = _mpoe_bank()
    model = nn.Sequential(nn.Linear(2, 2), bank)
    assert select_masked_params(model, "central") == list(bank.central.values())
    assert len(select_masked_params([bank], "all")) == len(bank.central) + sum(len(a) for a in bank.auxiliary.values())
    switch = build_expert_bank(MoEConfig(kind="switch", num_experts=2), 12, 24, "relu", ExpertPlacement())
    assert select_masked_params(switch, "all") == []
    with pytest.raises(ConfigError, match="moe.grad_mask.target"):  # the config refuses other targets
        GradMaskConfig(target="biases")


def _lowbias32_reference(x: int) -> int:
    """Wellons' lowbias32 in plain Python integers, the truth for the int64 tensor version."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_tensor_hash_equals_the_plain_integer_hash():
    from mpoe.models.grad_mask import _mix32

    xs = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + torch.randint(0, 2**32, (500,)).tolist()
    assert _mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [_lowbias32_reference(x) for x in xs]


def test_masks_of_different_steps_and_experts_are_independent():
    a, b = _masked_ones_grad(0.5, step=7) != 0, _masked_ones_grad(0.5, step=8) != 0
    assert abs((a & b).float().mean().item() - 0.25) < 0.01  # independent draws overlap at p**2
    # neighbouring entries of one mask are uncorrelated too
    assert abs((a.flatten()[1:] & a.flatten()[:-1]).float().mean().item() - 0.25) < 0.01
    stacked = nn.Parameter(torch.zeros(2, 300, 300))
    stacked.first_expert = 0
    GradientMask([stacked], 0.5).set_step(0)
    stacked.sum().backward()
    e0, e1 = stacked.grad[0] != 0, stacked.grad[1] != 0
    assert abs((e0 & e1).float().mean().item() - 0.25) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mask_on_the_gpu_is_the_cpu_mask_drawn_without_host_sync():
    def grad_on(device):
        p = nn.Parameter(torch.zeros(3, 64, 96, device=device))
        p.first_expert = 5
        GradientMask([p], 0.3, seed=2).set_step(11)
        p.sum().backward()
        return p.grad

    torch.cuda.set_sync_debug_mode("error")  # any device-to-host read in the draw raises
    try:
        on_gpu = grad_on("cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(on_gpu.cpu(), grad_on("cpu"))
