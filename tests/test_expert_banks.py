"""Expert banks: upcycling reproduces the dense FFN, the shared central tensor's gradient, DeepSpeed tags."""

import copy

import pytest
import torch
from transformers import GPT2Config, T5Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

from mpoe.config import MoEConfig
from mpoe.models import mpo
from mpoe.models.experts import DenseFFN, MPOEExperts, build_expert_bank
from mpoe.parallel.expert_placement import ExpertPlacement

D_MODEL, D_FF, COUNTS = 12, 24, [3, 0, 5, 2]


def _gpt2_mlp():
    torch.manual_seed(0)
    mlp = GPT2MLP(D_FF, GPT2Config(n_embd=D_MODEL, resid_pdrop=0.0, activation_function="gelu_new")).eval()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return mlp


def _t5_ff(gated: bool):
    torch.manual_seed(1)
    cfg = T5Config(d_model=D_MODEL, d_ff=D_FF, dropout_rate=0.0, feed_forward_proj="gated-gelu" if gated else "relu")
    ff = (T5DenseGatedActDense if gated else T5DenseActDense)(cfg).eval()
    for p in ff.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return ff


def _bank(kind, dense, activation, **moe):
    return build_expert_bank(
        MoEConfig(kind=kind, num_experts=4, **moe), D_MODEL, D_FF, activation, ExpertPlacement(group_name="g"), dense
    )


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
@pytest.mark.parametrize("source", ["gpt2", "t5", "t5-gated"])
def test_upcycled_bank_equals_dense_ffn(kind, source):
    if source == "gpt2":
        module, activation = _gpt2_mlp(), "gelu_new"
        dense = DenseFFN.from_gpt2_mlp(module)
    else:
        module, activation = _t5_ff(source == "t5-gated"), "gated-gelu" if source == "t5-gated" else "relu"
        dense = DenseFFN.from_t5_ff(module)
    bank = _bank(kind, dense, activation)
    x = torch.randn(sum(COUNTS), D_MODEL)
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(bank(x, COUNTS), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bank(x, torch.tensor([0, 0, 10, 0])), expected, rtol=1e-4, atol=1e-5)
        if kind == "mpoe":
            for method in ("dense", "chain"):
                bank.method = method
                torch.testing.assert_close(bank(x, COUNTS), expected, rtol=1e-4, atol=1e-5)


def _manual_expert(bank: MPOEExperts, e: int, x):
    """Expert e's FFN from contracted weights, written without the bank's forward."""
    w = {name: mpo.contract(bank.expert_chains(name)[e]) for name in bank.central}
    h = torch.nn.functional.gelu(x @ w["w_in"] + bank.b_in[e], approximate="tanh")
    return h @ w["w_out"] + bank.b_out[e]


@pytest.mark.parametrize("method", ["dense", "chain"])
def test_central_gradient_is_sum_of_expert_contributions(method):
    torch.manual_seed(2)
    dense = DenseFFN.random(D_MODEL, D_FF, std=0.3)
    bank = _bank("mpoe", dense, "gelu_new", aux_init_noise=0.5, bond_dim=4)
    bank.method = method
    x, target = torch.randn(sum(COUNTS), D_MODEL), torch.randn(sum(COUNTS), D_MODEL)
    (bank(x, COUNTS) * target).sum().backward()

    total = {name: torch.zeros_like(c) for name, c in bank.central.items()}
    for e, (xe, te) in enumerate(zip(x.split(COUNTS), target.split(COUNTS))):
        fresh = copy.deepcopy(bank)
        fresh.zero_grad(set_to_none=True)
        (_manual_expert(fresh, e, xe) * te).sum().backward()
        for name, c in fresh.central.items():
            total[name] += c.grad
        for mine, theirs in zip(bank.auxiliary["w_in"], fresh.auxiliary["w_in"]):
            torch.testing.assert_close(mine.grad[e], theirs.grad[e], rtol=1e-4, atol=1e-6)
    for name, c in bank.central.items():
        assert c.grad.abs().max() > 0
        torch.testing.assert_close(c.grad, total[name], rtol=1e-4, atol=1e-6)


def test_experts_with_noise_differ_and_without_noise_agree():
    dense = DenseFFN.random(D_MODEL, D_FF, std=0.3)
    noisy, plain = _bank("mpoe", dense, "relu", aux_init_noise=0.1), _bank("mpoe", dense, "relu")
    assert not torch.allclose(noisy.expert_weight("w_in", 0), noisy.expert_weight("w_in", 1))
    torch.testing.assert_close(plain.expert_weight("w_in", 0), plain.expert_weight("w_in", 3))


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_mark_expert_params_tags_exactly_the_expert_params(kind):
    bank = _bank(kind, DenseFFN.random(D_MODEL, D_FF, gated=True), "gated-gelu")
    named = dict(bank.named_parameters())
    tagged = {n for n, p in named.items() if getattr(p, "allreduce", True) is False and p.group_name == "g"}
    if kind == "mpoe":
        expected = {n for n in named if n.startswith("auxiliary.") or n in ("b_in", "b_out")}
        assert {n for n in named if n.startswith("central.")} == {"central.w_in", "central.w_out", "central.w_gate"}
    else:
        expected = {"w_in", "b_in", "w_out", "b_out", "w_gate"}
    assert tagged == expected
    untagged = set(named) - tagged
    assert all(not hasattr(named[n], "allreduce") for n in untagged)
    roles = bank.param_roles()
    assert len(roles.all()) == len(named)
    assert {id(p) for p in roles.per_expert()} == {id(named[n]) for n in expected}


def test_mpoe_param_count_follows_formulas():
    bank = _bank("mpoe", DenseFFN.random(D_MODEL, D_FF), "relu", bond_dim=3)
    fm, ff = mpo.factorize(D_MODEL), mpo.factorize(D_FF)
    per_matrix = {"w_in": (fm, ff), "w_out": (ff, fm)}
    expected = sum(
        mpo.central_num_params(i, o, 3) + 4 * (mpo.mpo_num_params(i, o, 3) - mpo.central_num_params(i, o, 3))
        for i, o in per_matrix.values()
    ) + 4 * (D_FF + D_MODEL)
    assert sum(p.numel() for p in bank.parameters()) == expected


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_no_tokens_still_gives_gradients(kind):
    bank = _bank(kind, None, "gelu_new")
    out = bank(torch.zeros(0, D_MODEL, requires_grad=True), [0, 0, 0, 0])
    assert out.shape == (0, D_MODEL)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in bank.parameters())
    with pytest.raises(ValueError, match="tokens_per_expert"):
        bank(torch.zeros(3, D_MODEL), [1, 1, 0, 0])


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_random_init_does_not_depend_on_expert_layout(kind):
    cfg = MoEConfig(kind=kind, num_experts=4, aux_init_noise=0.2)
    torch.manual_seed(5)
    whole = build_expert_bank(cfg, D_MODEL, D_FF, "relu", ExpertPlacement())
    torch.manual_seed(5)
    half = build_expert_bank(cfg, D_MODEL, D_FF, "relu", ExpertPlacement(ep_size=2, ep_rank=1, group_name="ep_size_2"))
    assert (half.num_local_experts, half.first_expert, half.num_experts) == (2, 2, 4)
    for (name, a), (_, b) in zip(whole.named_parameters(), half.named_parameters()):
        if name.startswith("central."):
            torch.testing.assert_close(a, b)
        else:
            torch.testing.assert_close(a[2:], b)
    if kind == "switch":
        assert not torch.allclose(whole.w_in[0], whole.w_in[1])


def test_rebuilt_ffn_reorders_h_when_w_out_rows_do_not_mirror_w_in_columns(monkeypatch):
    """W_in and W_out cut at different bonds: h must be mapped from W_in's column order to W_out's row order."""
    torch.manual_seed(6)
    bank = _bank("mpoe", DenseFFN.random(D_MODEL, D_FF, std=0.3), "gelu_new", aux_init_noise=0.3, bond_dim=4)
    bank.method = "dense"
    x = torch.randn(sum(COUNTS), D_MODEL)
    expected = torch.cat([_manual_expert(bank, e, xe) for e, xe in enumerate(x.split(COUNTS))])
    orders = {name: bank.halves(name, transposed=name == "w_in")[2] for name in ("w_in", "w_out")}
    assert torch.equal(orders["w_in"], orders["w_out"])  # the default cuts mirror each other
    cut = iter([2, 3])  # w_in (built first) at 2, w_out at 3
    monkeypatch.setattr(mpo, "split_index", lambda shapes: next(cut))
    torch.testing.assert_close(bank(x, COUNTS), expected, rtol=1e-4, atol=1e-5)
    assert next(cut, None) is None
