"""Which backend computes which bank: `{bank kind: {implementation: backend}}`, chosen once per device.

`moe.expert_impl` names the implementation: `loop`, `grouped`, or `auto`, which is
`grouped` only where torch's grouped GEMM has its fused kernel (`grouped.fast_path`:
bf16 on CUDA from compute capability 9.0) and `loop` everywhere else: on CUDA
without that kernel grouped_mm falls back to a loop of its own that copies the
offsets to the host on every call, and on the CPU the loop backend's ops are the
faster ones. Explicit names are honoured on every device.

The choice depends on where the bank computes and in which dtype, so it is made
once the model is on its device (`banks.resolve_expert_backends`), not per forward;
a bank just built resolves for where its parameters are, so it computes at once.
"""

from __future__ import annotations

import torch

from mpoe.config import EXPERT_IMPLS
from mpoe.models.experts.backend import ExpertBackend
from mpoe.models.experts.grouped import GroupedBackend, fast_path
from mpoe.models.experts.loop import MPOELoopBackend, SwitchLoopBackend

BACKENDS: dict[str, dict[str, type[ExpertBackend]]] = {
    "switch": {"loop": SwitchLoopBackend, "grouped": GroupedBackend},
    "mpoe": {"loop": MPOELoopBackend, "grouped": GroupedBackend},
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def choose_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """`moe.expert_impl` made concrete for computing on `device` in `dtype`."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"moe.expert_impl={impl!r} is invalid: use one of {', '.join(EXPERT_IMPLS)}")
    if impl == "auto":
        return "grouped" if fast_path(device, dtype) else "loop"
    return impl


def backend_for(kind: str, impl: str) -> type[ExpertBackend]:
    """The registered backend of bank kind `kind` for a concrete implementation `impl`."""
    if kind not in BACKENDS:
        raise ValueError(f"moe.kind={kind!r} has no expert backends: use one of {', '.join(BACKENDS)}")
    return BACKENDS[kind][impl]


def describe(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """'grouped, bf16, sm90': the implementation, the dtype and where it computes."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"sm{major}{minor}"
    else:
        where = device.type
    return f"{impl}, {_DTYPE_NAMES.get(dtype, str(dtype).removeprefix('torch.'))}, {where}"
