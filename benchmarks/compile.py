"""Step rate with trainer.compile off and on, after warm-up, for tiny BERT pretraining and a
CIFAR ResNet-20, through `distdl train` on 2 CPU workers (fp32, ZeRO-2).

Each setting trains `--steps` steps, logging every `--log-every`; the step rate is the mean
samples/s of the windows after the first (start-up, warm-up; the compilation is kept out of the
rate by distdl itself and reported as compile_s). Figures are ratios of "on" to "off" from the same
invocation, whatever they come to; the BERT runs share one trained tokenizer.

    .venv/bin/python benchmarks/compile.py [--steps 60] [--gpu]
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
CORPUS = Path("/usr/share/common-licenses")

MODELS = {
    "bert_tiny": ("configs/bert/pretrain_tiny.yaml", [f"data.path={CORPUS}", "data.max_seq_length=128",
                                                      "data.eval_fraction=0.01", "trainer.micro_batch_size=16"]),
    "resnet20": ("configs/resnet/mnist_laptop.yaml", [
        "model.name=cifar_resnet20", "data.dataset=synthetic", "data.image_size=32", "data.synthetic_classes=10",
        "data.synthetic_train_size=8192", "data.synthetic_eval_size=64", "trainer.micro_batch_size=64"]),
}


def run(storage: Path, model: str, compiled: bool, args: argparse.Namespace, extra: list[str]) -> dict:
    config, overrides = MODELS[model]
    name = f"{model}-{'compiled' if compiled else 'eager'}"
    micro = next(int(o.split("=")[1]) for o in overrides if o.startswith("trainer.micro_batch_size"))
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / config), f"run.storage_path={storage}",
               f"run.name={name}", *overrides, *extra, f"trainer.compile={str(compiled).lower()}",
               "trainer.epochs=null", f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={2 * micro}",
               f"trainer.log_every={args.log_every}", "trainer.eval_every=0", "trainer.checkpoint_every=0",
               "engine.zero_stage=2", "tracking.wandb_mode=disabled", "tracking.progress_bar=false"]
    if args.gpu:
        command += ["scaling.use_gpu=true", "engine.precision=bf16"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((storage / name / "summary.json").read_text())
    lines = [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines()]
    steady = [line["samples_per_s"] for line in lines if "samples_per_s" in line][1:]
    return {"samples_per_s": sum(steady) / len(steady), "windows": [round(rate, 1) for rate in steady],
            "compile_s": summary["utilization"]["compile_s"], "mean_mfu": summary["utilization"]["mean_mfu"],
            "final_loss": summary["final"]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/compile_cpu.json")
    args = parser.parse_args()
    results: dict = {"workers": 2, "steps": args.steps, "log_every": args.log_every,
                     "precision": "bf16" if args.gpu else "fp32", "zero_stage": 2, "models": {}}
    with tempfile.TemporaryDirectory(prefix="distdl-compile-") as storage:
        storage = Path(storage)
        for model in MODELS:
            eager = run(storage, model, False, args, [])
            tokenizer = storage / f"{model}-eager" / "tokenizer"  # BERT: the eager run trained it
            extra = [f"tokenizer.name_or_path={tokenizer}"] if tokenizer.is_dir() else []
            compiled = run(storage, model, True, args, extra)
            results["models"][model] = {"eager": eager, "compiled": compiled,
                                        "samples_per_s_ratio_compiled_to_eager":
                                            round(compiled["samples_per_s"] / eager["samples_per_s"], 3)}
    write_results(args.out, results)
    print(json.dumps({model: {k: v for k, v in r.items() if k.endswith("ratio_compiled_to_eager")}
                      | {"compile_s": r["compiled"]["compile_s"]} for model, r in results["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
