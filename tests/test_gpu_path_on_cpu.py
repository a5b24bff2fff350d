"""The path CUDA takes at ep_size 1 (grouped expert backend, sync-free dispatch), checked on the CPU in CI.

1. It reads nothing from the device to the host. On CUDA, an op whose result the
   host must see (`.item()`, `bool(t)`, `.tolist()`) or whose output size depends on
   the data (`nonzero`, boolean-mask indexing, `unique`, `bincount`,
   `repeat_interleave` without `output_size`, `masked_select`) waits for the GPU:
   `torch.cuda.set_sync_debug_mode("error")` catches those, but only on a GPU. Here a
   dispatch mode (and a function mode, for `.tolist()`) refuses the same ops on CPU
   tensors. The guard itself is tested first, so that a silent guard cannot pass.
2. It makes no tensor off the model's device. On the `meta` device, as on CUDA, an
   op mixing a device tensor with a CPU tensor of one or more dimensions fails, so a
   bf16 model moved to `meta` runs forward and backward only if every tensor made
   inside follows the inputs' device (`Expected all tensors to be on the same device`
   is what the first GPU run of mpoe met).
3. It launches as many kernels for 32 experts as for 4: no per-expert loop, which is
   what made the expert banks launch-bound on a GPU. Counted as the ops that run a
   kernel (`bench.gpu.DeviceOps`, which the GPU benchmarks report as ops per step).

Both for one MoE layer's parts and for whole GPT-2 and T5 models, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench.gpu import device_ops
from mpoe.config import ModelConfig, MoEConfig, TrainConfig, TrainerConfig
from mpoe.models import mpo
from mpoe.models.build import build_model
from mpoe.models.experts.grouped import GROUPED_MM
from mpoe.models.moe_builder import build_moe_layer
from mpoe.parallel.expert_placement import ExpertPlacement

aten = torch.ops.aten
# Ops that read device data on the host: their result is a host value or their output's size is the data's.
HOST_READS = {
    aten._local_scalar_dense.default,  # .item(), bool(t), float(t), int(t), `if t:`
    aten.nonzero.default,
    aten.nonzero_static.default if hasattr(aten, "nonzero_static") else aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
}
HOST_READS.discard(aten.nonzero_static.default if hasattr(aten, "nonzero_static") else None)  # static: no read


class HostRead(AssertionError):
    pass


class _NoHostReadsDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            raise HostRead(f"{func} reads device data on the host")
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise HostRead(f"{func} with a boolean mask (a nonzero: its size is the data's)")
        return func(*args, **kwargs)


class _NoHostReadsFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            raise HostRead("Tensor.tolist reads device data on the host")
        return func(*args, **(kwargs or {}))


class no_host_reads:
    """Within: any op that would make the host wait for CUDA raises HostRead (CPU tensors included)."""

    def __enter__(self):
        self._modes = [_NoHostReadsFunction(), _NoHostReadsDispatch()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: bool((t > 0).any()),
        lambda t: float(t.max()),
        lambda t: t.tolist(),
        lambda t: t[t > 0],
        lambda t: torch.nonzero(t),
        lambda t: torch.unique(t),
        lambda t: torch.bincount((t.abs() * 3).long()),
        lambda t: torch.repeat_interleave(torch.arange(3), (t[:3].abs() * 2).long()),
    ],
    ids=["item", "bool", "float", "tolist", "mask-index", "nonzero", "unique", "bincount", "repeat_interleave"],
)
def test_the_guard_refuses_every_kind_of_host_read(read):
    t = torch.randn(8)
    read(t)  # fine outside
    with pytest.raises(HostRead), no_host_reads():
        read(t)


def test_the_guard_lets_device_only_work_through():
    t = torch.randn(8, 4, requires_grad=True)
    with no_host_reads():
        counts = torch.zeros(3, dtype=torch.long).scatter_add_(
            0, torch.tensor([0, 2, 2]), torch.ones(3, dtype=torch.long)
        )
        y = (t.softmax(-1) @ torch.randn(4, 4)).cumsum(0)[torch.tensor([1, 3])]
        y.sum().backward()
        torch.repeat_interleave(torch.arange(3), counts, output_size=3)
    assert t.grad is not None


ROUTINGS = {  # Switch's top-1 with capacity dropping (training and evaluation), and dropless top-2
    "top1-capacity": dict(top_k=1, capacity_factor=1.0, eval_capacity_factor=1.0),
    "top2-dropless": dict(top_k=2, capacity_factor=None, eval_capacity_factor=None),
}


def _train_model(kind: str, family: str, routing: str = "top1-capacity") -> TrainConfig:
    """kind: switch | mpoe | mpoe+recompute (moe.recompute_mpo_weights)."""
    kind, recompute = kind.removesuffix("+recompute"), kind.endswith("+recompute")
    model = ModelConfig(
        name=f"{family}_tiny", family=family, d_model=32, d_ff=64, num_layers=2, num_heads=2,
        vocab_size=256, max_position_embeddings=32, dropout=0.0,
    )  # fmt: skip
    moe = MoEConfig(
        kind=kind, num_experts=4, every=1, expert_impl="grouped", recompute_mpo_weights=recompute, **ROUTINGS[routing]
    )
    return TrainConfig(model=model, moe=moe, trainer=TrainerConfig(seq_len=16, micro_batch_size=2))


def _gpu_path(model: torch.nn.Module) -> torch.nn.Module:
    """What CUDA at ep_size 1 runs: the sync-free dispatch (the grouped backend is the config's)."""
    for module in model.modules():
        if hasattr(module, "dispatcher"):
            module.dispatcher.sync_free = True
    return model


@pytest.mark.skipif(GROUPED_MM is None, reason="this torch has no grouped_mm")
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("kind", ["switch", "mpoe", "mpoe+recompute"])
def test_a_training_forward_and_backward_reads_nothing_on_the_host(family, kind, routing):
    """The whole model (HF attention, the LM loss, every MoE layer's router, dispatch, experts and losses), the
    MPOE gradient mask's draw in backward, the step's statistics added up for the next log line, and an
    evaluation forward."""
    from mpoe.models.grad_mask import GradientMask, select_masked_params
    from mpoe.train.metrics.writer import Interval

    torch.manual_seed(0)
    model = _gpu_path(build_model(_train_model(kind, family, routing), 256, 0, 0, ExpertPlacement())).train()
    mask = GradientMask(select_masked_params(model, "central"), keep_prob=0.5) if kind != "switch" else None
    tokens = torch.randint(1, 250, (2, 16))
    batch = {"input_ids": tokens, **({"labels": tokens.roll(1, 1)} if family == "t5" else {})}
    model(**batch).loss.backward()  # warm-up outside the guard: lazy initialisation may read once
    model.zero_grad(set_to_none=True)
    interval = Interval(torch.device("cpu"))
    with no_host_reads():
        if mask is not None:
            mask.set_step(1)
        out = model(**batch)
        out.loss.backward()
        interval.add(out, tokens.numel())
        model.eval()
        with torch.no_grad():
            model(**batch)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert mask is None or any((p.grad == 0).any() for p in mask.params)  # the mask ran


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("kind", ["switch", "mpoe", "mpoe+recompute"])
def test_a_bf16_training_forward_and_backward_makes_no_tensor_off_the_models_device(family, kind):
    torch.manual_seed(0)
    model = build_model(_train_model(kind, family), 256, 0, 0, ExpertPlacement())
    model = _gpu_path(model.to(device="meta", dtype=torch.bfloat16)).train()
    tokens = torch.randint(1, 250, (2, 16), device="meta")
    batch = {"input_ids": tokens, **({"labels": tokens} if family == "t5" else {})}
    out = model(**batch)
    out.loss.backward()
    assert out.loss.device.type == "meta" and out.loss.dtype == torch.float32
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # (which exist: the CPU test above)
    assert grads and all(g.device.type == "meta" for g in grads)


def test_meta_catches_a_cpu_tensor_made_inside_forward():
    """The check above can fail: a tensor made without device= meets the model's."""
    x = torch.randn(4, 3, device="meta")
    with pytest.raises(RuntimeError, match="device"):
        x + torch.arange(3.0)


def _layer_step_ops(kind: str, impl: str, num_experts: int, routing: str) -> int:
    """Kernel-running ops of one training step (forward, backward of output and router losses) of one MoE layer.

    kind 'mpoe:LAYOUT' holds the MPOE bank's grouped layout fixed (the cheapest one depends on the expert count)."""
    kind, _, layout = kind.partition(":")
    torch.manual_seed(0)
    cfg = MoEConfig(kind=kind, num_experts=num_experts, expert_impl=impl, bond_dim=4, **ROUTINGS[routing])
    layer = _gpu_path(build_moe_layer(cfg, 32, 64, "gelu_new", ExpertPlacement(), bias=True)).train()
    x = torch.randn(256, 32, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        (out.square().mean() + layer.stats.aux_loss + layer.stats.z_loss).backward()

    with pytest.MonkeyPatch.context() as patch:
        if layout:
            patch.setattr(mpo, "cheapest_layout", lambda *args: layout)
        step()  # warm-up: lazy initialisation
        return device_ops(step).count


@pytest.mark.skipif(GROUPED_MM is None, reason="this torch has no grouped_mm")
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("kind", ["switch", "mpoe:contract", "mpoe:rows", "mpoe:cols"])
def test_a_training_step_launches_as_many_kernels_for_32_experts_as_for_4(kind, routing):
    """256 tokens reach all experts either way; the grouped backend's count must not depend on how many."""
    assert _layer_step_ops(kind, "grouped", 32, routing) == _layer_step_ops(kind, "grouped", 4, routing)


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_the_kernel_count_sees_a_per_expert_loop(kind):
    """The check above can fail: the loop backend (the CPU's) launches GEMMs expert by expert."""
    loop_4, loop_32 = (_layer_step_ops(kind, "loop", e, "top2-dropless") for e in (4, 32))
    assert loop_32 >= loop_4 + 2 * (32 - 4)  # at least two weight matrices, one GEMM each per expert
