"""The swappable parts satisfy their Protocols, and ParamRoles / param_tags say what each parameter is."""

import pytest
import torch

from mpoe.config import MoEConfig
from mpoe.models import param_tags
from mpoe.models.interfaces import Dispatcher, ExpertBankLike, ParamRoles, Router
from mpoe.models.moe_builder import build_moe_layer
from mpoe.parallel.expert_placement import ExpertPlacement


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_layer_parts_satisfy_their_protocols(kind):
    layer = build_moe_layer(MoEConfig(kind=kind, num_experts=4), 16, 32, "gelu_new", ExpertPlacement(group_name="g"))
    assert isinstance(layer.router, Router)
    assert isinstance(layer.dispatcher, Dispatcher)
    assert isinstance(layer.bank, ExpertBankLike)
    roles = layer.bank.param_roles()
    assert isinstance(roles, ParamRoles)
    # Tags follow the roles: per-expert parameters are DeepSpeed expert params of group g, stacked from expert 0
    per_expert = {id(p) for p in roles.per_expert()}
    for p in layer.bank.parameters():
        assert param_tags.is_expert_param(p) == (id(p) in per_expert)
        assert param_tags.expert_group_name(p) == ("g" if id(p) in per_expert else None)
        assert param_tags.first_expert(p) == (0 if id(p) in per_expert else None)
    assert (len(roles.central) > 0) == (kind == "mpoe")


def test_param_roles_of_names_a_role_or_fails_in_one_line():
    p = torch.nn.Parameter(torch.zeros(1))
    roles = ParamRoles(central=[p])
    assert roles.of("central") == [p] and roles.of("expert") == [] and roles.all() == [p]
    with pytest.raises(ValueError, match="parameter role 'router' is unknown"):
        roles.of("router")
