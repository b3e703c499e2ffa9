"""The model `distdl plan` predicts a data-parallel run with, at N GPUs (docs/plan.md has the equations).

Step time = the samples a GPU takes x compute per sample + the gradient synchronization the backward
pass does not hide + the optimizer step. The synchronization is a ring all-reduce of the gradients
inside a node, hierarchical across nodes (reduce-scatter in the node, a ring over the nodes for each
GPU's shard, all-gather in the node), at ZeRO's volume: stages 0-2 move what an all-reduce moves,
stage 3 half as much again (its parameter all-gathers in the forward and backward passes;
Rajbhandari et al. 2020, section 7). Steps to a target loss fall with the global batch B as
S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018); time-to-target is S(B(N)) x step time(N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from distdl.planning.cluster import ClusterSpec, Link

# The all-reduce volume each ZeRO stage moves, per optimizer step, against plain data parallelism's.
ZERO_VOLUME = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.5}


def ring_allreduce_seconds(message_bytes: float, ranks: int, link: Link) -> float:
    """A ring all-reduce: each of 2(n-1) steps sends 1/n of the message to the next rank."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * message_bytes / link.bytes_per_s + 2 * (ranks - 1) * link.latency_s


def ring_half_seconds(message_bytes: float, ranks: int, link: Link) -> float:
    """A ring reduce-scatter or all-gather: half of an all-reduce."""
    return ring_allreduce_seconds(message_bytes, ranks, link) / 2


def allreduce_seconds(message_bytes: float, gpus: int, cluster: ClusterSpec) -> float:
    """An all-reduce over `gpus` GPUs packed onto whole nodes: a ring inside one node; across nodes,
    reduce-scatter in each node, a ring over the nodes for each GPU's 1/g shard (each GPU on its own
    share of the node's network), then all-gather in each node."""
    per_node = min(gpus, cluster.gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    if nodes == 1:
        return ring_allreduce_seconds(message_bytes, per_node, cluster.intra_node)
    shard = message_bytes / per_node
    return (2 * ring_half_seconds(message_bytes, per_node, cluster.intra_node)
            + ring_allreduce_seconds(shard, nodes, cluster.inter_node))


def gradient_sync_seconds(gradient_bytes: float, zero_stage: int, gpus: int, cluster: ClusterSpec) -> float:
    """What one optimizer step communicates at a ZeRO stage, unhidden."""
    return ZERO_VOLUME[zero_stage] * allreduce_seconds(gradient_bytes, gpus, cluster)


def steps_to_target(batch: float, min_steps: float, critical_batch: float) -> float:
    """McCandlish et al.'s S(B) = S_min (1 + B_crit / B)."""
    return min_steps * (1 + critical_batch / batch)


@dataclass(frozen=True)
class BatchPolicy:
    """How the global batch follows the GPU count. per_gpu: each GPU takes `size` samples a step
    (micro-batches accumulated), so the global batch grows with N (weak scaling); global: the global
    batch stays `size`, and each GPU takes its share (strong scaling)."""

    kind: Literal["per_gpu", "global"]
    size: int

    def global_batch(self, gpus: int) -> int:
        return self.size * gpus if self.kind == "per_gpu" else self.size

    def split(self, gpus: int, micro_batch: int) -> Optional[tuple[int, int]]:
        """(micro-batch, micro-batches per GPU per step) for N GPUs: the configured micro-batch, or the
        GPU's whole share where that is smaller; None where N GPUs cannot split the batch into whole
        micro-batches."""
        share, left = divmod(self.global_batch(gpus), gpus)
        if left or share < 1:
            return None
        micro = min(micro_batch, share)
        accumulation, left = divmod(share, micro)
        return None if left else (micro, accumulation)


@dataclass(frozen=True)
class StepModel:
    """One data-parallel step, from a profile (or FLOP counts and a stated MFU)."""

    compute_per_sample_s: float  # forward and backward of one sample on one GPU, at the profiled micro-batch
    micro_batch: int  # the largest micro-batch a GPU runs
    gradient_bytes: float  # the gradients one GPU holds, at their communication precision
    zero_stage: int = 0
    # The share of the synchronization that runs beside the backward pass (0: none hidden).
    overlap: float = 0.0
    # The optimizer step over all the parameters on one GPU; ZeRO stages 1-3 split it over the GPUs
    # (each steps its partition of the optimizer state).
    optimizer_s: float = 0.0

    def step_seconds(self, gpus: int, samples_per_gpu: int, cluster: ClusterSpec) -> float:
        exposed = (1 - self.overlap) * gradient_sync_seconds(self.gradient_bytes, self.zero_stage, gpus, cluster)
        optimizer = self.optimizer_s / gpus if self.zero_stage >= 1 else self.optimizer_s
        return samples_per_gpu * self.compute_per_sample_s + exposed + optimizer


@dataclass(frozen=True)
class ScalingFit:
    """A scaling study's fit of steps to the target loss against the global batch."""

    min_steps: float
    critical_batch: float


def predict(model: StepModel, cluster: ClusterSpec, policy: BatchPolicy, gpu_counts: list[int],
            scaling: Optional[ScalingFit] = None) -> list[dict[str, float]]:
    """One row per GPU count the batch policy allows: step time, throughput, scaling efficiency
    against one GPU at the same per-GPU work, and with a scaling fit, steps and time to the target
    and the GPU-hours they take."""
    rows = []
    for gpus in gpu_counts:
        split = policy.split(gpus, model.micro_batch)
        if split is None:
            continue
        micro, accumulation = split
        batch = policy.global_batch(gpus)
        step = model.step_seconds(gpus, batch // gpus, cluster)
        alone = model.step_seconds(1, batch // gpus, cluster)  # the same samples on one GPU
        row = {"gpus": gpus, "nodes": math.ceil(gpus / cluster.gpus_per_node), "global_batch": batch,
               "micro_batch": micro, "accumulation": accumulation, "step_s": step, "samples_per_s": batch / step,
               "efficiency": alone / step}
        if scaling is not None:
            steps = steps_to_target(batch, scaling.min_steps, scaling.critical_batch)
            row.update(steps_to_target=steps, time_to_target_s=steps * step, gpu_hours=gpus * steps * step / 3600)
        rows.append(row)
    return rows


def knee(rows: list[dict[str, float]], gpu_hours_tolerance: float) -> dict[str, Optional[int]]:
    """The GPU count with the least time to target, and the largest whose GPU-hours stay within
    `gpu_hours_tolerance` (0.1: 10%) of the least any count takes."""
    timed = [row for row in rows if "time_to_target_s" in row]
    if not timed:
        return {"fastest_gpus": None, "knee_gpus": None}
    cheapest = min(row["gpu_hours"] for row in timed)
    within = [row["gpus"] for row in timed if row["gpu_hours"] <= cheapest * (1 + gpu_hours_tolerance)]
    return {"fastest_gpus": min(timed, key=lambda row: row["time_to_target_s"])["gpus"], "knee_gpus": max(within)}
