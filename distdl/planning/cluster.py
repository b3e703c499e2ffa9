"""A cluster file: what `distdl plan` needs to know of the machines a job would run on.

    name: dgx-h100-ndr
    gpu: H100 SXM                  # a GPU model distdl.flops knows (its datasheet peak), or give peak_tflops
    gpus_per_node: 8
    max_nodes: 512
    intra_node: {bandwidth_gb_s: 450, latency_us: 3}    # per GPU, one direction (NVLink 4: 900 GB/s both)
    inter_node: {bandwidth_gb_s: 50, latency_us: 10}    # per GPU: its share of the node's NICs

Bandwidths are what a GPU can send in one direction while every GPU sends (bus bandwidth, as
nccl-tests reports it for an all-reduce), in GB/s (1e9 bytes); latencies are per message hop.
Every error names the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import yaml
from annotated_types import Ge, Gt

from distdl.config import AtLeastOne, Finite, build_section
from distdl.errors import ConfigError
from distdl.flops import datasheet_tflops

Positive = Annotated[float, Gt(0), Finite]


@dataclass(frozen=True)
class Link:
    bandwidth_gb_s: Positive
    latency_us: Annotated[float, Ge(0), Finite]

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gb_s * 1e9

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6


@dataclass(frozen=True)
class ClusterSpec:
    gpu: str
    gpus_per_node: AtLeastOne
    intra_node: Link
    inter_node: Link
    name: str = "cluster"
    max_nodes: AtLeastOne = 512
    # Dense peak TFLOP/s of one GPU at the run's precision, for a GPU distdl.flops's table lacks.
    peak_tflops: Optional[Positive] = None

    @property
    def max_gpus(self) -> int:
        return self.gpus_per_node * self.max_nodes

    def peak_kind(self, precision: str, tf32: bool = True) -> str:
        """Which peak a run's precision reads: "peak_tflops" (the file's own), or a datasheet column:
        fp32 on TF32 tensor cores where `tf32` (engine.tf32) allows and the GPU has them."""
        if self.peak_tflops is not None:
            return "peak_tflops"
        kind = "tf32" if precision == "fp32" and tf32 else precision
        return kind if datasheet_tflops(self.gpu, kind) is not None else precision  # a V100 has no TF32

    def peak(self, precision: str, tf32: bool = True) -> float:
        """One GPU's dense peak TFLOP/s for a run's precision (see `peak_kind`)."""
        kind = self.peak_kind(precision, tf32)
        tflops = self.peak_tflops if kind == "peak_tflops" else datasheet_tflops(self.gpu, kind)
        if tflops is None:  # a V100 has no bf16, for one
            raise ConfigError(f"gpu={self.gpu!r}: no {kind} datasheet figure for it in distdl.flops; set peak_tflops "
                              "(dense TFLOP/s per GPU)")
        return tflops


PRECISION_KINDS = ("bf16", "fp16", "tf32", "fp32")
REQUIRED = {"gpu": None, "gpus_per_node": None, "intra_node": ("bandwidth_gb_s", "latency_us"),
            "inter_node": ("bandwidth_gb_s", "latency_us")}


def read_cluster(path: str | Path) -> ClusterSpec:
    """The cluster file, checked; an error names the file and the key."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"--cluster {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--cluster {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--cluster {path} must be a mapping of keys (gpu, gpus_per_node, intra_node, inter_node)")
    missing = [key for key, inner in REQUIRED.items() if key not in values] + [
        f"{key}.{field}" for key, inner in REQUIRED.items() if inner and isinstance(values.get(key), dict)
        for field in inner if field not in values[key]]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (bandwidths in GB/s per GPU, one direction; "
                          "latencies in microseconds)")
    try:
        cluster = build_section(ClusterSpec, values, "cluster")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if cluster.peak_tflops is None and not any(datasheet_tflops(cluster.gpu, kind) for kind in PRECISION_KINDS):
        raise ConfigError(f"{path}: gpu={cluster.gpu!r} is not in distdl.flops's datasheet table; set peak_tflops "
                          "(dense TFLOP/s per GPU at the run's precision)")
    return cluster

