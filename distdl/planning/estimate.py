"""Compute per sample without a measured run: the model FLOPs of the config's model, counted on a
synthetic sample (the workload's `example_step`), at a stated MFU of the cluster GPU's datasheet peak."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distdl.config import Config
from distdl.flops import counted_flops
from distdl.registry import WORKLOADS


@dataclass(frozen=True)
class Estimate:
    flops_per_sample: float  # model FLOPs of one sample's forward and backward passes
    trainable_parameters: int
    mfu: float  # stated: the share of the peak the run is taken to reach
    peak_tflops: float  # one GPU's, at the config's precision
    caveat: Optional[str] = None  # where the synthetic sample's shapes differ from the data's

    @property
    def compute_per_sample_s(self) -> float:
        return self.flops_per_sample / (self.mfu * self.peak_tflops * 1e12)


def estimate_compute(config: Config, mfu: float, peak_tflops: float) -> Estimate:
    """Count the model FLOPs of one synthetic step on this machine's CPU (fresh weights; counted as the
    training loop counts them, activation recomputation left out)."""
    example = WORKLOADS.get(config.workload).example_step(config)
    with counted_flops() as count:
        example.loss().backward()
    parameters = sum(p.numel() for model in example.models.values() for p in model.parameters() if p.requires_grad)
    return Estimate(count.model / example.samples, parameters, mfu, peak_tflops, example.caveat)
