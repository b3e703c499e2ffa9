"""Optimizers (torch's, and distdl's layer-wise LAMB and LARS), with Langevin noise on request, and
LR schedules, built from their config sections."""

from __future__ import annotations

import bisect
import math
from functools import partial
from typing import Any, Callable, Iterable, Optional

import torch

from distdl.config import NoiseSection, OptimizerSection, SchedulerSection
from distdl.optim.layerwise import Lamb, Lars
from distdl.seeds import derived_seed


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases and norm weights (1-D) are left undecayed, as in BERT and GPT.
    LAMB and LARS adapt the same matrices only (`layerwise`), as NVIDIA's LAMB and MLPerf's LARS do;
    other optimizers ignore the key."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay, "layerwise": True},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, "layerwise": False},
    ]


def effective_lr(section: OptimizerSection, global_batch_size: int) -> float:
    """optimizer.lr, scaled with the batch when a reference batch is set: linearly (Goyal et al. 2017:
    lr = 0.1 x batch / 256 for ResNet-50 with SGD) or by the square root of the ratio."""
    if section.reference_batch_size is None:
        return section.lr
    ratio = global_batch_size / section.reference_batch_size
    return section.lr * (ratio if section.lr_scaling == "linear" else math.sqrt(ratio))


OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


def optimizer_factory(section: OptimizerSection, global_batch_size: int, seed: int = 0) -> OptimizerFactory:
    """A callable DeepSpeed applies to the (possibly partitioned) parameter groups; with
    `optimizer.noise`, its optimizers add Langevin noise drawn from `seed` after each step."""
    return with_noise(_base_factory(section, global_batch_size), section.noise, seed)


def _base_factory(section: OptimizerSection, global_batch_size: int) -> OptimizerFactory:
    lr = effective_lr(section, global_batch_size)

    # torch's fused kernels (CPU and CUDA) update every parameter in one call, where its default on
    # CPU steps one parameter at a time: 8% of a BERT fine-tuning step on 2 CPU cores. HF Trainer's
    # default (adamw_torch_fused) is the same kernel.
    def make(params: Iterable[Any]) -> torch.optim.Optimizer:
        if section.name == "lamb":
            return Lamb(params, lr=lr, betas=tuple(section.betas), eps=section.eps, weight_decay=section.weight_decay)
        if section.name == "lars":
            return Lars(params, lr=lr, momentum=section.momentum, weight_decay=section.weight_decay,
                        trust_coefficient=section.trust_coefficient)
        if section.name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=section.momentum, weight_decay=section.weight_decay,
                                   nesterov=section.nesterov, fused=True)
        cls = torch.optim.AdamW if section.name == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, betas=tuple(section.betas), eps=section.eps, weight_decay=section.weight_decay,
                   fused=True)

    return make


class LangevinNoise:
    """Mixed into an optimizer class: after each step, every parameter it stepped gets independent
    N(0, 2 lr T) noise, lr the group's scheduled rate and T the temperature. With the loss as the
    potential, that is Welling & Teh's (2011) Langevin update, the Euler-Maruyama step of
    dw = -grad L dt + sqrt(2 T) dW; for L a mean negative log-likelihood over N examples (weight
    decay its prior), T = 1/N samples the posterior, as SGLD does.

    The draws come from their own generator, seeded by (seed, global step, stream): a resume draws
    them again exactly, and the data order and dropout are untouched. The engine sets the step
    before each optimizer step, and the stream: 0 where every rank steps the same whole weights (so
    they draw the same noise), the rank where each steps its own ZeRO partition."""

    temperature: float = 0.0
    noise_seed: int = 0
    noise_stream: int = 0
    noise_step: int = 0
    # ZeRO-3 steps the optimizer once per sub-group of parameters in every optimizer step: each call
    # of a step draws its own noise, in the same order at every step and after a resume.
    _drawn_step: int = -1
    _draws: int = 0

    @torch.no_grad()
    def step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().step(*args, **kwargs)  # type: ignore[misc]
        if self._drawn_step != self.noise_step:
            self._drawn_step, self._draws = self.noise_step, 0
        seed = derived_seed(self.noise_seed, self.noise_step, self.noise_stream, self._draws)
        self._draws += 1
        generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:  # type: ignore[attr-defined]
            std = math.sqrt(2 * group["lr"] * self.temperature)
            for param in group["params"]:
                if param.grad is None:
                    continue
                generator = generators.get(param.device)
                if generator is None:
                    generator = generators[param.device] = torch.Generator(param.device).manual_seed(seed)
                noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)
                param.add_(noise, alpha=std)
        return loss


def with_noise(make: OptimizerFactory, noise: Optional[NoiseSection], seed: int) -> OptimizerFactory:
    """`make`, its optimizers adding isotropic `noise` after each step (none at temperature 0;
    minibatch noise goes into the gradient instead, in the loop)."""
    if noise is None or noise.kind != "isotropic" or noise.temperature == 0:
        return make

    def noisy(params: Iterable[Any]) -> torch.optim.Optimizer:
        optimizer = make(params)
        base = type(optimizer)
        # The same object, its class now the base's subclass with the noise: DeepSpeed and torch see
        # the base optimizer (isinstance, state, checkpoints), whatever the base is.
        optimizer.__class__ = type(f"Langevin{base.__name__}", (LangevinNoise, base), {})
        optimizer.temperature, optimizer.noise_seed = noise.temperature, seed  # type: ignore[attr-defined]
        return optimizer

    return noisy


def minibatch_noise_scale(global_batch: int, micro_batch: int, noise_batch: int) -> float:
    """s in `minibatch_noise_weights` for micro-batches of `micro_batch` examples that DeepSpeed
    averages into a gradient of `global_batch`, for that gradient to get the noise of `noise_batch`.

    Within a micro-batch of m examples with per-example gradients g_i, sum_i (z_i - mean z) g_i =
    sum_i z_i (g_i - mean g) has covariance (m - 1) S, S their sample covariance: an unbiased estimate
    of the per-example gradient covariance Sigma, since a micro-batch is a random draw of the data.
    Scaled by s, and averaged over the B/m micro-batches of a step, it has covariance
    (m/B)^2 (B/m) s^2 (m - 1) Sigma, which is Sigma (1/b - 1/B) for the s below. The batch-B gradient's
    own noise (Sigma / B) plus this is Sigma / b: the gradient noise of batch b."""
    if micro_batch < 2 or noise_batch >= global_batch:
        raise ValueError(f"minibatch noise needs micro-batches of 2 or more (got {micro_batch}) and a noise batch "
                         f"below the global batch (got {noise_batch} and {global_batch})")
    return math.sqrt(global_batch / micro_batch * (1 / noise_batch - 1 / global_batch) / (micro_batch - 1))


def minibatch_noise_weights(count: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Weights for a micro-batch's per-example losses: 1/m each (the mean loss), plus s (z_i - mean z)
    with z ~ N(0, I). The gradient of the weighted sum is the micro-batch's gradient plus
    s sum_i z_i (g_i - mean g), Gaussian noise shaped like per-example gradient noise, for the cost of
    the usual backward pass: no per-example gradient is ever formed."""
    z = torch.randn(count, generator=generator, dtype=torch.float64)
    return (1.0 / count + scale * (z - z.mean())).float()


def scheduler_factory(section: SchedulerSection, max_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    from transformers import get_scheduler

    warmup = section.warmup_steps or int(section.warmup_ratio * max_steps)

    def make(optimizer: torch.optim.Optimizer) -> Any:
        if section.name == "step":
            milestones = [round(fraction * max_steps) for fraction in section.milestones]
            return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_step_decay, warmup, milestones, section.gamma))
        total, extra = max_steps, None
        if section.name == "polynomial":
            extra = {"power": section.power, "lr_end": section.lr_end}
            # transformers' polynomial decay divides by the steps after the warmup (its other schedules
            # guard that with max(1, ...)): a warmup as long as the run would divide by zero at its end.
            total = max(max_steps, warmup + 1)
        return get_scheduler(section.name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                             scheduler_specific_kwargs=extra)

    return make


def _step_decay(warmup: int, milestones: list[int], gamma: float, step: int) -> float:
    """The lr factor at `step`: a linear warmup (as transformers' schedules), then gamma to the
    number of milestones passed (torch's MultiStepLR, counted from the run's start)."""
    if step < warmup:
        return step / max(1, warmup)
    return gamma ** bisect.bisect_right(milestones, step)
