"""What a profile's torch.profiler trace (`trainer.profile_steps`) says of its steps: the optimizer's
time, the collectives' time, and the share of the collectives' time that ran beside computation
(the overlap `distdl plan` otherwise takes from --overlap).

Within the `ProfilerStep#N` ranges of the trace:
- **optimizer:** the `Optimizer.step#...` ranges torch records for every torch optimizer;
- **collectives:** on a GPU, the NCCL kernels; on CPU workers, gloo's `gloo:*` ops, which run on
  gloo's own threads;
- **computation:** on a GPU, every other kernel; on CPU workers, the `aten::` ops of the thread that
  runs the steps.

The overlap is the time both ran at once over the collectives' time (Holistic Trace Analysis calls
it the communication-computation overlap).
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


@dataclass(frozen=True)
class StepTrace:
    """Means per traced step, in seconds."""

    path: Path
    steps: int
    step_s: float
    optimizer_s: float
    collectives_s: float
    # The share of the collectives' time that computation ran beside; None where nothing communicated.
    overlap: Optional[float]


def covered(events: Iterable[dict[str, Any]]) -> portion.Interval:
    """The time (µs) the events cover together."""
    return portion.Interval(*[portion.closed(e["ts"], e["ts"] + e["dur"]) for e in events])


def length(interval: portion.Interval) -> float:
    return sum(atom.upper - atom.lower for atom in interval if not atom.empty)


def read_step_trace(path: str | Path) -> StepTrace:
    """The step profile of one rank's Chrome trace, as `distdl.profiling.StepProfiler` writes it."""
    path = Path(path)
    try:
        events = [e for e in json.loads(path.read_text()).get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"--profile {path}: not a readable torch.profiler trace ({err})") from None
    steps = [e for e in events if STEP.match(e["name"])]
    if not steps:
        raise ConfigError(f"--profile {path}: no ProfilerStep#N range; it is not a trace of trainer.profile_steps")
    window = covered(steps)
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if kernels:
        collectives = covered(e for e in kernels if GPU_COLLECTIVE.search(e["name"]))
        computation = covered(e for e in kernels if not GPU_COLLECTIVE.search(e["name"]))
    else:
        main = steps[0].get("tid")
        collectives = covered(e for e in events if CPU_COLLECTIVE.match(e["name"]))
        computation = covered(e for e in events if e.get("tid") == main and e["name"].startswith("aten::"))
    collectives &= window
    optimizer = covered(e for e in events if OPTIMIZER.match(e["name"])) & window
    communicated = length(collectives)
    overlap = length(collectives & computation) / communicated if communicated else None
    count = len(steps)
    return StepTrace(path=path, steps=count, step_s=length(window) / count / 1e6,
                     optimizer_s=length(optimizer) / count / 1e6, collectives_s=communicated / count / 1e6,
                     overlap=overlap)
