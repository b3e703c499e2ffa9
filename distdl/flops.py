"""Model FLOPs utilization (MFU): the model's FLOPs per second against what the hardware can do.

The FLOPs are counted once, on the run's real first step, with `torch.utils.flop_counter` (matmuls,
convolutions and attention of the forward and backward passes, at the actual model and shapes),
and scaled by the tokens each later window processes. Activation checkpointing's recomputation is
counted apart and left out, as MFU is defined (Chowdhery et al. 2022, "PaLM", appendix B): the
recomputed forward is hardware work, not model work.

The peak is `trainer.peak_tflops` when set, else a datasheet figure for the GPU model at the run's
precision, and on CPU workers a matmul measured on the worker's own threads, reported as such.
A GPU the table does not know, without `trainer.peak_tflops`, gives an MFU of None (unknown).
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from distdl.collectives import all_reduce_sum, world_size
from distdl.models.activation_checkpointing import recomputation_counted

# Dense (no structured sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets: bf16/fp16 and TF32
# on tensor cores, fp32 without them. First matching pattern of torch.cuda.get_device_name() wins.
DATASHEET_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    (r"H200 NVL|H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100|H200|GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"V100.*PCIE", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),
]



def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                                  *args: Any, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# The CPU kernel of scaled_dot_product_attention, which the counter's own table lacks (its
# arguments lead with the same shapes as the GPU kernels').
CPU_ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


@dataclass
class Peak:
    """One device's peak TFLOP/s for the run's precision (None: unknown), and where it came from."""

    tflops: Optional[float]
    source: str


def datasheet_tflops(device_name: str, kind: str) -> Optional[float]:
    """The table's figure for a GPU model (as CUDA names it) and "bf16", "fp16", "tf32" or "fp32"."""
    for pattern, figures in DATASHEET_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return figures.get(kind)
    return None


def same_datasheet_gpu(name: str, other: str) -> bool:
    """Whether two GPU names (as CUDA or a cluster file gives them) are one model of the table."""
    rows = [[i for i, (pattern, _) in enumerate(DATASHEET_TFLOPS) if re.search(pattern, n, re.IGNORECASE)][:1]
            for n in (name, other)]
    return bool(rows[0]) and rows[0] == rows[1]


def gpu_precision_kind(precision: str, tf32: bool, device: torch.device) -> str:
    """What a run's matmuls execute as: fp32 runs use TF32 tensor cores where on and available."""
    if precision != "fp32":
        return precision
    return "tf32" if tf32 and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"


def measured_matmul_tflops(dtype: torch.dtype, size: int = 1024, budget_s: float = 0.2) -> float:
    """The best rate of a square matmul on this process's threads (a CPU's achievable peak)."""
    # Its own generator: drawing from torch's would shift the run's random stream (dropout, masks)
    # by a session's start, and a resumed run would no longer equal an uninterrupted one.
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up: thread pool and kernel choice
    best, started, repeats = 0.0, time.perf_counter(), 0
    while repeats < 3 or time.perf_counter() - started < budget_s:
        begin = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - begin) / 1e12)
        repeats += 1
    return best


def device_peak(device: torch.device, precision: str, tf32: bool, configured: Optional[float]) -> Peak:
    """This worker's peak: `trainer.peak_tflops`, the datasheet table, or on CPUs a measured matmul."""
    if configured is not None:
        return Peak(configured, "trainer.peak_tflops")
    if device.type == "cpu":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        tflops = measured_matmul_tflops(dtype)
        return Peak(tflops, f"measured {precision} matmul on {torch.get_num_threads()} CPU thread(s)")
    name = torch.cuda.get_device_name(device)
    kind = gpu_precision_kind(precision, tf32, device)
    tflops = datasheet_tflops(name, kind)
    if tflops is None:
        return Peak(None, f"unknown: no {kind} datasheet figure for {name!r}; set trainer.peak_tflops "
                          "(dense TFLOP/s per GPU) for its MFU")
    return Peak(tflops, f"datasheet {kind} for {name}")


@dataclass
class FlopCount:
    """Model FLOPs of a block, and the recomputation (activation checkpointing) left out of them."""

    model: int = 0
    recomputed: int = 0


class _TotalOnly:
    """Stands in for FlopCounterMode's module tracker: every count goes to the total ("Global")."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, totals only: its per-module attribution hooks every module's backward,
    which breaks torch.autograd.grad on leaf inputs (WGAN-GP's gradient penalty)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)
    counter.mod_tracker = _TotalOnly()
    return counter


@contextmanager
def counted_flops() -> Iterator[FlopCount]:
    """Count the FLOPs of the forward and backward passes run in the block (every op the counter
    knows: matmuls, convolutions, attention); `model` excludes activation recomputation."""
    count = FlopCount()
    with flop_counter() as mode, recomputation_counted(flop_counter) as recomputed:
            yield count
    count.recomputed = recomputed.flops
    count.model = mode.get_total_flops() - count.recomputed


@dataclass
class ModelFlops:
    """A run's model FLOPs, counted on its first step: kept in its checkpoints, so a resumed
    session has them without counting again."""

    per_token: float  # model FLOPs per token (or pixel, or sample element), all ranks together
    per_step: float  # of the counted step, all ranks together

    @classmethod
    def of(cls, count: FlopCount, tokens: int, device: torch.device) -> ModelFlops:
        """From each rank's count of one step and the tokens it processed in it (a collective)."""
        flops, all_tokens = all_reduce_sum(torch.tensor([float(count.model), float(tokens)], dtype=torch.float64,
                                                        device=device)).tolist()
        return cls(flops / max(all_tokens, 1.0), flops)


@dataclass
class WorldPeak:
    """Rank 0's device peak, and the sum over all ranks' (None when any rank's is unknown)."""

    device: Peak
    tflops: Optional[float]

    @classmethod
    def of(cls, peak: Peak, device: torch.device) -> WorldPeak:
        """A collective: every rank passes its own device's peak."""
        value = peak.tflops if peak.tflops is not None else math.nan
        (total,) = all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=device)).tolist()
        return cls(peak, total if math.isfinite(total) else None)


@dataclass
class Utilization:
    """Turns a log window's throughput into achieved TFLOP/s per device and MFU, and keeps the
    session's totals for its mean."""

    model_flops: ModelFlops
    peak: WorldPeak
    flops: float = 0.0
    seconds: float = 0.0

    def window(self, tokens_per_s: Optional[float], seconds: float) -> dict[str, Optional[float]]:
        """`tflops_per_device` and `mfu` (None when the peak is unknown) of one log window (None
        for both when the window has no rate: its only step was left out of it)."""
        if tokens_per_s is None:
            return {"tflops_per_device": None, "mfu": None}
        achieved = self.model_flops.per_token * tokens_per_s
        self.flops += achieved * seconds
        self.seconds += seconds
        return {"tflops_per_device": achieved / world_size() / 1e12, "mfu": self._mfu(achieved)}

    def _mfu(self, flops_per_s: float) -> Optional[float]:
        return flops_per_s / (self.peak.tflops * 1e12) if self.peak.tflops else None

    def summary(self) -> dict[str, Any]:
        mean = self.flops / self.seconds if self.seconds > 0 else None  # None: no window had a rate
        return {
            "flops_per_step": self.model_flops.per_step,
            "mean_tflops_per_device": mean / world_size() / 1e12 if mean is not None else None,
            "mean_mfu": self._mfu(mean) if mean is not None else None,
            "peak_tflops_per_device": self.peak.device.tflops,
            "peak_source": self.peak.device.source,
        }
