"""`trainer.profile_steps`: a torch.profiler trace of chosen optimizer steps on rank 0 and the last rank.

Each traced rank writes `profiles/rank{R}_steps{A}-{B}.pt.trace.json`, A and B the steps it traced
(a session that resumes inside the range, or stops before its end, traces part of it; Chrome trace format:
Perfetto at ui.perfetto.dev opens it, and TensorBoard's profiler plugin reads the folder) and a
`.txt` table of the ops that took the most time. Each step is marked `ProfilerStep#N`, the name
torch.profiler's own schedule uses, so the tools show per-step views. The profiler only observes:
the traced steps compute what untraced ones do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PROFILE_DIR = "profiles"
# profiles/<name>.pt.trace.json and <name>.txt
TRACE_NAME = "rank{rank}_steps{first}-{last}"


def trace_files(run_dir: Path, rank: int) -> list[Path]:
    """The Chrome traces a rank of a run wrote, in the order of the steps they traced."""
    steps = r"(\d+)"
    named = re.compile("^" + TRACE_NAME.format(rank=rank, first=steps, last=steps) + r"\.pt\.trace\.json$")
    found = [(tuple(map(int, match.groups())), path) for path in (run_dir / PROFILE_DIR).glob("*.pt.trace.json")
             if (match := named.match(path.name))]
    return [path for _, path in sorted(found)]


class StepProfiler:
    """Starts at the first traced step this session runs, stops after the last (or when the session
    ends early), and writes the trace."""

    def __init__(self, steps: Optional[list[int]], rank: int, world_size: int, run_dir: Path,
                 device: torch.device, memory: bool = False, stacks: bool = False) -> None:
        traced_rank = rank in (0, world_size - 1)
        self.first, self.last = steps if steps and traced_rank else (None, None)
        self.folder, self.rank = run_dir / PROFILE_DIR, rank
        self.traced: list[int] = []
        self.written: list[Path] = []  # the files this rank wrote (a run on object storage pushes them)
        self.options = dict(record_shapes=memory, profile_memory=memory, with_stack=stacks,
                            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
        self._profile: Optional[profile] = None
        self._step: Any = None

    def traces(self, step: int) -> bool:
        return self.first is not None and self.first <= step <= self.last

    def begin(self, step: int) -> None:
        """Before optimizer step `step` runs."""
        if not self.traces(step):
            return
        if self._profile is None:
            self._profile = profile(**self.options)
            self._profile.start()
        self._step = record_function(f"ProfilerStep#{step}")
        self._step.__enter__()
        self.traced.append(step)

    def end(self, step: int) -> None:
        """After optimizer step `step` ran."""
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace, if one is being taken."""
        if self._profile is None:
            return
        self._profile.stop()
        out = self.folder / TRACE_NAME.format(rank=self.rank, first=self.traced[0], last=self.traced[-1])
        self.folder.mkdir(parents=True, exist_ok=True)
        self._profile.export_chrome_trace(f"{out}.pt.trace.json")
        sort_by = "self_cuda_time_total" if ProfilerActivity.CUDA in self.options["activities"] else "self_cpu_time_total"
        Path(f"{out}.txt").write_text(self._profile.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
        self.written += [Path(f"{out}.pt.trace.json"), Path(f"{out}.txt")]
        self._profile = None
