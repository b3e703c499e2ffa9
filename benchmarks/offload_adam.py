"""Optimizer-step time with the optimizer state offloaded to CPU memory (ZeRO offload): torch's AdamW,
as distdl handed DeepSpeed before, against DeepSpeed's vectorized DeepSpeedCPUAdam, which distdl now
uses for `engine.offload_optimizer`; torch's fused CPU AdamW is measured beside them.

Each optimizer steps the same fp32 parameters (the shapes of a BERT model from transformers) with the
same gradients, round-robin over several rounds, all in one invocation; the figures are medians and
ratios to torch's AdamW from that invocation (this machine is shared and noisy). One step here is what
an offloaded optimizer does per optimizer step on each rank for its partition.

    .venv/bin/python benchmarks/offload_adam.py [--preset base] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402
from provenance import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"mini": (4, 256, 4), "small": (4, 512, 8), "base": (12, 768, 12)}


def bert_shapes(preset: str) -> list[torch.Size]:
    from transformers import BertConfig, BertForMaskedLM

    layers, hidden, heads = PRESETS[preset]
    config = BertConfig(vocab_size=30522, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        intermediate_size=4 * hidden)
    with torch.device("meta"):
        return [p.shape for p in BertForMaskedLM(config).parameters()]


def parameters(shapes: list[torch.Size], seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        param.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(param)
    return params


def optimizers() -> dict[str, callable]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    settings = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    return {
        "torch_adamw": lambda p: torch.optim.AdamW(p, **settings),
        "torch_adamw_fused": lambda p: torch.optim.AdamW(p, fused=True, **settings),
        "deepspeed_cpu_adam": lambda p: DeepSpeedCPUAdam(p, adamw_mode=True, **settings),
    }


def time_steps(make, shapes, steps: int) -> float:
    """Seconds per step, after one warm-up step (which allocates the moments)."""
    params = parameters(shapes, seed=0)
    optimizer = make(params)
    optimizer.step()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base", choices=PRESETS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/offload_adam_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = bert_shapes(args.preset)
    count = sum(torch.Size(s).numel() for s in shapes)
    makers = optimizers()
    rounds: dict[str, list[float]] = {name: [] for name in makers}
    for round_index in range(args.rounds):
        for name, make in makers.items():
            rounds[name].append(time_steps(make, shapes, args.steps))
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {v[-1] * 1e3:.0f} ms" for n, v in rounds.items()),
              flush=True)
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    result = {
        "preset": args.preset, "parameters": count, "threads": args.threads, "steps_per_round": args.steps,
        "step_s": {name: values for name, values in rounds.items()},
        "median_step_s": medians,
        "speedup_over_torch_adamw": {name: medians["torch_adamw"] / value for name, value in medians.items()},
        "torch": torch.__version__,
    }
    write_results(args.out, result)
    for name, value in medians.items():
        print(f"{name}: {value * 1e3:.0f} ms per step of {count / 1e6:.1f}M parameters, "
              f"{result['speedup_over_torch_adamw'][name]:.2f}x torch AdamW")


if __name__ == "__main__":
    main()
