"""Expert backends are chosen once, from the registry, for a device and a dtype: `moe.expert_impl=auto` is the
grouped backend only for bf16 on CUDA from compute capability 9.0, and a forward never chooses again.

No GPU here: CUDA's compute capability is faked, and the banks compute on the CPU whatever they were resolved for,
which is what shows that a forward does not look at its tokens' device."""

import pytest
import torch

from mpoe.config import MoEConfig
from mpoe.models.experts import banks, build_expert_bank, resolve_expert_backends
from mpoe.models.experts.grouped import GROUPED_MM, GroupedBackend
from mpoe.models.experts.loop import MPOELoopBackend, SwitchLoopBackend
from mpoe.parallel.expert_placement import ExpertPlacement

D_MODEL, D_FF = 16, 32
LOOP = {"switch": SwitchLoopBackend, "mpoe": MPOELoopBackend}
needs_grouped_mm = pytest.mark.skipif(GROUPED_MM is None, reason="this torch has no grouped_mm")


def _bank(kind: str, impl: str):
    torch.manual_seed(0)
    cfg = MoEConfig(kind=kind, num_experts=4, expert_impl=impl)
    return build_expert_bank(cfg, D_MODEL, D_FF, "gelu_new", ExpertPlacement())


def _model(kind: str, impl: str, layers: int = 2) -> torch.nn.Module:
    return torch.nn.Sequential(*(_bank(kind, impl) for _ in range(layers)))


def _fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_a_bank_just_built_resolves_for_the_cpu(kind):
    assert _bank(kind, "auto").backend is LOOP[kind]
    assert _bank(kind, "loop").backend is LOOP[kind]
    assert _bank(kind, "grouped").backend is GroupedBackend


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_auto_on_the_cpu_is_loop_in_every_dtype_and_explicit_names_are_honoured(kind):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = _model(kind, "auto")
        assert resolve_expert_backends(model, "cpu", dtype) == f"experts: loop, {_short(dtype)}, cpu"
        assert all(bank.backend is LOOP[kind] for bank in model)
    model = _model(kind, "grouped")
    assert resolve_expert_backends(model, "cpu", torch.float32) == "experts: grouped, fp32, cpu"
    assert all(bank.backend is GroupedBackend for bank in model)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@needs_grouped_mm
@pytest.mark.parametrize(
    "capability, dtype, want",
    [
        ((9, 0), torch.bfloat16, "grouped"),  # Hopper: grouped_mm's fused kernel
        ((10, 0), torch.bfloat16, "grouped"),
        ((8, 0), torch.bfloat16, "loop"),  # Ampere: torch's fallback, a host copy per call
        ((9, 0), torch.float32, "loop"),  # fused kernel is bf16 only
        ((9, 0), torch.float16, "loop"),
    ],
)
@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_auto_on_cuda_is_grouped_only_for_bf16_from_sm90(monkeypatch, kind, capability, dtype, want):
    _fake_gpu(monkeypatch, capability)
    model = _model(kind, "auto")
    line = resolve_expert_backends(model, torch.device("cuda", 0), dtype)
    assert line == f"experts: {want}, {_short(dtype)}, sm{capability[0]}{capability[1]}"
    assert all(bank.backend is (GroupedBackend if want == "grouped" else LOOP[kind]) for bank in model)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_explicit_impl_is_honoured_on_cuda_too(monkeypatch, impl):
    _fake_gpu(monkeypatch, (9, 0))
    model = _model("mpoe", impl)
    assert resolve_expert_backends(model, "cuda", torch.bfloat16) == f"experts: {impl}, bf16, sm90"
    assert model[0].backend is (GroupedBackend if impl == "grouped" else MPOELoopBackend)


def test_defaults_are_the_parameters_device_and_dtype_and_a_model_without_banks_says_nothing():
    model = _model("switch", "auto").to(torch.bfloat16)
    assert resolve_expert_backends(model) == "experts: loop, bf16, cpu"
    assert resolve_expert_backends(torch.nn.Linear(2, 2)) is None


def test_the_impl_is_changed_by_use_impl_only():
    bank = _bank("switch", "loop")
    with pytest.raises(AttributeError):
        bank.impl = "grouped"  # would change nothing until resolved: refused
    assert bank.use_impl("grouped") == "grouped, fp32, cpu" and bank.backend is GroupedBackend
    assert bank.impl == "grouped"


def _spy(monkeypatch, backend: type) -> list:
    calls = []
    forward = backend.forward

    def counted(bank, tokens, counts):
        calls.append(tokens.device.type)
        return forward(bank, tokens, counts)

    monkeypatch.setattr(backend, "forward", staticmethod(counted))
    return calls


@needs_grouped_mm
@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_a_forward_uses_the_resolved_backend_whatever_its_tokens_device(monkeypatch, kind):
    """Resolved for an sm90 GPU in bf16, a bank given CPU tokens still runs the grouped backend, and nothing in the
    forward chooses a backend again."""
    _fake_gpu(monkeypatch, (9, 0))
    model = _model(kind, "auto", layers=1).to(torch.bfloat16)
    assert resolve_expert_backends(model, "cuda", torch.bfloat16) == "experts: grouped, bf16, sm90"
    grouped_calls, loop_calls = _spy(monkeypatch, GroupedBackend), _spy(monkeypatch, LOOP[kind])

    def chosen_again(*args):
        raise AssertionError("a forward chose a backend")

    monkeypatch.setattr(banks, "choose_impl", chosen_again)
    x = torch.randn(16, D_MODEL, dtype=torch.bfloat16)
    out = model[0](x, torch.tensor([5, 0, 9, 2]))
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert grouped_calls == ["cpu"] and loop_calls == []


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_moving_a_bank_chooses_its_backend_again_for_where_it_now_is(monkeypatch, kind):
    """`.to()` (a user's, or DeepSpeed's placement) re-resolves: bf16 where grouped_mm has its fused kernel is
    grouped, and back to float32 it is loop again. The fused kernel's presence is faked for the CPU here."""
    from mpoe.models.experts import registry

    model = _model(kind, "auto")
    assert all(bank.backend is LOOP[kind] for bank in model)
    monkeypatch.setattr(registry, "fast_path", lambda device, dtype: dtype == torch.bfloat16)
    model.to(torch.bfloat16)
    assert all(bank.backend is GroupedBackend for bank in model)
    model.to(torch.float32)
    assert all(bank.backend is LOOP[kind] for bank in model)
