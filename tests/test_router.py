"""TopKRouter against hand computations: gate weights, capacity drops, Switch aux loss, z-loss.

Every router here has an identity gate (d_model = num_experts), so the tokens *are*
the logits and each routing is written down by hand.
"""

import math

import pytest
import torch

from mpoe.config import MoEConfig
from mpoe.models.router import TopKRouter


def identity_router(**overrides) -> TopKRouter:
    cfg = MoEConfig(kind="switch", **{"num_experts": 4, "aux_loss_coef": 0.01, "z_loss_coef": 0.001, **overrides})
    router = TopKRouter(cfg, cfg.num_experts)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(cfg.num_experts))
    return router


def test_aux_loss_is_the_switch_formula():
    # 6 tokens, top-1 picks experts 0,0,0,1,2,0 -> f = (4/6, 1/6, 1/6, 0)
    logits = torch.tensor([[3.0, 0, 0, 0], [2, 1, 0, 0], [1, 0, 0, -1], [0, 2, 1, 0], [0, 0, 5, 0], [4, 3, 2, 1]])
    router = identity_router(top_k=1, aux_loss_coef=0.1)
    out = router(logits)
    softmax = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    f = [4 / 6, 1 / 6, 1 / 6, 0.0]
    P = [sum(row[e] for row in softmax) / 6 for e in range(4)]
    expected = 0.1 * 4 * sum(fe * pe for fe, pe in zip(f, P))
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.tokens_per_expert.tolist() == [4, 1, 1, 0]
    assert out.aux_loss.requires_grad


def test_aux_loss_top2_counts_each_assignment():
    logits = torch.tensor([[3.0, 2, 0, 0], [0, 2, 3, 0], [1, 0, 0, 2]])
    router = identity_router(top_k=2, aux_loss_coef=1.0)
    out = router(logits)
    # assignments: {0,1}, {1,2}, {0,3} -> f_e = count / (T * k)
    f = [2 / 6, 2 / 6, 1 / 6, 1 / 6]
    P = torch.softmax(logits, -1).mean(0).tolist()
    assert out.aux_loss.item() == pytest.approx(4 * sum(a * b for a, b in zip(f, P)), rel=1e-5)


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[1.0, 2, 3, 4], [0, 0, 0, 0]])
    out = identity_router(z_loss_coef=0.5)(logits)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert out.z_loss.item() == pytest.approx(0.5 * sum(v * v for v in lse) / 2, rel=1e-6)


def test_top1_post_softmax_gate_is_one_and_pre_softmax_is_the_probability():
    logits = torch.tensor([[2.0, 1, 0, 0]])
    post = identity_router(top_k=1, pre_softmax=False)(logits)
    pre = identity_router(top_k=1, pre_softmax=True)(logits)
    p0 = math.exp(2) / (math.exp(2) + math.exp(1) + 2)
    assert post.probs.tolist() == [[1.0, 0, 0, 0]]
    assert pre.probs[0, 0].item() == pytest.approx(p0, rel=1e-6) and pre.probs[0, 1:].abs().sum() == 0


@pytest.mark.parametrize("normalize", [True, False])
def test_top2_pre_softmax_normalisation(normalize):
    logits = torch.tensor([[2.0, 1, 0, -1]])
    out = identity_router(top_k=2, pre_softmax=True, normalize_topk=normalize)(logits)
    z = sum(math.exp(v) for v in [2, 1, 0, -1])
    p0, p1 = math.exp(2) / z, math.exp(1) / z
    want = [p0 / (p0 + p1), p1 / (p0 + p1)] if normalize else [p0, p1]
    assert out.probs[0, :2].tolist() == pytest.approx(want, rel=1e-6)
    assert out.routing_map.tolist() == [[True, True, False, False]]


def test_top2_post_softmax_is_softmax_over_chosen_logits():
    out = identity_router(top_k=2)(torch.tensor([[0.0, 3, 1, 2]]))
    e = math.exp(1)
    assert out.probs[0].tolist() == pytest.approx([0, e / (e + 1), 0, 1 / (e + 1)], rel=1e-6)


# 8 tokens, 2 experts, top-1, capacity ceil(8 / 2 * 1.0) = 4. Expert 0 gets tokens
# 0,1,2,4,5,7 (six), expert 1 gets 3,6. Expert 0's margins (its softmax score order):
# token 7 > 5 > 0 > 2 > 1 > 4.
CAPACITY_LOGITS = torch.tensor([[3.0, 0], [1.5, 0], [2, 0], [0, 1], [1, 0], [4, 0], [0, 2], [5, 0]])


def test_position_policy_keeps_the_first_tokens():
    router = identity_router(num_experts=2, top_k=1, capacity_factor=1.0, drop_policy="position")
    out = router(CAPACITY_LOGITS)
    assert out.tokens_dropped == 2
    assert out.routing_map[:, 0].nonzero().flatten().tolist() == [0, 1, 2, 4]
    assert out.routing_map[:, 1].nonzero().flatten().tolist() == [3, 6]
    assert out.tokens_per_expert.tolist() == [6, 2]  # before dropping
    assert out.probs[5].abs().sum() == 0 and out.probs[7].abs().sum() == 0


def test_probs_policy_keeps_the_most_confident_tokens():
    router = identity_router(num_experts=2, top_k=1, capacity_factor=1.0, drop_policy="probs")
    out = router(CAPACITY_LOGITS)
    assert out.tokens_dropped == 2
    assert out.routing_map[:, 0].nonzero().flatten().tolist() == [0, 2, 5, 7]


def test_capacity_position_policy_at_scale_matches_a_hand_count():
    # 64 tokens all on expert 0 of 4 with top-1 and capacity factor 0.5: capacity 8, 56 dropped.
    logits = torch.zeros(64, 4)
    logits[:, 0] = 1.0
    router = identity_router(top_k=1, capacity_factor=0.5, drop_policy="position")
    out = router(logits)
    assert out.tokens_dropped == 56
    assert out.routing_map[:, 0].nonzero().flatten().tolist() == list(range(8))


def test_dropless_drops_nothing_even_when_all_tokens_pick_one_expert():
    logits = torch.zeros(50, 4)
    logits[:, 2] = 1.0
    out = identity_router(top_k=2, capacity_factor=None)(logits)
    assert out.tokens_dropped == 0
    assert out.routing_map.sum().item() == 100
    assert out.routing_map[:, 2].all()


def test_eval_uses_eval_capacity_factor():
    router = identity_router(num_experts=2, top_k=1, capacity_factor=1.0, eval_capacity_factor=None)
    assert router.train()(CAPACITY_LOGITS).tokens_dropped == 2
    assert router.eval()(CAPACITY_LOGITS).tokens_dropped == 0


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = identity_router(jitter_eps=0.1)
    x = torch.randn(32, 4)
    router.eval()
    assert torch.equal(router(x).z_loss, router(x).z_loss)
    router.train()
    assert not torch.equal(router(x).z_loss, router(x).z_loss)


def test_gate_weights_carry_gradient_to_the_router():
    torch.manual_seed(0)
    cfg = MoEConfig(kind="switch", num_experts=4, top_k=2)
    router = TopKRouter(cfg, 8)
    out = router(torch.randn(10, 8))
    (out.probs.pow(2).sum() + out.aux_loss + out.z_loss).backward()
    assert router.gate.weight.grad.abs().sum() > 0


def _jitter_seen_by_the_gate(router: TopKRouter, tokens: torch.Tensor) -> torch.Tensor:
    """The tokens the gate multiplies after jitter (the router's input to gate_logits)."""
    seen = []
    gate_logits = router.gate_logits
    router.gate_logits = lambda t: seen.append(t.detach().clone()) or gate_logits(t)
    router(tokens)
    return seen[0]


@pytest.mark.parametrize("eps", [0.01, 0.001])
def test_jitter_of_bf16_tokens_is_drawn_in_float32(eps):
    """Truth: the noise is uniform on (1 - eps, 1 + eps), as Switch / HF draw it in float32 (bf16 rounds it to
    a few values, none above 1, and to exactly 1 for eps = 0.001)."""
    torch.manual_seed(0)
    router = identity_router(jitter_eps=eps).to(torch.bfloat16).train()
    noise = _jitter_seen_by_the_gate(router, torch.ones(4096, 4, dtype=torch.bfloat16))
    assert noise.min() >= 1 - eps and noise.max() <= 1 + eps
    assert noise.max() > 1 + 0.99 * eps and noise.min() < 1 - 0.99 * eps  # 16k draws reach both ends
    assert (noise > 1).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert noise.unique().numel() > 10_000  # continuous, not a handful of bf16 values
    assert noise.std().item() == pytest.approx(eps / math.sqrt(3), rel=0.03)  # uniform's standard deviation
    assert noise.dtype == torch.float32


def test_jitter_of_float32_tokens_is_unchanged():
    """float32 tokens get the same draw as before: tokens * uniform(1 - eps, 1 + eps) from the global generator."""
    router = identity_router(jitter_eps=0.1).train()
    x = torch.randn(64, 4)
    torch.manual_seed(3)
    seen = _jitter_seen_by_the_gate(router, x)
    torch.manual_seed(3)
    assert torch.equal(seen, x * torch.empty(64, 4).uniform_(0.9, 1.1))
    router.eval()
    assert torch.equal(_jitter_seen_by_the_gate(router, x), x)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_entropy_is_the_routing_distributions_and_dropless_counts_no_drops(capacity_factor):
    """Against torch.distributions.Categorical over the full softmax, in float64; 15 of 40 tokens sure of
    expert 0 (probabilities that underflow to 0 in float32), so capacity 10 per expert drops at least 5."""
    torch.manual_seed(0)
    logits = torch.randn(40, 4) * 3
    logits[:15] = torch.tensor([80.0, 0.0, 0.0, 0.0])
    out = identity_router(top_k=1, capacity_factor=capacity_factor)(logits)
    truth = torch.distributions.Categorical(logits=logits.double()).entropy().mean()
    torch.testing.assert_close(out.entropy.double(), truth, rtol=1e-5, atol=1e-6)
    assert out.tokens_dropped.dtype == torch.long and out.tokens_dropped.dim() == 0
    assert out.tokens_dropped == 40 - out.routing_map.sum()  # top-1: every token had one pair before dropping
    assert (out.tokens_dropped == 0) == (capacity_factor is None)


def test_bf16_gate_keeps_no_float32_copy_of_its_input_and_gives_float32_linears_gradients():
    """The gate's float32 matmul keeps its bf16 input for backward, not a float32 copy (a layer input's worth of
    memory twice over); values and gradients are autograd's through F.linear in float32, bit for bit."""
    torch.manual_seed(0)
    router = TopKRouter(MoEConfig(kind="switch", num_experts=4), d_model=32).to(torch.bfloat16)
    tokens = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(64, 4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = router.gate_logits(tokens)
    assert logits.dtype == torch.float32
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape == tokens.shape]
    got = torch.autograd.grad(logits, (tokens, router.gate.weight), grad)

    reference = torch.nn.functional.linear(tokens.float(), router.gate.weight.float())
    want = torch.autograd.grad(reference, (tokens, router.gate.weight), grad)
    assert torch.equal(logits, reference)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)
