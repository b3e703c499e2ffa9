"""LAMB and LARS, layer-wise adaptive optimizers that stay layer-wise inside DeepSpeed.

Both scale each layer's step by a trust ratio, a ratio of the layer's weight norm to its update's
norm. timm's `Lamb` and `Lars` (and apex's FusedLAMB) take a layer's norm over the tensor they are
handed. Inside DeepSpeed that tensor is often not a layer: ZeRO stages 1 and 2 (and DeepSpeed's
BF16_Optimizer, with fp32 gradient accumulation) hand the optimizer one flat fp32 partition per
parameter group, holding fragments of many layers (a layer may straddle two ranks); ZeRO-3 hands it
a 1/N slice of every layer. A norm over such a tensor mixes layers, and the update is not LAMB's.
(fp32 at ZeRO-0 steps the model's own parameters, and bf16 at ZeRO-0 one fp32 copy of each.)

So each tensor the optimizer steps may carry a `FragmentLayout`: the consecutive segments it is cut
into and the layer each belongs to. A layer's squared norms are summed over its segments and, where
layers are split across ranks, all-reduced over the data-parallel group (one all-reduce of two
numbers per layer and parameter group per step) before the ratios are taken. A tensor without a
layout is a layer of its own, which is timm's behaviour exactly: tests/unit/test_layerwise.py checks
both optimizers against timm's and against the papers' updates, and
tests/distributed/test_engine_steps.py against a plain loop at every ZeRO stage.

A parameter group is adapted when its `layerwise` key says so (distdl's `param_groups` sets it for
matrices, not for biases and normalization weights, as NVIDIA's LAMB and MLPerf's LARS exclude them);
without the key, when its weight decay is not 0, which is timm's and apex's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

# Sums a (2, layers) tensor over the ranks that share the layers, in place.
Reduce = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class FragmentLayout:
    """How one flat tensor is cut: consecutive segments of `lengths` elements, the i-th a fragment of
    layer `layers[i]` (-1: padding, no layer), layers numbered in [0, num_layers) across its group.
    `reduce` sums the group's per-layer squares over the ranks holding the other fragments; None when
    this rank holds whole layers."""

    lengths: tuple[int, ...]
    layers: tuple[int, ...]
    num_layers: int
    reduce: Optional[Reduce] = None


@dataclass(frozen=True)
class _Cuts:
    """A parameter group's tensors as segments: per tensor its segment lengths and each segment's
    layer (padding maps to the extra layer `num_layers`, whose ratio is always 1)."""

    lengths: list[tuple[int, ...]]
    indices: list[torch.Tensor]
    num_layers: int
    reduce: Optional[Reduce]


class LayerwiseOptimizer(torch.optim.Optimizer):
    """The trust-ratio machinery LAMB and LARS share: per-layer norms over fragments, and scaling."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self.layouts: dict[int, FragmentLayout] = {}
        self._indices: dict[int, torch.Tensor] = {}
        self._laid_out: list[torch.Tensor] = []

    def set_layouts(self, layouts: dict[torch.Tensor, FragmentLayout]) -> None:
        """Declare how the tensors this optimizer steps are cut into layers (see the module doc).
        Each layout's segment-to-layer index is built here, once, on its tensor's device."""
        self.layouts = {id(tensor): layout for tensor, layout in layouts.items()}
        self._indices = {id(tensor): torch.tensor([layer if layer >= 0 else layout.num_layers
                                                   for layer in layout.layers], device=tensor.device)
                         for tensor, layout in layouts.items()}
        self._laid_out = list(layouts)

    @torch.no_grad()
    def layer_weight_norms(self) -> list[torch.Tensor]:
        """Each layer's weight norm as the trust ratios see it, summed over its fragments, per set of
        tensors stepped together: a parameter group, or each flat tensor with a layout (ZeRO-3 steps
        its sub-groups one at a time). A collective where layers are split across ranks."""
        tensor_sets = [[tensor] for tensor in self._laid_out] if self._laid_out else [list(g["params"]) for g in self.param_groups]
        return [self._square_norms(self._cuts(tensors), tensors, tensors)[0].sqrt() if tensors else torch.zeros(0)
                for tensors in tensor_sets]

    def _cuts(self, params: list[torch.Tensor]) -> Optional[_Cuts]:
        """How `params` are cut into layers; None when each is a layer of its own."""
        layouts = [self.layouts.get(id(p)) for p in params]
        if all(layout is None for layout in layouts):
            return None
        if any(layout is None for layout in layouts):
            raise ValueError("a parameter group mixes tensors with and without a fragment layout")
        return _Cuts([layout.lengths for layout in layouts], [self._indices[id(p)] for p in params],
                     layouts[0].num_layers, layouts[0].reduce)

    @staticmethod
    def _square_norms(cuts: Optional[_Cuts], first: list[torch.Tensor], second: list[torch.Tensor]) -> torch.Tensor:
        """Per layer, the squared norms of `first` and `second` (shaped as the cut tensors), summed
        over the layer's fragments here and on the other ranks: a (2, layers) tensor."""
        dtype = torch.float64 if first[0].dtype == torch.float64 else torch.float32
        if cuts is None:
            return torch.stack([torch.stack(torch._foreach_norm(tensors)).to(dtype) for tensors in (first, second)]).square()
        sums = torch.zeros(2, cuts.num_layers + 1, dtype=dtype, device=first[0].device)
        for lengths, index, tensor_a, tensor_b in zip(cuts.lengths, cuts.indices, first, second):
            for row, tensor in enumerate((tensor_a, tensor_b)):
                norms = torch._foreach_norm(list(torch.split(tensor.reshape(-1), list(lengths))))
                sums[row].index_add_(0, index, torch.stack(norms).to(dtype).square())
        sums = sums[:, :cuts.num_layers].contiguous()
        if cuts.reduce is not None:
            cuts.reduce(sums)
        return sums

    @staticmethod
    def _scale(cuts: Optional[_Cuts], tensors: list[torch.Tensor], trust: torch.Tensor) -> None:
        """Multiply each layer's fragments of `tensors` by the layer's trust ratio."""
        if cuts is None:
            torch._foreach_mul_(tensors, list(trust.to(tensors[0].dtype).unbind()))
            return
        trust = torch.cat([trust, trust.new_ones(1)])
        for lengths, index, tensor in zip(cuts.lengths, cuts.indices, tensors):
            segments = list(torch.split(tensor.view(-1), list(lengths)))
            torch._foreach_mul_(segments, list(trust[index].to(tensor.dtype).unbind()))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = self._with_grads(group)
            if not params:
                continue
            self._step_group(group, params)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Update one parameter group's tensors that have gradients."""
        raise NotImplementedError

    @staticmethod
    def _adapts(group: dict[str, Any]) -> bool:
        return bool(group.get("layerwise", group["weight_decay"] != 0))

    @staticmethod
    def _with_grads(group: dict[str, Any]) -> list[torch.Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("LAMB and LARS do not take sparse gradients")
        return params


def _ratio_or_one(numerator: torch.Tensor, denominator: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The trust ratio, 1 for a layer where either norm is 0 (as in timm and apex)."""
    return torch.where((numerator > 0) & (denominator > 0), ratio, torch.ones_like(ratio))


class Lamb(LayerwiseOptimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
    Minutes", Algorithm 2), with Adam's bias correction as NVIDIA's BERT pretraining uses it:

        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay w
        w = w - lr (|w| / |u|) u        (the ratio 1 where a norm is 0; none in a group not adapted)

    NVIDIA's recipe also divides the gradients by their global norm when it exceeds 1: that is
    DeepSpeed's gradient clipping at 1.0 (engine.gradient_clipping), applied before this step."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_add_([s["step"] for s in states], 1)
        # Per tensor: one without a gradient at some step (skipped above) has taken fewer steps.
        steps = [int(s["step"].item()) for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_div(exp_avg_sqs, [1 - beta2 ** step for step in steps])
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(exp_avgs, [1 - beta1 ** step for step in steps])
        torch._foreach_div_(updates, denominators)
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        if self._adapts(group):
            cuts = self._cuts(params)
            weight_norm, update_norm = self._square_norms(cuts, params, updates).sqrt()
            self._scale(cuts, updates, _ratio_or_one(weight_norm, update_norm, weight_norm / update_norm))
        torch._foreach_add_(params, updates, alpha=-group["lr"])


class Lars(LayerwiseOptimizer):
    """LARS (You et al. 2017, "Large Batch Training of Convolutional Networks", Algorithm 1), in the
    form MLPerf's ResNet-50 reference uses, the learning rate inside the momentum:

        local_lr = trust_coefficient |w| / (|g| + weight_decay |w|)
        v = momentum v + lr local_lr (g + weight_decay w),   w = w - v

    (local_lr 1 where a norm is 0). In a group not adapted (biases, batch-norm weights, with weight
    decay 0) it is momentum SGD, v = momentum v + lr g, as in MLPerf's skip list."""

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                 trust_coefficient: float = 0.001, eps: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "trust_coefficient": trust_coefficient, "eps": eps})

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        decay, coefficient, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
        grads = [p.grad for p in params]
        updates = torch._foreach_add(grads, params, alpha=decay)
        if self._adapts(group):
            cuts = self._cuts(params)
            weight_norm, grad_norm = self._square_norms(cuts, params, grads).sqrt()
            self._scale(cuts, updates, _ratio_or_one(
                weight_norm, grad_norm, coefficient * weight_norm / (grad_norm + decay * weight_norm + eps)))
        buffers = []
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(self.state[p]["momentum_buffer"])
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, updates, alpha=group["lr"])
        torch._foreach_sub_(params, buffers)
