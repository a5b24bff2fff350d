"""Adam's state written through `optimizer_state` (when a checkpoint is resharded) sits where torch's optimizer puts
it."""

import pytest
import torch

from mpoe.parallel.deepspeed.optimizer_state import TorchAdam, step_tensor


@pytest.mark.parametrize("fused,capturable", [(False, False), (True, False), (False, True)])
def test_the_step_lies_where_torchs_load_state_dict_puts_it(fused, capturable):
    """The meta device stands in for CUDA: fused and capturable Adam read the step on the parameter's device."""
    param = torch.empty(3, device="meta")
    group = {"params": [0], "fused": fused, "capturable": capturable}
    want = torch.optim.Optimizer._process_value_according_to_param_policy(param, torch.tensor(7.0), 0, [group], "step")
    got = step_tensor(7, group, param)
    assert (got.device, got.dtype) == (want.device, want.dtype)
    if got.device.type == "cpu":
        assert got.item() == 7.0


def test_a_resharded_fused_adam_gets_its_step_on_the_parameters_device():
    param = torch.nn.Parameter(torch.empty(3, device="meta"))
    optimizer = torch.optim.AdamW([param], foreach=False)
    optimizer.param_groups[0]["capturable"] = True  # as fused: (a fused optimizer cannot be built on meta)
    moments = {k: torch.zeros(3) for k in ("exp_avg", "exp_avg_sq")}
    TorchAdam(optimizer).write(param, moments, step=5)
    state = optimizer.state[param]
    assert state["step"].device.type == "meta" and state["step"].dtype == torch.float32
    assert state["exp_avg"].device.type == "meta"
