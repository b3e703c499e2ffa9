"""Measurement jobs: a study's `measure` run on the same Ray Train workers (and process group) as
its training, so every measurement is data-parallel the way training is. One job measures every
task still missing; each task's result is written by rank 0 as soon as it is done, so a stopped
study measures only what is left when it runs again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from distdl.config import Config, config_from_dict
from distdl.registry import WORKLOADS
from distdl.workloads.base import WorkerContext, Workload


def run_measurements(config: Config, tasks: list[dict[str, Any]], measure: Callable[..., dict[str, Any]],
                     section: Any, storage: Path) -> None:
    """Run `measure(task, section, context)` for each task on the workers `config` asks for."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from distdl.driver import connect_ray, quiet_train_logs, scaling_config

    missing = [task for task in tasks if not Path(task["out"]).is_file()]
    if not missing:
        return
    connect_ray(config)
    print(f"distdl: measuring {len(missing)} of {len(tasks)} on {config.scaling.num_workers} workers")
    trainer = TorchTrainer(
        measure_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "tasks": missing, "measure": measure, "section": section},
        scaling_config=scaling_config(config),
        run_config=RunConfig(name="measurements", storage_path=str(storage), logging_config=quiet_train_logs()),
    )
    trainer.fit()
    still = [task["name"] for task in missing if not Path(task["out"]).is_file()]
    if still:
        raise RuntimeError(f"the measurement job ended without results for {', '.join(still)}")


def measure_loop_per_worker(payload: dict[str, Any]) -> None:
    from distdl.loop import worker_context

    worker = worker_context(config_from_dict(payload["config"]))
    for task in payload["tasks"]:
        result = payload["measure"](task, payload["section"], worker)
        if worker.rank == 0:
            write_json(Path(task["out"]), result)
        print(f"distdl: measured {task['name']}")


def write_json(path: Path, value: Any) -> None:
    """Whole or not at all: a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(value, handle, indent=2)
    os.replace(handle.name, path)


def trained_workload(trial_config: dict[str, Any], context: WorkerContext) -> tuple[Workload, torch.nn.Module]:
    """A trial's workload with augmentation off (the loss is a fixed function of the weights), and
    its model with the trial's final weights, in eval mode (batch norm uses its running statistics)."""
    from distdl.engine import consolidated_state_dict
    from distdl.rundir import latest_checkpoint

    config = config_from_dict(trial_config)
    sections = dict(config.sections)
    if dataclasses.is_dataclass(sections.get("data")) and hasattr(sections["data"], "augment"):
        sections["data"] = dataclasses.replace(sections["data"], augment=False)
    workload = WORKLOADS.get(config.workload)(sections, context)
    model = workload.build_model()
    model.load_state_dict(consolidated_state_dict(latest_checkpoint(config.run_dir)))
    return workload, model.to(context.device).eval()
