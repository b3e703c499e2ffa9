"""Memory per rank under ZeRO stages 0-3 for a large ResNet, through `distdl train` on 2 workers.

Each stage trains a few steps of the model on synthetic images with AdamW and reads the run's
`memory_per_rank` (parameters and optimizer state this rank holds, and its peak memory: GPU
allocated on GPUs, resident set on CPUs). Figures are ratios to stage 0 from the same invocation.

    .venv/bin/python benchmarks/zero_memory.py [--model wide_resnet101_2] [--stages 0 1 2 3] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]


def run_stage(model: str, stage: int, storage: Path, gpu: bool, steps: int) -> list[dict]:
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / "configs/resnet/mnist_laptop.yaml"),
               f"run.storage_path={storage}", f"run.name=zero{stage}", f"model.name={model}",
               "data.dataset=synthetic", "data.image_size=32", "data.synthetic_train_size=64",
               "data.synthetic_eval_size=8", f"engine.zero_stage={stage}", "optimizer.name=adamw",
               "optimizer.lr=1e-3", f"trainer.max_steps={steps}", "trainer.epochs=null", "trainer.micro_batch_size=2",
               "trainer.global_batch_size=4", "trainer.eval_every=0", "trainer.checkpoint_every=0",
               "trainer.keep_checkpoints=1", "tracking.wandb_mode=disabled", "tracking.progress_bar=false"]
    if gpu:
        command += ["scaling.use_gpu=true", "engine.precision=bf16"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((storage / f"zero{stage}" / "summary.json").read_text())["memory_per_rank"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wide_resnet101_2")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/zero_memory_cpu.json")
    args = parser.parse_args()
    results = {"model": args.model, "workers": 2, "optimizer": "adamw", "precision": "bf16" if args.gpu else "fp32",
               "stages": {}}
    with tempfile.TemporaryDirectory(prefix="distdl-zero-memory-") as storage:
        for stage in args.stages:
            per_rank = run_stage(args.model, stage, Path(storage), args.gpu, args.steps)
            results["stages"][str(stage)] = per_rank
            print(f"ZeRO-{stage}: {per_rank[0]}", flush=True)
    baseline = results["stages"].get("0", [None])[0]
    if baseline:
        results["ratio_to_stage0_rank0"] = {
            stage: {key: round(ranks[0][key] / baseline[key], 3) for key in baseline if baseline[key]}
            for stage, ranks in results["stages"].items()
        }
    write_results(args.out, results)
    print(json.dumps(results.get("ratio_to_stage0_rank0", {}), indent=2))


if __name__ == "__main__":
    main()
