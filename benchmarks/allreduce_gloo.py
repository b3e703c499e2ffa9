"""gloo all-reduce time against message size on this machine, and the ring model's fit to it.

Two processes (one thread each) all-reduce float32 tensors of 1 to 64 MB, `--repeats` times per
size after a warm-up, each timed between barriers; the median per size is the measurement and the
spread of the repeats its noise. A ring all-reduce over n = 2 ranks costs

    t(M) = 2 (n - 1)/n * M / bandwidth + 2 (n - 1) * latency = M / bandwidth + 2 * latency,

so a least-squares line through (M, median t) gives the bandwidth (1 / slope) and the latency
(intercept / 2), which `distdl plan` uses for a cluster of these processes. Writes JSON and a plot.

    .venv/bin/python benchmarks/allreduce_gloo.py [--repeats 15] [--out benchmarks/results/allreduce_gloo_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import numpy as np
from provenance import write_results

REPO = Path(__file__).resolve().parents[1]
SIZES_MB = [1, 2, 4, 8, 16, 32, 64]
WORLD = 2


def timed_allreduces(rank: int, port: int, repeats: int, out: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    times = {}
    for size_mb in SIZES_MB:
        tensor = torch.ones(size_mb * 2**20 // 4)
        for _ in range(3):  # warm-up: gloo's buffers and pairs for this size
            dist.all_reduce(tensor)
        samples = []
        for _ in range(repeats):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            samples.append(time.perf_counter() - started)
        times[size_mb] = samples
    dist.destroy_process_group()
    out[rank] = times


def measure(repeats: int) -> dict[int, list[float]]:
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(timed_allreduces, args=(port, repeats, out), nprocs=WORLD, join=True)
    # An all-reduce ends for both ranks together; each size's time is the slower rank's.
    return {size: [max(a, b) for a, b in zip(out[0][size], out[1][size])] for size in SIZES_MB}


def fit(times: dict[int, list[float]]) -> dict[str, float]:
    sizes = np.array([size * 2**20 for size in times], dtype=float)
    medians = np.array([statistics.median(samples) for samples in times.values()])
    # Weighted by 1/t: relative errors count alike for 1 MB and 64 MB.
    slope, intercept = np.polyfit(sizes, medians, 1, w=1 / medians)
    return {"bandwidth_gb_s": 1 / slope / 1e9, "latency_us": intercept / 2 * 1e6,
            "slope_s_per_byte": slope, "intercept_s": intercept}


def plot(times: dict[int, list[float]], line: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    sizes = list(times)
    axis.boxplot([np.array(times[s]) * 1e3 for s in sizes], positions=sizes, widths=[s * 0.3 for s in sizes],
                 manage_ticks=False)
    grid = np.geomspace(sizes[0], sizes[-1], 50)
    axis.plot(grid, (line["intercept_s"] + line["slope_s_per_byte"] * grid * 2**20) * 1e3,
              label=f"ring fit: {line['bandwidth_gb_s']:.2f} GB/s, {line['latency_us']:.0f} us")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("message (MiB)")
    axis.set_ylabel("all-reduce time (ms)")
    axis.set_title("gloo all-reduce, 2 processes")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/allreduce_gloo_cpu.json")
    args = parser.parse_args()
    times = measure(args.repeats)
    line = fit(times)
    rows = []
    for size, samples in times.items():
        median = statistics.median(samples)
        low, high = np.percentile(samples, [25, 75])
        predicted = line["intercept_s"] + line["slope_s_per_byte"] * size * 2**20
        rows.append({"size_mib": size, "median_s": median, "iqr_s": [float(low), float(high)],
                     "predicted_s": float(predicted), "relative_error": float(predicted / median - 1),
                     "within_iqr": bool(low <= predicted <= high)})
    result = {"world": WORLD, "threads_per_process": 1, "repeats": args.repeats, "fit": line, "sizes": rows}
    write_results(args.out, result)
    plot(times, line, args.out.with_suffix(".png"))
    print(json.dumps({"fit": line, "errors": {r["size_mib"]: round(r["relative_error"], 3) for r in rows}}, indent=2))


if __name__ == "__main__":
    main()
