"""Activation checkpointing: keep fewer activations in the forward pass and recompute them in the
backward pass, trading compute (about one more forward) for memory.

ResNets checkpoint each residual block with torch.utils.checkpoint (non-reentrant), keeping batch
norm's running statistics from being updated twice by the recomputation.

transformers' models get their own gradient checkpointing, as HF Trainer turns it on
(`gradient_checkpointing=True`), in its non-reentrant form: the one PyTorch recommends, and the
one that leaves ZeRO-3's parameter hooks working. Recomputation replays the saved RNG state, so
dropout draws the same masks and the loss and gradients are those without checkpointing.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distdl.errors import ConfigError


def checkpoint_transformer_layers(model: Any, key: str = "model.activation_checkpointing") -> Any:
    """Turn on a transformers model's gradient checkpointing (each layer's activations recomputed)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{key}=true: {type(model).__name__} does not support transformers' gradient "
                          "checkpointing; set it to false")
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    # Each layer checkpoints through transformers' `_gradient_checkpointing_func`: ours passes the
    # recomputation-counting context only while a FLOP count runs (eagerly), because torch.compile
    # accepts no context_fn but dispatch modes.
    layers = [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    if not layers:
        raise ConfigError(f"{key}=true: {type(model).__name__} has no layer with transformers' "
                          "_gradient_checkpointing_func; this transformers version checkpoints differently")
    for layer in layers:
        layer._gradient_checkpointing_func = _checkpoint_counting_recomputation
    return model


def _checkpoint_counting_recomputation(function: Any, *args: Any, **kwargs: Any) -> Any:
    if _counts:
        kwargs["context_fn"] = recomputation_contexts
    return checkpoint(function, *args, use_reentrant=False, **kwargs)


class CheckpointedSequential(nn.Sequential):
    """A Sequential run as segments of consecutive children (by default, each child one segment: a
    residual block), whose activations inside each segment are recomputed in the backward pass; only
    the segments' inputs are kept. Its children keep their names (0, 1, ...), so state dicts,
    checkpoints and exports are those of the plain model.

    `segment_ends` are the indices after which a segment ends; children after the last end run
    without checkpointing (as torch.utils.checkpoint.checkpoint_sequential leaves its last segment).
    """

    def __init__(self, *children: nn.Module, segment_ends: Optional[Sequence[int]] = None) -> None:
        super().__init__(*children)
        ends = list(range(len(children))) if segment_ends is None else sorted(segment_ends)
        starts = [0] + [end + 1 for end in ends[:-1]]
        self.segments = list(zip(starts, [end + 1 for end in ends]))
        self.tail_start = ends[-1] + 1 if ends else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        children = list(self)
        recompute = self.training and torch.is_grad_enabled()
        for start, stop in self.segments:
            segment = children[start:stop]
            if recompute:
                x = checkpoint(_in_turn, segment, x, use_reentrant=False, context_fn=lambda segment=segment:
                               recomputation_contexts(lambda: batch_norm_statistics_kept(*segment)))
            else:
                x = _in_turn(segment, x)
        return _in_turn(children[self.tail_start:], x)


def _in_turn(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


@contextmanager
def batch_norm_statistics_kept(*modules: nn.Module) -> Iterator[None]:
    """Batch norm's running statistics as they are, while the backward pass recomputes `modules`.

    The recomputation runs batch norm in training mode a second time, which would fold the same
    batch into the running mean and variance twice; with momentum 0 the update keeps them, and
    the batch counter is put back.
    """
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, batches) in zip(norms, saved):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(batches)


def compile_refused(models: str) -> ConfigError:
    """Why these checkpointed blocks and trainer.compile cannot go together, for `validate`."""
    return ConfigError(f"model.activation_checkpointing=true and trainer.compile=true cannot go together for "
                       f"{models}: the checkpointed blocks keep batch norm's running statistics from a second "
                       "update with a context torch.compile cannot trace; set one of them to false")


def checkpoint_conv_blocks(net: nn.Sequential, key: str = "model.activation_checkpointing") -> CheckpointedSequential:
    """Checkpoint each block of a plain convolutional stack (convolution, norm, activation: DCGAN's
    nets), a segment ending at each activation. What follows the last activation, the output
    convolution (and tanh), is left as is: its only activations are its input and output, which
    are kept anyway."""
    ends = [i for i, child in enumerate(net) if isinstance(child, _ACTIVATIONS) and i < len(net) - 1]
    if not ends:
        raise ConfigError(f"{key}=true: the {type(net).__name__} has no activation layers to end blocks at")
    return CheckpointedSequential(*net, segment_ends=ends)


_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU)


def checkpoint_residual_stages(model: nn.Module, key: str = "model.activation_checkpointing") -> nn.Module:
    """Checkpoint every residual block of a torchvision ResNet (layer1-4) or a CIFAR ResNet (layers)."""
    stages = [name for name in ("layer1", "layer2", "layer3", "layer4", "layers")
              if isinstance(getattr(model, name, None), nn.Sequential)]
    if not stages:
        raise ConfigError(f"{key}=true applies to ResNets (residual blocks); {type(model).__name__} has none")
    for name in stages:
        setattr(model, name, CheckpointedSequential(*getattr(model, name)))
    return model


@dataclass
class RecomputedFlops:
    flops: int = 0


# The counts in progress, each with the factory of the FLOP counter it counts recomputation with.
_counts: list[tuple[RecomputedFlops, Callable[[], Any]]] = []


@contextmanager
def recomputation_counted(make_counter: Callable[[], Any]) -> Iterator[RecomputedFlops]:
    """While the block runs, the FLOPs of every recomputation are also counted apart (with a fresh
    `make_counter()`, a torch FlopCounterMode), so that a FLOP count can leave them out."""
    counted = RecomputedFlops()
    _counts.append((counted, make_counter))
    try:
        yield counted
    finally:
        _counts.remove((counted, make_counter))


@contextmanager
def _recomputing() -> Iterator[None]:
    if not _counts:
        yield
        return
    counter = _counts[-1][1]()
    try:
        with counter:
            yield
    finally:  # also when the recomputation stops early, as non-reentrant checkpointing does by raising
        for counted, _ in _counts:
            counted.flops += counter.get_total_flops()


def recomputation_contexts(*during_recomputation: Callable[[], ContextManager]) -> tuple[ContextManager, ContextManager]:
    """torch.utils.checkpoint's `context_fn`: nothing around the forward pass; around each
    recomputation, the contexts `during_recomputation` make, and the count of its FLOPs when one
    is in progress.

    torch calls `context_fn` once per forward and enters its recomputation context at every
    recomputation, and a backward pass that builds a graph (create_graph: WGAN-GP's penalty, a
    Hessian-vector product) recomputes more than once: so the context is made anew at each entry.
    """
    return nullcontext(), _MadeAnewEachEntry(lambda: _recomputation(during_recomputation))


class _MadeAnewEachEntry:
    """A context manager that may be entered again: each entry makes and enters a fresh one."""

    def __init__(self, make: Callable[[], ContextManager]) -> None:
        self.make = make
        self.entered: list[ContextManager] = []

    def __enter__(self) -> Any:
        context = self.make()
        self.entered.append(context)
        return context.__enter__()

    def __exit__(self, *exc_info: Any) -> Any:
        return self.entered.pop().__exit__(*exc_info)


@contextmanager
def _recomputation(during: tuple[Callable[[], ContextManager], ...]) -> Iterator[None]:
    with ExitStack() as stack:
        for make in during:
            stack.enter_context(make())
        stack.enter_context(_recomputing())
        yield
