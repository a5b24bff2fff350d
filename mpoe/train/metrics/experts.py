"""How far apart the experts of each MoE layer are, and how far an optimizer step moved MPOE's central tensors.

Both are monitoring statistics of the fine-tuning study, computed on logged steps only and returned as tensors on
the model's device; the training loop reads them to the host with its other numbers.

- Expert divergence, per MoE layer: the mean over the layer's E experts of ||W_e - W_mean||_F / ||W_mean||_F,
  where W_e is all of expert e's effective weight matrices together (`ExpertBank.effective_weights`: an MPOE
  expert's W rebuilt from the shared central and its own auxiliary tensors) and W_mean their mean over all E
  experts. Under expert parallelism each rank holds E / P of them: the sum of the matrices and the sum of the
  ratios are added up over the expert-parallel group, so every rank gets the global value. The arithmetic is in
  float64: E copies of one float32 matrix sum and divide back to it exactly, so identical experts (a freshly
  upcycled layer) give exactly 0.
- Central update, per MPOE layer: the L2 norm of the change of all of that layer's central tensors made by one
  optimizer step (`CentralUpdate`: `snapshot()` before the step, `norms()` after). Central tensors are shared
  parameters, the same on every rank, so no collective is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mpoe.models.experts import ExpertBank
from mpoe.parallel.collectives import all_reduce

ModelOrLayers = Union[nn.Module, Sequence[nn.Module]]


def expert_banks(model_or_layers: ModelOrLayers) -> list[ExpertBank]:
    """The expert bank of every MoE layer (one each), in the model's order: from a model, MoE layers or banks."""
    modules = [model_or_layers] if isinstance(model_or_layers, nn.Module) else model_or_layers
    return [m for module in modules for m in module.modules() if isinstance(m, ExpertBank)]


def _sum_over(tensor: Tensor, ep_group: Optional[dist.ProcessGroup]) -> Tensor:
    """`tensor` summed over the expert-parallel group (None: this process holds every expert)."""
    return tensor if ep_group is None else all_reduce(tensor, "sum", group=ep_group)


def _layer_divergence(bank: ExpertBank, ep_group: Optional[dist.ProcessGroup]) -> Tensor:
    """This rank's experts' share of the layer's divergence: sum over them of ||W_e - W_mean|| / ||W_mean||, over
    the layer's number of experts; a float64 scalar (W_mean is the mean over all experts)."""
    weights = [w.flatten(1).double() for w in bank.effective_weights()]  # [L, size] per matrix
    local_sum = torch.cat([w.sum(0) for w in weights])
    mean = _sum_over(local_sum, ep_group) / bank.num_experts
    means = mean.split([w.shape[1] for w in weights])
    distance_sq = sum((w - m).pow(2).sum(1) for w, m in zip(weights, means))  # [L]
    # clamp: experts that are all zero are identical (0, not 0/0); a zero mean of unequal experts is unbounded
    mean_norm = mean.pow(2).sum().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return (distance_sq.sqrt() / mean_norm).sum() / bank.num_experts


def expert_divergence(model_or_layers: ModelOrLayers, ep_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Per MoE layer, the mean relative distance of the experts' effective weights from their mean (module doc):
    float32 [num MoE layers] on the experts' device; empty for a model without MoE layers.

    ep_group: the expert-parallel group the experts are spread over (`ExpertPlacement.ep_group`); every rank of
    it must call this together. None: this process holds all experts."""
    banks = expert_banks(model_or_layers)
    if not banks:
        return torch.zeros(0)
    shares = torch.stack([_layer_divergence(bank, ep_group) for bank in banks])
    return _sum_over(shares, ep_group).float()


class CentralUpdate:
    """The L2 norm of each MPOE layer's central-tensor change over one optimizer step.

    Call `snapshot()` before the step and `norms()` after it, on logged steps only: the snapshot copies the
    central tensors (most of an MPOE layer's parameters) and `norms()` frees it. Layers whose bank has no central
    tensors (switch) are not counted; a model without any gives an empty `norms()`.
    """

    def __init__(self, model_or_layers: ModelOrLayers):
        centrals = [bank.param_roles().central for bank in expert_banks(model_or_layers)]
        self.layers: list[list[nn.Parameter]] = [c for c in centrals if c]  # per MPOE layer, its central tensors
        self._before: Optional[list[list[Tensor]]] = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def snapshot(self) -> None:
        """Copy the central tensors as they are now (before the optimizer step)."""
        with torch.no_grad():
            self._before = [[p.detach().clone() for p in layer] for layer in self.layers]

    def norms(self) -> Tensor:
        """float32 [num MPOE layers] on the parameters' device: per layer, sqrt of the sum over its central
        tensors of ||now - snapshot||^2. Frees the snapshot."""
        if self._before is None:
            raise RuntimeError("CentralUpdate.norms() needs a snapshot(): call snapshot() before the optimizer step")
        before, self._before = self._before, None
        if not self.layers:
            return torch.zeros(0)
        with torch.no_grad():
            squares = [
                sum((p.detach().double() - b.double()).pow(2).sum() for p, b in zip(layer, copies))
                for layer, copies in zip(self.layers, before)
            ]
        return torch.stack(squares).sqrt().float()
