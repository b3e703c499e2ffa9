"""Peak memory per rank and step rate with activation checkpointing off and on, through `distdl
train` on 2 CPU workers at equal batch: BERT pretraining at sequence length 512 (`--workload bert`),
or DCGAN on synthetic 128-pixel images with configs/gan/dcgan_cifar10.yaml's nets (`--workload gan`).

Each setting trains a few steps and reads the run's summary: `memory_per_rank` (the process's peak
resident set on CPUs, peak GPU allocation on GPUs) and the last window's samples/s. Figures are
ratios of "on" to "off" from the same invocation; BERT's two runs share one trained tokenizer.

    .venv/bin/python benchmarks/activation_checkpointing.py [--workload bert] [--preset small] [--seq 512] [--gpu]
    .venv/bin/python benchmarks/activation_checkpointing.py --workload gan [--image-size 128] [--micro-batch 64]
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


def workload_overrides(args: argparse.Namespace, tokenizer: Path | None) -> tuple[Path, list[str]]:
    """The workload's config and what this benchmark sets in it."""
    if args.workload == "gan":
        return REPO / "configs/gan/dcgan_cifar10.yaml", [
            "data.dataset=synthetic", f"data.image_size={args.image_size}", "data.synthetic_train_size=1024",
            "data.synthetic_eval_size=64", "data.download=false"]
    overrides = [f"data.path={args.corpus}", f"model.preset={args.preset}", f"data.max_seq_length={args.seq}",
                 "data.eval_fraction=0.01"]
    if tokenizer is not None:
        overrides.append(f"tokenizer.name_or_path={tokenizer}")
    return REPO / "configs/bert/pretrain_tiny.yaml", overrides


def run(storage: Path, name: str, checkpointing: bool, args: argparse.Namespace, tokenizer: Path | None) -> dict:
    config, overrides = workload_overrides(args, tokenizer)
    command = [sys.executable, "-m", "distdl.cli", "train", str(config), *overrides,
               f"run.storage_path={storage}", f"run.name={name}",
               f"model.activation_checkpointing={str(checkpointing).lower()}", f"trainer.max_steps={args.steps}",
               "trainer.epochs=null", f"trainer.micro_batch_size={args.micro_batch}",
               f"trainer.global_batch_size={2 * args.micro_batch}", f"trainer.log_every={args.steps}",
               "trainer.eval_every=0", "trainer.checkpoint_every=0", "tracking.wandb_mode=disabled",
               "tracking.progress_bar=false", "engine.zero_stage=0"]
    if args.gpu:
        command += ["scaling.use_gpu=true", "engine.precision=bf16"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((storage / name / "summary.json").read_text())
    return {"memory_per_rank": summary["memory_per_rank"], "samples_per_s": summary["final"].get("samples_per_s")}


def process_peak(rank: dict, key: str) -> float:
    """The rank's process-wide peak; a GAN reports it under each of its engines alike."""
    return rank[key] if key in rank else next(iter(rank.values()))[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("bert", "gan"), default="bert")
    parser.add_argument("--preset", default="small", help="bert: the model preset")
    parser.add_argument("--seq", type=int, default=512, help="bert: the sequence length")
    parser.add_argument("--image-size", type=int, default=128, help="gan: the image side")
    parser.add_argument("--micro-batch", type=int, default=None, help="per worker (bert: 8, gan: 64)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/activation_checkpointing[_gan]_cpu.json")
    args = parser.parse_args()
    args.micro_batch = args.micro_batch or (64 if args.workload == "gan" else 8)
    suffix = "_gan" if args.workload == "gan" else ""
    args.out = args.out or REPO / f"benchmarks/results/activation_checkpointing{suffix}_cpu.json"
    sizes = {"image_size": args.image_size} if args.workload == "gan" else {"preset": args.preset, "seq": args.seq}
    results = {"workload": args.workload, **sizes, "micro_batch": args.micro_batch, "workers": 2,
               "steps": args.steps, "precision": "bf16" if args.gpu else "fp32", "runs": {}}
    peak = "peak_gpu_allocated_mib" if args.gpu else "peak_rss_mib"
    with tempfile.TemporaryDirectory(prefix="distdl-checkpointing-") as storage:
        storage = Path(storage)
        # Not "off"/"on" as run names: YAML reads those as booleans.
        results["runs"]["off"] = run(storage, "plain", False, args, None)
        tokenizer = storage / "plain" / "tokenizer"  # the first run trained it; the second reuses it
        results["runs"]["on"] = run(storage, "checkpointed", True, args, tokenizer if tokenizer.is_dir() else None)
    off, on = results["runs"]["off"], results["runs"]["on"]
    results["peak_memory_ratio_on_to_off"] = [round(process_peak(b, peak) / process_peak(a, peak), 3)
                                              for a, b in zip(off["memory_per_rank"], on["memory_per_rank"])]
    if off["samples_per_s"] and on["samples_per_s"]:
        results["samples_per_s_ratio_on_to_off"] = round(on["samples_per_s"] / off["samples_per_s"], 3)
    write_results(args.out, results)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
