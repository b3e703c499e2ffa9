"""What a profile's torch.profiler trace (`trainer.profile_steps`) says of its steps: the optimizer's
time, the collectives' time, and the share of the collectives' time that ran beside computation
(the overlap `distdl plan` otherwise takes from --overlap).

Within the `ProfilerStep#N` ranges of the trace:
- **optimizer:** the `Optimizer.step#...` ranges torch records for every torch optimizer;
- **collectives:** on a GPU, the NCCL kernels; on CPU workers, gloo's `gloo:*` ops, which run on
  gloo's own threads;
- **computation:** on a GPU, every other kernel; on CPU workers, the `aten::` ops of the thread that
  runs the steps.

On a GPU, Kineto writes each named range twice: as the CPU ran it (`user_annotation`) and as the
GPU ran its kernels (`gpu_user_annotation`), later. The steps are counted once, on the CPU side;
the window and the optimizer are the GPU side's, the time the kernels are compared within.

The overlap is the time both ran at once over the collectives' time (Holistic Trace Analysis calls
it the communication-computation overlap). The exposed collectives are those beside neither
computation nor the optimizer step: a collective inside the optimizer (LAMB's norms under ZeRO)
is the optimizer's time, not counted twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import portion

from distdl.errors import ConfigError

STEP = re.compile(r"^ProfilerStep#\d+$")
OPTIMIZER = re.compile(r"^Optimizer\.step#")
GPU_COLLECTIVE = re.compile(r"nccl", re.IGNORECASE)
CPU_COLLECTIVE = re.compile(r"^gloo:")
GPU_RANGE = "gpu_user_annotation"


@dataclass(frozen=True)
class StepTrace:
    """Means per traced step, in seconds."""

    path: Path
    steps: int
    world_size: Optional[int]  # as the trace records it (distributedInfo)
    step_s: float
    optimizer_s: float
    collectives_s: float
    exposed_collectives_s: float  # beside neither computation nor the optimizer step
    # The share of the collectives' time that computation ran beside; None where nothing communicated.
    overlap: Optional[float]


def covered(events: Iterable[dict[str, Any]]) -> portion.Interval:
    """The time (µs) the events cover together."""
    return portion.Interval(*[portion.closed(e["ts"], e["ts"] + e["dur"]) for e in events])


def length(interval: portion.Interval) -> float:
    return sum(atom.upper - atom.lower for atom in interval if not atom.empty)


def read_trace_events(path: Path) -> tuple[list[dict[str, Any]], Optional[int]]:
    """The complete events of a Chrome trace, and the world size it records."""
    try:
        trace = json.loads(path.read_text())
        events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"--profile {path}: not a readable torch.profiler trace ({err})") from None
    world = (trace.get("distributedInfo") or {}).get("world_size")
    return events, int(world) if world else None


def read_step_trace(path: str | Path) -> StepTrace:
    """The step profile of one rank's Chrome trace, as `distdl.profiling.StepProfiler` writes it."""
    path = Path(path)
    events, world = read_trace_events(path)

    def ranges(pattern: re.Pattern, gpu_side: bool) -> list[dict[str, Any]]:
        return [e for e in events if pattern.match(e["name"]) and (e.get("cat") == GPU_RANGE) == gpu_side]

    steps = ranges(STEP, gpu_side=False)
    if not steps:
        raise ConfigError(f"--profile {path}: no ProfilerStep#N range; it is not a trace of trainer.profile_steps")
    kernels = [e for e in events if e.get("cat") == "kernel"]
    gpu_side = bool(kernels) and bool(ranges(STEP, gpu_side=True))
    window = covered(ranges(STEP, gpu_side))
    optimizer = covered(ranges(OPTIMIZER, gpu_side)) & window
    if kernels:
        collectives = covered(e for e in kernels if GPU_COLLECTIVE.search(e["name"]))
        computation = covered(e for e in kernels if not GPU_COLLECTIVE.search(e["name"]))
    else:
        main = steps[0].get("tid")
        collectives = covered(e for e in events if CPU_COLLECTIVE.match(e["name"]))
        computation = covered(e for e in events if e.get("tid") == main and e["name"].startswith("aten::"))
    collectives &= window
    communicated = length(collectives)
    count = len(steps)
    return StepTrace(path=path, steps=count, world_size=world, step_s=length(window) / count / 1e6,
                     optimizer_s=length(optimizer) / count / 1e6, collectives_s=communicated / count / 1e6,
                     exposed_collectives_s=length(collectives - computation - optimizer) / count / 1e6,
                     overlap=length(collectives & computation) / communicated if communicated else None)
