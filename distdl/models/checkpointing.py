"""Activation checkpointing: keep fewer activations in the forward pass and recompute them in the
backward pass, trading compute (about one more forward) for memory.

transformers' models get their own gradient checkpointing, as HF Trainer turns it on
(`gradient_checkpointing=True`), in its non-reentrant form: the one PyTorch recommends, and the
one that leaves ZeRO-3's parameter hooks working. Recomputation replays the saved RNG state, so
dropout draws the same masks and the loss and gradients are those without checkpointing.
"""

from __future__ import annotations

from typing import Any

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
    return model
