"""One prepared check of the GPU path, for a machine with an NVIDIA GPU: under 8 minutes, one JSON.

Every run goes through `distdl train` on one GPU (world size 1, NCCL), and every figure is one
distdl logs itself: samples/s over the windows after the first (start-up, warm-up and, with
compile, the compilation, reported apart as compile_s), and the run's mean MFU and TFLOP/s per
device from distdl.flops (the step's FLOPs counted by torch.utils.flop_counter, against the GPU's
datasheet peak at the run's precision).

1. BERT-base masked-LM pretraining (configs/bert/pretrain_base.yaml): bf16, ZeRO-2, sequence
   length 128, PyTorch's scaled-dot-product attention, a WordPiece vocabulary of 30522 trained on
   the local corpus (nothing is downloaded); plain, with trainer.compile, and with
   model.activation_checkpointing. Beside distdl's MFU, the standard 6·N·tokens count: distdl
   predicts the vocabulary at the masked 15% of positions only, so its counted FLOPs are fewer.
2. ResNet-50 (configs/resnet/imagenet_resnet50.yaml as shipped, bf16) on synthetic 224-pixel
   images: plain, compiled, checkpointed.
3. One short run each of ZeRO-3 (bf16) and fp16 (ZeRO-2, dynamic loss scale) on tiny BERT: paths
   no CPU machine can take (fp16) or takes only over gloo (ZeRO-3).

The issue's target: MFU >= 0.5 for BERT-base at length 128 on an H100/H200.

Usage (from the repository root, after ./launch/install.sh):
    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense peak at each run's precision "
                                                          "(default: distdl's datasheet table)")
    parser.add_argument("--bert-steps", type=int, default=60, help="optimizer steps (a multiple of --log-every)")
    parser.add_argument("--resnet-steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--bert-batch", type=int, default=256, help="sequences per step (one GPU)")
    parser.add_argument("--resnet-batch", type=int, default=128, help="images per step (one GPU)")
    parser.add_argument("--corpus", default="/usr/share/common-licenses")
    parser.add_argument("--only", nargs="*", help="run only these (names as in the JSON)")
    return parser.parse_args()


def gpu_facts() -> dict[str, Any]:
    import deepspeed
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False)")
    return {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())), "bf16_supported": torch.cuda.is_bf16_supported()}


def train_tokenizer(corpus: str, out: Path) -> Path:
    """BERT's vocabulary size, trained locally: the model's shapes are BERT-base's without a download."""
    from distdl.data.text import TextDataSection, TokenizerSection, load_raw_corpus
    from distdl.data.text import train_tokenizer as train

    train(load_raw_corpus(TextDataSection(path=corpus)), TokenizerSection(vocab_size=30522), out)
    return out


def bert_base_parameters(tokenizer: Path) -> int:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer))))
    return sum(p.numel() for p in model.parameters())  # parameters() yields the tied embedding once


def config_runs(args: argparse.Namespace, corpus: str, tokenizer: Path | str) -> dict[str, tuple[str, list[str]]]:
    """(config, overrides) of every run; tests/distributed/test_every_path.py checks that they validate."""
    steps = ["trainer.eval_every=0", "trainer.checkpoint_every=0", f"trainer.log_every={args.log_every}"]
    bert = [
        "engine.zero_stage=2", "engine.precision=bf16", "model.preset=base", "model.attn_implementation=sdpa",
        f"data.path={corpus}", "data.hub_config=null", "data.max_seq_length=128", "data.num_proc=null",
        f"tokenizer.name_or_path={tokenizer}", f"trainer.max_steps={args.bert_steps}",
        f"trainer.micro_batch_size={args.bert_batch}", f"trainer.global_batch_size={args.bert_batch}",
        "scheduler.warmup_steps=10", *steps]
    resnet = [
        "data.dataset=synthetic", "data.image_size=224", "data.synthetic_classes=1000",
        f"data.synthetic_train_size={args.resnet_batch * (args.resnet_steps + 1)}", "data.synthetic_eval_size=64",
        "data.loader_workers=8", "trainer.epochs=null", f"trainer.max_steps={args.resnet_steps}",
        f"trainer.micro_batch_size={args.resnet_batch}", f"trainer.global_batch_size={args.resnet_batch}", *steps]
    tiny = [f"data.path={corpus}", "data.max_seq_length=128", "trainer.max_steps=4", "trainer.micro_batch_size=32",
            "trainer.global_batch_size=32", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.checkpoint_every=0"]
    bert_config, resnet_config = "configs/bert/pretrain_base.yaml", "configs/resnet/imagenet_resnet50.yaml"
    return {
        "bert_base": (bert_config, bert),
        "bert_base_compile": (bert_config, [*bert, "trainer.compile=true"]),
        "bert_base_checkpointing": (bert_config, [*bert, "model.activation_checkpointing=true"]),
        "resnet50": (resnet_config, resnet),
        "resnet50_compile": (resnet_config, [*resnet, "trainer.compile=true"]),
        "resnet50_checkpointing": (resnet_config, [*resnet, "model.activation_checkpointing=true"]),
        "zero3_bf16": ("configs/bert/pretrain_tiny.yaml", [*tiny, "engine.zero_stage=3", "engine.precision=bf16"]),
        "fp16_zero2": ("configs/bert/pretrain_tiny.yaml", [*tiny, "engine.zero_stage=2", "engine.precision=fp16"]),
    }


def distdl_train(config: str, overrides: list[str], work: Path, name: str) -> tuple[dict[str, Any], list[dict]]:
    """`distdl train` in a subprocess on one GPU; its summary and metrics lines."""
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / config), f"run.storage_path={work / 'runs'}",
               f"run.name={name}", "run.max_failures=0", "scaling.num_workers=1", "scaling.use_gpu=true",
               f"scaling.cpus_per_worker={min(12, os.cpu_count() or 1)}", "tracking.wandb_mode=disabled",
               "tracking.progress_bar=false", *overrides]
    print("gpu_check:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    run_dir = work / "runs" / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run_dir / "summary.json").read_text()), records


def result(summary: dict[str, Any], records: list[dict], started: float) -> dict[str, Any]:
    """What one run measured, as distdl logged it."""
    windows = [r for r in records if "samples_per_s" in r]
    steady = windows[1:] or windows  # the first window holds start-up and warm-up
    usage = summary.get("utilization", {})
    return {
        "completed": summary.get("completed"), "steps": summary.get("steps"), "backend": summary.get("backend"),
        "samples_per_s": sum(r["samples_per_s"] for r in steady) / len(steady) if steady else None,
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady) if steady else None,
        "mfu": sum(r["mfu"] for r in steady) / len(steady) if steady and steady[0].get("mfu") is not None else None,
        "tflops_per_device": sum(r["tflops_per_device"] for r in steady) / len(steady) if steady else None,
        "mean_mfu_with_warmup": usage.get("mean_mfu"), "peak_tflops": usage.get("peak_tflops_per_device"),
        "peak_source": usage.get("peak_source"), "flops_per_step": usage.get("flops_per_step"),
        "compile_s": usage.get("compile_s"), "final_loss": summary.get("final", {}).get("loss"),
        "grad_norms": [r.get("grad_norm") for r in windows], "memory": summary.get("memory_per_rank"),
        "window_samples_per_s": [round(r["samples_per_s"], 1) for r in windows], "wall_s": time.time() - started,
    }


def main() -> None:
    args = parse_args()
    report: dict[str, Any] = {"machine": gpu_facts()}
    print(f"gpu_check: {report['machine']['gpu']}", flush=True)
    peak = [f"trainer.peak_tflops={args.peak_tflops}"] if args.peak_tflops else []
    with tempfile.TemporaryDirectory(prefix="distdl-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(key, "1")
        tokenizer = train_tokenizer(args.corpus, work / "tokenizer")
        runs = config_runs(args, args.corpus, tokenizer)
        for name, (config, overrides) in runs.items():
            if args.only and name not in args.only:
                continue
            started = time.time()
            try:
                report[name] = outcome = result(*distdl_train(config, [*overrides, *peak], work, name), started)
            except subprocess.CalledProcessError as error:  # one broken path must not hide the others
                report[name] = {"failed": f"exit {error.returncode}", "wall_s": time.time() - started}
                continue
            print(f"gpu_check: {name}: {outcome['samples_per_s']} samples/s, MFU {outcome['mfu']}, "
                  f"compile {outcome['compile_s']} s, final loss {outcome['final_loss']}", flush=True)
        if "tokens_per_s" in report.get("bert_base", {}):
            parameters = bert_base_parameters(tokenizer)
            bert = report["bert_base"]
            bert["parameters"] = parameters
            bert["mfu_6nd"] = 6 * parameters * bert["tokens_per_s"] / (bert["peak_tflops"] * 1e12)
    report["definitions"] = {
        "mfu": "distdl's logged MFU, mean over the windows after the first: the step's FLOPs counted by "
               "torch.utils.flop_counter, per token, x tokens/s / the device's peak at the run's precision",
        "mfu_6nd": "6 x parameters x tokens/s / peak (the standard count; attention's L^2 term left out, "
                   "the vocabulary projected at every position)",
        "samples_per_s": "mean over the metrics.jsonl windows after the first (start-up and warm-up)",
        "compile_s": "seconds of the first compiled step, kept out of the step rate",
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_results(args.out, report)


if __name__ == "__main__":
    main()
