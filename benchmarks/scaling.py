"""Data-parallel efficiency on the CPU: 2 workers against 1 on a compute-bound model.

BERT-mini (4 layers, hidden 256) masked-LM at sequence length 128, fp32, ZeRO-2, one torch thread
per worker, trained through distdl's real path (distdl.driver.train) on one local Ray instance;
the same tokenizer, blocks, micro batch and steps for every setup (benchmarks/overhead.py's
run_distdl measures them: samples/s over the steady-state windows after the first).

  1w              1 worker: no gradient exchange
  2w_overlap_off  2 workers, DeepSpeed's own ZeRO-2 defaults: overlap_comm off, 5e8-element buckets
                  (one bucket here, reduced after the whole backward pass). distdl's default for CPU
                  workers is the same (overlap off; its 25M-element buckets also hold this whole model)
  2w_overlap_on   2 workers, overlap_comm on with 25M-element buckets: distdl's default for GPU
                  workers, where reduction runs beside the backward pass's compute

efficiency = (samples/s at 2 workers) / (2 x samples/s at 1 worker): per-worker throughput
at 2 workers as a fraction of 1 worker's. Setups run round-robin --repeats times; medians.

Usage: .venv/bin/python benchmarks/scaling.py --out benchmarks/results/scaling_cpu.json [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # noqa: E402
from provenance import write_results  # noqa: E402

# Extra overrides per setup, on top of overhead.run_distdl's.
SETUPS: dict[str, tuple[int, tuple[str, ...]]] = {
    "1w": (1, ()),
    "2w_overlap_off": (2, ("engine.overlap_comm=false", "engine.bucket_elements=500000000")),
    "2w_overlap_on": (2, ("engine.overlap_comm=true", "engine.bucket_elements=25000000")),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per setup (a multiple of --skip)")
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out (also trainer.log_every)")
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per worker per step")
    parser.add_argument("--preset", default="mini", help="BERT model preset")
    parser.add_argument("--repeats", type=int, default=2, help="round-robin repeats; medians are reported")
    parser.add_argument("--only", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--corpus", default="/usr/share/common-licenses")
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2))
    args = parser.parse_args()
    # What overhead.run_distdl reads besides these.
    args.config, args.verbose = overhead.REPO / "configs/bert/pretrain_tiny.yaml", False
    return args


def main() -> None:
    args = parse_args()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory(prefix="distdl-scaling-") as tmp:
        storage = Path(tmp)
        os.environ.setdefault("HF_DATASETS_CACHE", str(storage / "hf-datasets"))
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(key, "1")
        import ray

        from distdl.cluster.connect import forwarded_env

        overhead.prepare_data(overhead.data_spec(args, None, storage))  # untimed: one tokenizer for all
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": forwarded_env()})
        try:
            for repeat in range(1, args.repeats + 1):
                for name in args.only:
                    workers, extra = SETUPS[name]
                    args.extra_overrides = extra
                    print(f"scaling: {name} ({repeat}/{args.repeats}) ...", flush=True)
                    result = overhead.run_distdl(args, workers, storage / f"{name}_r{repeat}", storage / "tokenizer")
                    results[name].append(result)
                    print(f"scaling: {name}: {result['samples_per_s']:.2f} samples/s", flush=True)
        finally:
            ray.shutdown()
    report = summarize(args, results)
    print(json.dumps({k: report[k] for k in ("samples_per_s", "efficiency")}, indent=2))
    if args.out:
        write_results(args.out, report)
        print(f"scaling: wrote {args.out}")


def summarize(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rate = {name: statistics.median(r["samples_per_s"] for r in runs) for name, runs in results.items() if runs}
    efficiency = {name: rate[name] / (SETUPS[name][0] * rate["1w"]) for name in rate
                  if name != "1w" and "1w" in rate}
    return {
        "samples_per_s": rate,
        "efficiency": efficiency,
        "settings": {"preset": args.preset, "seq_len": 128, "micro_batch": args.micro_batch, "steps": args.steps,
                     "skip": args.skip, "repeats": args.repeats, "zero_stage": args.zero_stage, "precision": "fp32",
                     "threads_per_worker": 1, "machine_cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus},
        "definitions": {"efficiency": "samples/s at N workers / (N x samples/s at 1 worker), medians over repeats",
                        "samples_per_s": "global samples / rank-0 seconds over the logged windows after the first"},
        "details": results,
    }


if __name__ == "__main__":
    main()
