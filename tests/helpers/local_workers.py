"""distdl's worker loop on 2 real gloo ranks in 2 long-lived processes, through Ray Train's local mode.

Each run goes through `driver.prepare_run` (the run directory, the data, the payload), then every
process runs `loop.train_loop_per_worker` with the context Ray Train's local mode gives a torchrun
process (TorchTrainer with num_workers=0): the same loop, DeepSpeed engines, workloads, checkpoint
saves and Ray Train calls as a Ray Train run, over a real gloo process group. What it
leaves out is Ray itself (actors, placement, storage upload), which the Ray Train tests cover; what it
saves is ~30 s of Ray start-up and imports per run on 2 cores, so dozens of configs fit in CI.

Ray Train's local mode keeps no checkpoint. Asked to (`train(..., keep_checkpoints=True)`), the
harness does what Ray Train's storage does with one: each rank's reported folder is copied into the
run directory under the checkpoint's name. It does not write Ray Train's record of the checkpoints,
so a run here cannot resume; a checkpoint folder can be named directly (`model.init_from`,
`distdl export --checkpoint`).
"""

from __future__ import annotations

import shutil
import socket
import traceback
from pathlib import Path
from typing import Any, Optional

import torch.multiprocessing as mp
from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils


class StoringTrainFnUtils(LocalTrainFnUtils):
    """Ray Train's local mode, plus each reported checkpoint folder copied into `storage` under its name."""

    def __init__(self, storage: Optional[Path], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage = storage

    def report(self, metrics: dict[str, Any], checkpoint: Any = None, checkpoint_dir_name: Any = None,
               **kwargs: Any) -> None:
        super().report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name, **kwargs)
        if self.storage is not None and checkpoint is not None and checkpoint_dir_name:
            shutil.copytree(checkpoint.path, self.storage / checkpoint_dir_name, dirs_exist_ok=True)


def _serve(rank: int, world: int, port: int, jobs: Any, results: Any) -> None:
    import multiprocessing
    import os

    import torch.distributed as dist
    from ray.train.v2._internal.execution.train_fn_utils import set_train_fn_utils

    from distdl.config import config_from_dict
    from distdl.loop import train_loop_per_worker

    # As in a Ray worker or a torchrun process: transformers' seeded collators refuse to run in what looks
    # like a multiprocessing child ("SpawnProcess-1").
    multiprocessing.current_process().name = "MainProcess"
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # torchrun's, which DeepSpeed reads
    # One process group for the processes' lifetime: DeepSpeed caches its groups, so a group destroyed
    # and made again between runs would leave it holding dead ones.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    while (payload := jobs.get()) is not None:
        try:
            # What Ray Train's local mode (TorchTrainer with num_workers=0) sets for a torchrun process.
            storage = config_from_dict(payload["config"]).run_dir if payload.pop("keep_checkpoints") else None
            set_train_fn_utils(StoringTrainFnUtils(storage,
                                                   experiment_name="local", world_size=world, world_rank=rank,
                                                   local_rank=rank, local_world_size=world, node_rank=0))
            train_loop_per_worker(payload)
            results.put((rank, None))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((rank, traceback.format_exc()))


class LocalWorkers:
    def __init__(self, world: int = 2) -> None:
        context = mp.get_context("spawn")
        self.world = world
        self.jobs = [context.Queue() for _ in range(world)]
        self.results = context.Queue()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.processes = [context.Process(target=_serve, args=(rank, world, port, self.jobs[rank], self.results),
                                          daemon=False)  # a config's DataLoader workers are its children
                          for rank in range(world)]
        for process in self.processes:
            process.start()

    def train(self, config: Any, timeout_s: float = 600, keep_checkpoints: bool = False) -> dict[str, Any]:
        """Prepare and run `config` on the workers; its summary (the run's summary.json)."""
        from distdl.driver import prepare_run
        from distdl.rundir import read_summary

        payload = {**prepare_run(config, no_ray, overwrite=False), "keep_checkpoints": keep_checkpoints}
        for queue in self.jobs:
            queue.put(payload)
        errors = [self.results.get(timeout=timeout_s) for _ in range(self.world)]
        failed = {rank: error for rank, error in errors if error}
        if failed:
            raise AssertionError("\n".join(f"rank {rank}:\n{error}" for rank, error in sorted(failed.items())))
        return read_summary(config.run_dir)

    def close(self) -> None:
        for queue in self.jobs:
            queue.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def no_ray(config) -> None:
    raise AssertionError("the local harness runs its workers without Ray; ray.address must stay unset")
