"""What resuming on another worker count costs: DeepSpeed's universal-checkpoint conversion of a ZeRO-2
checkpoint, against reading that checkpoint's files once, in the same invocation.

A large ResNet trains 2 steps with AdamW at ZeRO-2 on 2 workers through `distdl train` and
checkpoints. The checkpoint is then converted for 1 worker (`distdl.engine.checkpoints.reshard_checkpoint`, what
the driver does before such a resume). Reported: the checkpoint's size, the conversion's seconds, the
seconds `torch.load` takes to read every file of the checkpoint, and their ratio; and the converted
folder's size next to the checkpoint's.

    .venv/bin/python benchmarks/elastic_resume.py [--model wide_resnet50_2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]


def train_and_checkpoint(model: str, storage: Path) -> Path:
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / "configs/resnet/mnist_laptop.yaml"),
               f"run.storage_path={storage}", "run.name=elastic", f"model.name={model}", "data.dataset=synthetic",
               "data.image_size=32", "data.synthetic_train_size=64", "data.synthetic_eval_size=8",
               "engine.zero_stage=2", "optimizer.name=adamw", "optimizer.lr=1e-3", "trainer.max_steps=2",
               "trainer.epochs=null", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
               "trainer.eval_every=0", "trainer.checkpoint_every=2", "tracking.wandb_mode=disabled",
               "tracking.progress_bar=false"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return storage / "elastic" / "checkpoint_00000002"


def folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wide_resnet50_2")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/elastic_resume_cpu.json")
    args = parser.parse_args()
    import torch

    from distdl.engine.checkpoints import reshard_checkpoint

    with tempfile.TemporaryDirectory(prefix="distdl-elastic-") as storage:
        checkpoint = train_and_checkpoint(args.model, Path(storage))
        tag = checkpoint / (checkpoint / "latest").read_text().strip()
        started = time.perf_counter()
        for file in sorted(tag.glob("*.pt")):
            torch.load(file, map_location="cpu", weights_only=False)
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        assert reshard_checkpoint(checkpoint, 1)
        convert_s = time.perf_counter() - started
        universal = checkpoint / f"{tag.name}_universal"
        results = {
            "model": args.model, "optimizer": "adamw", "zero_stage": 2, "saved_by_workers": 2, "resumed_on": 1,
            "checkpoint_mib": round(folder_bytes(tag) / 2**20, 1),
            "universal_mib": round(folder_bytes(universal) / 2**20, 1),
            "read_checkpoint_s": round(read_s, 2), "convert_s": round(convert_s, 2),
            "convert_to_read_ratio": round(convert_s / read_s, 2),
        }
    write_results(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
