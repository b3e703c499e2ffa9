"""What a workload provides to the training loop; each registers a subclass by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, TypeVar

import torch

from distdl.collectives import all_reduce_sum
from distdl.config import Config
from distdl.data.shards import BatchPlan, lockstep_slices
from distdl.errors import ConfigError

Result = TypeVar("Result")


@dataclass
class WorkerContext:
    """What a workload may know about where it runs; never the whole config."""

    rank: int
    world_size: int
    seed: int
    micro_batch_size: int
    run_dir: Path
    device: torch.device
    gradient_accumulation_steps: int = 1

    def batch_plan(self) -> BatchPlan:
        """This rank's part of every global batch (the training data's order, from the run's seed)."""
        return BatchPlan(self.micro_batch_size, self.gradient_accumulation_steps, self.world_size, self.rank,
                         self.seed)


@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout; batch norm's running statistics) for the block, then back
    in training mode, also when the block raises; gradients off."""
    model.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(True)


def evaluate_in_lockstep(context: WorkerContext, shard: Any, everything: Any,
                         forward: Callable[[Any], Result]) -> list[Result]:
    """`forward` on each micro-batch-sized slice of this rank's evaluation shard; the results of its
    own slices, in order.

    Every rank runs as many forward passes, because ZeRO-3 gathers parameters collectively in each:
    a rank whose shard is used up runs filler slices of `everything` and drops their results.
    """
    slices = lockstep_slices(shard, everything, context.micro_batch_size, context.world_size)
    return [result for rows, counted in slices for result in [forward(rows)] if counted]


def summed_over_ranks(parts: list[torch.Tensor], width: int, device: torch.device) -> list[float]:
    """Per-slice totals (each a vector of `width`) summed in float64 over this rank's slices, then
    over every rank; on the device, because NCCL reduces only device tensors."""
    totals = torch.zeros(width, dtype=torch.float64, device=device)
    for part in parts:
        totals += part.to(torch.float64)
    return all_reduce_sum(totals).tolist()


@dataclass
class ExampleStep:
    """The config's model (fresh weights) and a sample or two of its shapes with random content, without
    the data: what `distdl plan` counts model FLOPs and trainable parameters on when it has no profile."""

    models: dict[str, torch.nn.Module]
    loss: Callable[[], torch.Tensor]  # the samples' forward pass, to the loss the step's backward starts from
    samples: int = 1
    # Where the sample's shapes differ from the data's (the plan states it).
    caveat: Optional[str] = None


class Workload(ABC):
    # The workload's own top-level config sections and their dataclasses.
    sections: ClassVar[dict[str, type]] = {}
    # Dotted keys of its sections that may name local files (made absolute on the driver).
    path_keys: ClassVar[tuple[str, ...]] = ()
    # With several engines: the one whose weights `distdl export` writes.
    export_engine: ClassVar[Optional[str]] = None
    # Why optimizer.sam cannot wrap this workload's step, or None where it can: the loop runs SAM's
    # first pass on `loss` before `train_step`, so a workload with its own `train_step` refuses it.
    sharpness_aware_refusal: ClassVar[Optional[str]] = None
    # Why optimizer.noise kind minibatch cannot reweight this workload's examples, or None where
    # it can (the workload implements `example_losses`).
    minibatch_noise_refusal: ClassVar[Optional[str]] = "its loss does not split into per-example losses"

    def __init__(self, sections: dict[str, Any], context: WorkerContext) -> None:
        self.context = context

    @classmethod
    def validate(cls, config: Config) -> None:
        """Driver-side checks across the workload's sections (before Ray starts)."""

    @classmethod
    def prepare(cls, config: Config) -> Optional[int]:
        """Driver-side work done once before the workers start (files, tokenizer, caches).

        Returns the number of training examples when the workload has a fixed training set
        (what `trainer.epochs` counts in), else None.
        """
        return None

    @classmethod
    def checkpoint_metric(cls, sections: dict[str, Any]) -> Optional[str]:
        """An evaluation metric (higher is better) to keep the best checkpoints by, or None: the latest."""
        return None

    @classmethod
    def evaluation_metrics(cls, sections: dict[str, Any]) -> list[str]:
        """The numbers `evaluate` returns under these sections: what a sweep may rank its trials by."""
        return []

    @classmethod
    def example_step(cls, config: Config) -> ExampleStep:
        """One synthetic sample through the config's model (see ExampleStep)."""
        raise ConfigError(f"workload {config.workload}: distdl plan cannot count its FLOPs without a measured run; "
                          "give --profile RUN_DIR (a short run: distdl train CONFIG trainer.max_steps=50)")

    def build_model(self) -> torch.nn.Module:
        """The model, for workloads with one engine."""
        raise NotImplementedError

    def build_models(self) -> dict[str, torch.nn.Module]:
        """Each model gets its own DeepSpeed engine (and optimizer); most workloads have one."""
        return {"model": self.build_model()}

    def optimizer_warm_start(self) -> Optional[Path]:
        """A checkpoint of another run whose optimizer state a fresh run starts from, or None."""
        return None

    @abstractmethod
    def train_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches, beginning after the first `start` ones."""

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro-batch through `model` (the engine); the loss and per-batch metrics."""
        raise NotImplementedError

    def example_losses(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Like `loss`, but each example's loss (a vector whose mean is `loss`), for workloads that
        allow minibatch noise (see `minibatch_noise_refusal`)."""
        raise NotImplementedError

    def train_step(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One micro-batch: forward, backward and step (DeepSpeed steps the optimizer at accumulation
        boundaries). `model` is the engine, or for several engines the dict of them. Returns the
        metrics to average over the log window (tensors: no device sync per micro-batch)."""
        loss, metrics = self.loss(model, batch)
        model.backward(loss)
        model.step()
        return {"loss": loss, **metrics}

    @abstractmethod
    def evaluate(self, model: Any, step: int) -> dict[str, Any]:
        """Held-out metrics, reduced over all ranks (every rank calls it). A `Path` value is an image
        file (rank 0's), logged to W&B as an image."""

    def state_dict(self) -> dict[str, Any]:
        """What the workload itself must carry across a resume (saved with every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def summary(self) -> dict[str, Any]:
        """Entries for the run's summary.json and W&B summary, beyond the final metrics."""
        return {}

    def batch_size(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Samples and tokens in a micro-batch, for throughput."""
        first = next(iter(batch.values()))
        return {"samples": int(first.shape[0]), "tokens": int(first.numel())}

    @classmethod
    def export(cls, sections: dict[str, Any], run_dir: Path, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write consolidated fp32 weights in the format users load (HF for text, safetensors and a
        JSON for vision). A mismatch between weights and model is a ConfigError naming both."""
        raise NotImplementedError

    @classmethod
    def has_export_format(cls) -> bool:
        return cls.export.__func__ is not Workload.export.__func__


def initial_models(workload: Workload, seed: int) -> dict[str, torch.nn.Module]:
    """The run's initial weights: the same on every rank, and rebuilt alike by the studies."""
    torch.manual_seed(seed)
    return workload.build_models()
