"""The MoE layer is assembled from parts that config names: a router registered in one line drives it.

The fixed router below sends token t to expert t % E with gate weight 0.75 and to
expert (t + 1) % E with 0.25, whatever the token; the layer's output must then be
that mix of the two experts' FFNs computed by hand from the bank's weights (ReLU,
so nothing of the bank's own code is reused).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpoe import config
from mpoe.config import ConfigError, MoEConfig
from mpoe.models.interfaces import RouterOutput
from mpoe.models.moe_builder import DISPATCHERS, ROUTERS, build_moe_layer
from mpoe.models.moe_layer import MoELayer
from mpoe.models.router import TopKRouter
from mpoe.parallel.dispatch import AllToAllDispatcher
from mpoe.parallel.expert_placement import ExpertPlacement

D_MODEL, D_FF, E = 6, 10, 4


class FixedRouter(nn.Module):
    """Token t: expert t % E (gate 0.75) and expert (t + 1) % E (gate 0.25)."""

    def __init__(self, cfg: MoEConfig, d_model: int):
        super().__init__()
        self.num_experts = cfg.num_experts

    def forward(self, tokens: torch.Tensor) -> RouterOutput:
        n, rows = tokens.shape[0], torch.arange(tokens.shape[0])
        first = rows % self.num_experts
        probs = torch.zeros(n, self.num_experts)
        probs[rows, first] = 0.75
        probs[rows, (first + 1) % self.num_experts] = 0.25
        routing_map = probs > 0
        zero = tokens.new_zeros(())
        dropped = torch.zeros((), dtype=torch.long)
        return RouterOutput(probs, routing_map, zero, zero, routing_map.sum(0), dropped, zero, dropless=True)


def test_a_router_registered_in_one_line_drives_the_layer(monkeypatch):
    monkeypatch.setitem(ROUTERS, "fixed", FixedRouter)  # the registry line
    monkeypatch.setattr(config, "MOE_ROUTERS", (*config.MOE_ROUTERS, "fixed"))  # the name config accepts
    cfg = MoEConfig(kind="switch", num_experts=E, top_k=2, router="fixed", expert_impl="loop")
    torch.manual_seed(0)
    layer = build_moe_layer(cfg, D_MODEL, D_FF, "relu", ExpertPlacement())
    assert isinstance(layer.router, FixedRouter)

    x = torch.randn(2, 4, D_MODEL)
    out = layer(x).reshape(-1, D_MODEL)
    bank = layer.bank

    def expert(e: int, token: torch.Tensor) -> torch.Tensor:
        return torch.relu(token @ bank.w_in[e] + bank.b_in[e]) @ bank.w_out[e] + bank.b_out[e]

    expected = torch.stack(
        [0.75 * expert(t % E, tok) + 0.25 * expert((t + 1) % E, tok) for t, tok in enumerate(x.reshape(-1, D_MODEL))]
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert layer.stats.tokens_per_expert.tolist() == [4, 4, 4, 4]  # 8 tokens, two experts each, round robin


def test_the_default_names_pick_topk_and_alltoall():
    layer = build_moe_layer(MoEConfig(kind="mpoe", num_experts=E), D_MODEL, D_FF, "gelu_new", ExpertPlacement())
    assert type(layer.router) is TopKRouter and type(layer.dispatcher) is AllToAllDispatcher


def test_registries_hold_exactly_the_names_config_accepts():
    assert tuple(ROUTERS) == config.MOE_ROUTERS and tuple(DISPATCHERS) == config.MOE_DISPATCHERS


@pytest.mark.parametrize("key", ["router", "dispatcher"])
def test_an_unknown_name_is_a_one_line_config_error(key):
    with pytest.raises(ConfigError) as err:
        MoEConfig(kind="switch", **{key: "nope"})
    message = str(err.value)
    assert f"moe.{key}='nope'" in message and "\n" not in message
    assert ("topk" if key == "router" else "alltoall") in message  # the choices are listed


def test_parts_built_for_different_expert_counts_do_not_assemble():
    layer = build_moe_layer(MoEConfig(kind="switch", num_experts=E), D_MODEL, D_FF, "gelu_new", ExpertPlacement())
    with pytest.raises(ValueError, match="dispatcher routes to 8 local of 8 experts, the expert bank holds 4 of 4"):
        MoELayer(layer.router, AllToAllDispatcher(8, ExpertPlacement()), layer.bank, ExpertPlacement())
