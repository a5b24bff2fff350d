"""Expert divergence and MPOE central-update norms (mpoe.train.metrics.experts), against hand-computed values."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mpoe.config import MoEConfig
from mpoe.models.experts import DenseFFN, MPOEExperts, SwitchExperts, build_expert_bank
from mpoe.models.moe_builder import build_moe_layer
from mpoe.parallel.expert_placement import ExpertPlacement
from mpoe.parallel.local_world import spawn_world
from mpoe.train.metrics.experts import CentralUpdate, expert_divergence

D_MODEL, D_FF, EXPERTS = 32, 64, 4  # 32 = 2^5 and 64 = 2*2*4*2*2: every MPO factor > 1 (see the kron test)


def _bank(kind, dense, activation="gelu_new", placement=None, **moe):
    cfg = MoEConfig(kind=kind, num_experts=EXPERTS, **moe)
    return build_expert_bank(cfg, D_MODEL, D_FF, activation, placement or ExpertPlacement(group_name="g"), dense)


def _switch(denses, activation="gelu_new"):
    return SwitchExperts(len(denses), range(len(denses)), denses, activation)


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
@pytest.mark.parametrize("gated", [False, True])
def test_experts_upcycled_from_one_ffn_have_divergence_exactly_zero(kind, gated):
    torch.manual_seed(0)
    dense = DenseFFN.random(D_MODEL, D_FF, gated=gated, std=0.3)
    banks = nn.ModuleList([_bank(kind, dense, "gated-gelu" if gated else "gelu_new") for _ in range(2)])
    divergence = expert_divergence(banks)
    assert divergence.dtype == torch.float32 and divergence.tolist() == [0.0, 0.0]


def test_switch_divergence_is_the_hand_computed_value():
    # Expert 0: W_in = 1, W_out = 2 (all entries); expert 1: W_in = 3, W_out = 2. Mean: W_in = W_out = 2.
    # ||W_e - mean||^2 = 6 * 1^2 (W_in's 6 entries), ||mean||^2 = 12 * 2^2 = 48: each ratio sqrt(6 / 48).
    # (Averaging the matrices' own ratios instead would give (1/2 + 0) / 2.) Biases are not weight matrices.
    denses = [
        DenseFFN(c * torch.ones(2, 3), torch.full((3,), b), 2 * torch.ones(3, 2), torch.full((2,), b))
        for c, b in ((1.0, 0.0), (3.0, 5.0))
    ]
    assert expert_divergence(_switch(denses)).tolist() == pytest.approx([math.sqrt(1 / 8)], rel=1e-6)


def test_switch_divergence_equals_plain_torch_on_random_experts():
    g = torch.Generator().manual_seed(3)
    denses = [DenseFFN.random(D_MODEL, D_FF, gated=True, std=0.1 * (e + 1), generator=g) for e in range(EXPERTS)]
    flat = torch.stack([torch.cat([d.w_in.flatten(), d.w_out.flatten(), d.w_gate.flatten()]) for d in denses])
    mean = flat.double().mean(0)
    expected = ((flat.double() - mean).norm(dim=1) / mean.norm()).mean()
    bank = _switch(denses, "gated-gelu")
    got = expert_divergence([bank, bank])
    torch.testing.assert_close(got, torch.full((2,), expected.item(), dtype=torch.float32))
    assert not any(w.requires_grad for w in bank.effective_weights())


def _kron_experts(gated: bool):
    """An MPOE bank at full bonds whose expert e's W is kron(R_e, 1) @ W @ kron(1, S_e) for every matrix W of one
    dense FFN (R_e mixes the slowest row factor i_1 through the first auxiliary tensor, S_e the fastest column
    factor j_n through the last), and a Switch bank holding those matrices, computed with plain torch."""
    g = torch.Generator().manual_seed(5)
    dense = DenseFFN.random(D_MODEL, D_FF, gated=gated, std=0.3, generator=g)
    bank = MPOEExperts(EXPERTS, range(EXPERTS), dense, "gelu_new", bond_dim=None)
    switch_weights = {}
    with torch.no_grad():
        for name in bank.weight_names():
            first, last = bank.auxiliary[name][0], bank.auxiliary[name][-1]  # [L, 1, i_1, j_1, d], [L, d, i_n, j_n, 1]
            i1, jn = first.shape[2], last.shape[3]
            w = getattr(dense, name)
            switch_weights[name] = []
            for e in range(EXPERTS):
                r, s = torch.randn(i1, i1, generator=g), torch.randn(jn, jn, generator=g)
                first[e] = torch.einsum("ab,xbjd->xajd", r, first[e])
                last[e] = torch.einsum("xibz,ba->xiaz", last[e], s)
                rows = torch.kron(r, torch.eye(w.shape[0] // i1))
                cols = torch.kron(torch.eye(w.shape[1] // jn), s)
                switch_weights[name].append(rows @ w @ cols)
    denses = [
        DenseFFN(
            switch_weights["w_in"][e],
            dense.b_in,
            switch_weights["w_out"][e],
            dense.b_out,
            switch_weights["w_gate"][e] if gated else None,
        )
        for e in range(EXPERTS)
    ]
    return bank, _switch(denses)


@pytest.mark.parametrize("gated", [False, True])
def test_mpoe_and_switch_holding_the_same_matrices_have_the_same_divergence(gated):
    mpoe_bank, switch_bank = _kron_experts(gated)
    for rebuilt, stacked in zip(mpoe_bank.effective_weights(), switch_bank.effective_weights()):
        torch.testing.assert_close(rebuilt, stacked, rtol=1e-5, atol=1e-5)
    got, expected = expert_divergence(mpoe_bank), expert_divergence(switch_bank)
    assert expected.item() > 0.5  # the experts really differ
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_divergence_of_a_model_without_moe_layers_is_empty():
    assert expert_divergence(nn.Linear(2, 2)).shape == (0,)


def _layers(*kinds):
    torch.manual_seed(7)
    cfg = lambda kind: MoEConfig(kind=kind, num_experts=EXPERTS, aux_init_noise=0.1)
    return nn.ModuleList([build_moe_layer(cfg(k), D_MODEL, D_FF, "gelu_new", ExpertPlacement()) for k in kinds])


def test_central_update_is_the_norm_of_a_hand_applied_change():
    model = _layers("mpoe", "switch", "mpoe")
    update = CentralUpdate(model)
    assert update.num_layers == 2
    update.snapshot()
    with torch.no_grad():
        first = model[0].bank
        first.central["w_in"].view(-1)[0] += 3.0  # 3 and 4 in two matrices of one layer: 5
        first.central["w_out"].view(-1)[5] -= 4.0
        for aux in first.auxiliary["w_in"]:  # auxiliary tensors are not central
            aux.add_(1.0)
    assert update.norms().tolist() == pytest.approx([5.0, 0.0], rel=1e-6)
    update.snapshot()
    assert update.norms().tolist() == [0.0, 0.0]


def test_central_update_of_an_sgd_step_is_lr_times_the_central_gradient_norm():
    model = _layers("mpoe")
    bank = model[0].bank
    x = torch.randn(10, D_MODEL)
    model[0](x).pow(2).sum().backward()
    expected = 0.1 * torch.cat([p.grad.flatten() for p in bank.central.values()]).norm()
    update = CentralUpdate(model)
    update.snapshot()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.testing.assert_close(update.norms(), expected.reshape(1), rtol=1e-5, atol=0)


def test_central_update_without_central_tensors_is_empty_and_needs_a_snapshot():
    update = CentralUpdate(_layers("switch"))
    with pytest.raises(RuntimeError, match="snapshot"):
        update.norms()
    update.snapshot()
    assert update.num_layers == 0 and update.norms().shape == (0,)


def _ep_model(placement):
    """A random Switch layer, an MPOE layer with noisy auxiliaries and an upcycled MPOE bank (identical experts);
    initial weights depend on the global expert ids only, not on how the experts are spread."""
    torch.manual_seed(11)
    build = lambda kind, noise: build_moe_layer(
        MoEConfig(kind=kind, num_experts=EXPERTS, aux_init_noise=noise), D_MODEL, D_FF, "gelu_new", placement
    )
    ffn = DenseFFN.random(D_MODEL, D_FF, std=0.3, generator=torch.Generator().manual_seed(12))
    return nn.ModuleList([build("switch", 0.0), build("mpoe", 0.2), _bank("mpoe", ffn, placement=placement)])


def _ep_worker(rank: int, out_dir: str) -> None:
    from mpoe.parallel.expert_placement import expert_placement

    placement = expert_placement(2)
    model = _ep_model(placement)
    torch.save(
        {"divergence": expert_divergence(model, placement.ep_group), "local": model[0].bank.num_local_experts},
        Path(out_dir) / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_expert_parallel_divergence_equals_one_process_holding_all_experts(tmp_path):
    spawn_world(_ep_worker, 2, str(tmp_path))
    expected = expert_divergence(_ep_model(ExpertPlacement()))
    assert expected[0] > 0 and expected[1] > 0 and expected[2] == 0
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["local"] == EXPERTS // 2
        torch.testing.assert_close(got["divergence"], expected, rtol=1e-6, atol=0)
        assert got["divergence"][2] == 0
