"""What asking "has any rank seen a stop request?" at every optimizer step costs (distdl.loop.StopRules:
one deferred all-reduce of a flag per step, so that SIGTERM or SIGUSR1 stops a run at the next step).

Two processes over gloo, as distdl's CPU workers, train a small MLP data-parallel (its gradients
all-reduced each step, as DeepSpeed's are) with and without the question, in alternating rounds of
the same run; a short step is the hard case, where a fixed cost weighs most.

    .venv/bin/python benchmarks/stop_question.py [--steps 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from provenance import write_results

REPO = Path(__file__).resolve().parents[1]
BATCH, WIDTH = 64, 256


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def round_ms(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, ask: bool) -> float:
    """Mean wall time of a step over `steps`, the question asked after each (as the loop does) or not."""
    from distdl.collectives import DeferredAnyRank

    data, target = torch.randn(BATCH, 784), torch.randint(0, 10, (BATCH,))
    asked = None
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(data), target)
        optimizer.zero_grad()
        loss.backward()
        for parameter in model.parameters():
            dist.all_reduce(parameter.grad)
        optimizer.step()
        if ask:
            if asked is not None:
                asked.result()
            asked = DeferredAnyRank(False, torch.device("cpu"))
    dist.barrier()
    return (time.perf_counter() - start) / steps * 1000


def worker(rank: int, port: int, steps: int, rounds: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # a core each, as distdl's CPU workers
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH),
                                torch.nn.ReLU(), torch.nn.Linear(WIDTH, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    round_ms(model, optimizer, steps // 5, ask=True)  # warm-up
    timings = {"without": [], "with": []}
    for _ in range(rounds):
        for ask in (False, True):
            timings["with" if ask else "without"].append(round_ms(model, optimizer, steps, ask))
    if rank == 0:
        out.update(timings)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/stop_question_cpu.json")
    args = parser.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(free_port(), args.steps, args.rounds, out), nprocs=2)
        timings = dict(out)
    without, with_question = statistics.median(timings["without"]), statistics.median(timings["with"])
    results = {
        "settings": {"workers": 2, "backend": "gloo", "model": f"MLP 784-{WIDTH}-{WIDTH}-10", "batch_per_worker": BATCH,
                     "steps_per_round": args.steps, "rounds": args.rounds},
        "step_ms": {"without_question": without, "with_question": with_question},
        "rounds_ms": timings,
        "question_us_per_step": (with_question - without) * 1000,
        "ratio_with_to_without": with_question / without,
    }
    write_results(args.out, results)
    print(f"step {without:.3f} ms without the question, {with_question:.3f} ms with it: "
          f"{results['question_us_per_step']:.0f} µs per step, ratio {results['ratio_with_to_without']:.3f}")


if __name__ == "__main__":
    main()
