"""The measurement loop: a study's `measure` run for each task on every Ray Train worker (the same
workers, and process group, as its training), each task's result written by rank 0 as soon as it is
done, so a stopped study measures only what is left when it runs again. `studies.runner` starts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distdl.config import config_from_dict
from distdl.loop import worker_context
from distdl.precision import set_tf32
from distdl.rundir import write_json


def measure_loop_per_worker(payload: dict[str, Any]) -> None:
    worker = worker_context(config_from_dict(payload["config"]))
    set_tf32(False)  # Hessians and sharpness in full fp32 on GPUs too (cuDNN's default is TF32)
    for task in payload["tasks"]:
        result = payload["measure"](task, payload["section"], worker)
        if worker.rank == 0:
            write_json(Path(task["out"]), result)
        print(f"distdl: measured {task['name']}")
