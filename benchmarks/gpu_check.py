"""One prepared check of the GPU path, for a machine with an NVIDIA GPU: a few minutes, one JSON.

1. BERT-base masked-LM pretraining through the normal `distdl train` path: configs/bert/pretrain_base.yaml
   on one GPU (world size 1, NCCL backend), bf16, ZeRO-2, sequence length 128, PyTorch's
   scaled-dot-product attention (model.attn_implementation=sdpa), a WordPiece vocabulary of
   30522 trained on the local corpus (nothing is downloaded). Reports samples/s and tokens/s over
   the steady-state log windows (the first is warm-up) and the model-FLOPs utilization

       MFU = 6 x N x tokens/s / peak bf16 FLOP/s

   with N the model's parameter count (BertForMaskedLM, the tied embedding counted once): the
   standard 6·N·D count (forward 2·N, backward 4·N per token), which leaves out attention's
   sequence-length term. distdl predicts the vocabulary at the masked 15% of positions only
   (distdl/models/bert.py), so it does less work per token than 6·N: the FLOPs of its training
   step counted by torch.utils.flop_counter give a second, lower MFU, the hardware's real use.
2. A ResNet-50 step loop (torchvision, bf16 autocast, channels_last, SGD, synthetic 224x224 images):
   images/s, and MFU from the step's FLOPs counted by torch.utils.flop_counter.
3. The shipped configs/resnet/imagenet_resnet50.yaml through `distdl train` for 50 steps on one GPU,
   in its own bf16, on synthetic 224-pixel images: images/s as distdl logs them.
4. One short run each of ZeRO-3 (bf16) and fp16 (ZeRO-2, dynamic loss scale) through `distdl train`
   on tiny BERT: paths no CPU machine can take (fp16) or takes only over gloo (ZeRO-3).

The peak is the GPU's dense bf16 tensor-core figure from its datasheet (table below, matched on the
device name), or --peak-tflops. The issue's target: MFU >= 0.5 for BERT-base at length 128 on an H100.

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

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets (SXM parts unless named).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "GH200": 989.4,
                    "A100": 312.0, "A10G": 70.0, "L40S": 362.1, "L4": 121.0, "B200": 2250.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--bert-steps", type=int, default=120, help="optimizer steps (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--bert-batch", type=int, default=256, help="sequences per step (one GPU)")
    parser.add_argument("--resnet-steps", type=int, default=60)
    parser.add_argument("--resnet-batch", type=int, default=256)
    parser.add_argument("--corpus", default="/usr/share/common-licenses")
    parser.add_argument("--skip-bert", action="store_true")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--config-steps", type=int, default=50, help="steps of imagenet_resnet50.yaml")
    parser.add_argument("--skip-configs", action="store_true", help="skip parts 3 and 4")
    return parser.parse_args()


def gpu_facts(peak_tflops: float | None) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name(0)
    if peak_tflops is None:
        matches = [key for key in PEAK_BF16_TFLOPS if key in name]
        if not matches:
            raise SystemExit(f"gpu_check: no bf16 peak known for {name!r}; pass --peak-tflops")
        peak_tflops = PEAK_BF16_TFLOPS[max(matches, key=len)]  # "H100 PCIe" before "H100"
    import deepspeed

    return {"gpu": name, "capability": list(torch.cuda.get_device_capability(0)),
            "peak_bf16_tflops": peak_tflops, "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())), "deepspeed": deepspeed.__version__,
            "bf16_supported": torch.cuda.is_bf16_supported()}


def train_tokenizer(corpus: str, out: Path) -> Path:
    """BERT's vocabulary size, trained locally: the model's shapes are BERT-base's without a download."""
    from distdl.data.text import TextDataSection, TokenizerSection, load_raw_corpus
    from distdl.data.text import train_tokenizer as train

    train(load_raw_corpus(TextDataSection(path=corpus)), TokenizerSection(vocab_size=30522), out)
    return out


def bert_parameters(tokenizer: Path) -> int:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    model = BertForMaskedLM(BertConfig(vocab_size=vocab))  # BERT-base's defaults: 12 x 768, 12 heads
    return sum(p.numel() for p in model.parameters())  # parameters() yields the tied embedding once


def bert_step_flops(tokenizer: Path, batch: int, seq: int) -> float:
    """The FLOPs of one training step (forward and backward) of the model distdl trains, as torch's
    FlopCounterMode counts them: the vocabulary is predicted at the 15% masked positions only."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoTokenizer, BertConfig

    from distdl.models.bert import BertForMaskedPositionsLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    model = BertForMaskedPositionsLM(BertConfig(vocab_size=vocab, attn_implementation="sdpa")).cuda()
    ids = torch.randint(5, vocab, (batch, seq), device="cuda")
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.15, ids, torch.full_like(ids, -100))
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", torch.bfloat16):
        model(input_ids=ids, labels=labels).loss.backward()
    return float(counter.get_total_flops())


def run_bert(args: argparse.Namespace, facts: dict[str, Any], work: Path) -> dict[str, Any]:
    tokenizer = train_tokenizer(args.corpus, work / "tokenizer")
    overrides = [
        f"run.storage_path={work / 'runs'}", "run.name=gpu-check-bert-base", "run.max_failures=0",
        "scaling.num_workers=1", "scaling.use_gpu=true", f"scaling.cpus_per_worker={min(8, os.cpu_count() or 1)}",
        "engine.zero_stage=2", "engine.precision=bf16", "model.preset=base", "model.attn_implementation=sdpa",
        f"data.path={args.corpus}", "data.hub_config=null", "data.max_seq_length=128", "data.num_proc=null",
        f"tokenizer.name_or_path={tokenizer}",
        f"trainer.max_steps={args.bert_steps}", f"trainer.micro_batch_size={args.bert_batch}",
        f"trainer.global_batch_size={args.bert_batch}", f"trainer.log_every={args.log_every}",
        "trainer.eval_every=0", "trainer.checkpoint_every=0", "scheduler.warmup_steps=10",
        "tracking.wandb_mode=disabled", "tracking.progress_bar=false",
    ]
    started = time.time()
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / "configs/bert/pretrain_base.yaml"), *overrides]
    print("gpu_check:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    run_dir = work / "runs" / "gpu-check-bert-base"
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in records if "tokens_per_s" in r][1:]  # the first window holds start-up and warm-up
    # Each window's rate times its steps, over the total time: samples and tokens per second overall.
    seconds = sum(args.log_every * args.bert_batch / r["samples_per_s"] for r in steady)
    samples_per_s = len(steady) * args.log_every * args.bert_batch / seconds
    tokens_per_s = samples_per_s * 128
    parameters = bert_parameters(tokenizer)
    peak = facts["peak_bf16_tflops"] * 1e12
    counted = bert_step_flops(tokenizer, 8, 128) / 8  # per sequence
    return {
        "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s, "parameters": parameters,
        "mfu_6nd": 6 * parameters * tokens_per_s / peak,
        "mfu_counted_flops": counted * samples_per_s / peak,
        "flops_per_sequence_6n": 6 * parameters * 128, "flops_per_sequence_counted": counted,
        "backend": summary.get("backend"), "world_size": summary.get("world_size"),
        "final_loss": summary.get("final", {}).get("loss"), "memory": summary.get("memory_per_rank"),
        "window_samples_per_s": [round(r["samples_per_s"], 1) for r in records if "samples_per_s" in r],
        "wall_s": time.time() - started,
    }


def distdl_train(config: str, overrides: list[str], work: Path, name: str) -> tuple[dict[str, Any], list[dict]]:
    """`distdl train` in a subprocess on one GPU; its summary and metrics lines."""
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / config), f"run.storage_path={work / 'runs'}",
               f"run.name={name}", "scaling.num_workers=1", "scaling.use_gpu=true",
               f"scaling.cpus_per_worker={min(8, os.cpu_count() or 1)}", "tracking.wandb_mode=disabled", *overrides]
    print("gpu_check:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    run_dir = work / "runs" / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run_dir / "summary.json").read_text()), records


def config_runs(args: argparse.Namespace, corpus: str) -> dict[str, tuple[str, list[str]]]:
    """Parts 3 and 4: (config, overrides) per run; tests/distributed/test_every_path.py checks that they validate."""
    tiny = [f"data.path={corpus}", "data.max_seq_length=128", "trainer.max_steps=4", "trainer.micro_batch_size=32",
            "trainer.global_batch_size=32", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.checkpoint_every=0"]
    return {
        "imagenet_resnet50_config": ("configs/resnet/imagenet_resnet50.yaml", [
            "data.dataset=synthetic", "data.image_size=224", "data.synthetic_classes=1000",
            f"data.synthetic_train_size={32 * (args.config_steps + 1)}", "data.synthetic_eval_size=64",
            "data.loader_workers=4", "trainer.epochs=null", f"trainer.max_steps={args.config_steps}",
            "trainer.micro_batch_size=32", "trainer.global_batch_size=32", "trainer.log_every=10",
            "trainer.eval_every=0", "trainer.checkpoint_every=0"]),
        "zero3_bf16": ("configs/bert/pretrain_tiny.yaml", [*tiny, "engine.zero_stage=3", "engine.precision=bf16"]),
        "fp16_zero2": ("configs/bert/pretrain_tiny.yaml", [*tiny, "engine.zero_stage=2", "engine.precision=fp16"]),
    }


def run_configs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (config, overrides) in config_runs(args, args.corpus).items():
        summary, records = distdl_train(config, overrides, work, name)
        rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
        out[name] = {"completed": summary.get("completed"), "steps": summary.get("steps"),
                     "backend": summary.get("backend"), "final_loss": summary.get("final", {}).get("loss"),
                     "grad_norms": [r.get("grad_norm") for r in records if "loss" in r],
                     # images/s (or sequences/s) over the windows after the first (start-up and warm-up)
                     "samples_per_s": sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else None,
                     "memory": summary.get("memory_per_rank")}
    return out


def run_resnet(args: argparse.Namespace, facts: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    images = torch.randn(args.resnet_batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.resnet_batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    step_flops = float(counter.get_total_flops())
    for _ in range(10):  # warm-up: cuDNN's algorithm search
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.resnet_steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    images_per_s = args.resnet_steps * args.resnet_batch / seconds
    return {"images_per_s": images_per_s, "flops_per_image": step_flops / args.resnet_batch,
            "mfu_counted_flops": step_flops * args.resnet_steps / seconds / (facts["peak_bf16_tflops"] * 1e12),
            "batch": args.resnet_batch, "steps": args.resnet_steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    args = parse_args()
    facts = gpu_facts(args.peak_tflops)
    print(f"gpu_check: {facts['gpu']} (bf16 peak {facts['peak_bf16_tflops']} TFLOP/s)", flush=True)
    report: dict[str, Any] = {"machine": facts}
    with tempfile.TemporaryDirectory(prefix="distdl-gpu-check-") as tmp:
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tmp) / "hf-datasets"))
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(key, "1")
        if not args.skip_bert:
            report["bert_base"] = bert = run_bert(args, facts, Path(tmp))
            print(f"gpu_check: BERT-base bf16 ZeRO-2: {bert['samples_per_s']:.0f} samples/s, "
                  f"{bert['tokens_per_s']:.0f} tokens/s, MFU {bert['mfu_6nd']:.3f} (6·N·tokens, N="
                  f"{bert['parameters'] / 1e6:.1f}M), {bert['mfu_counted_flops']:.3f} (counted FLOPs); "
                  f"backend {bert['backend']}", flush=True)
        if not args.skip_configs:
            report["configs"] = configs = run_configs(args, Path(tmp))
            for name, result in configs.items():
                print(f"gpu_check: {name}: completed {result['completed']}, {result['samples_per_s']} samples/s, "
                      f"final loss {result['final_loss']}", flush=True)
    if not args.skip_resnet:
        report["resnet50"] = resnet = run_resnet(args, facts)
        print(f"gpu_check: ResNet-50 bf16: {resnet['images_per_s']:.0f} images/s, MFU {resnet['mfu_counted_flops']:.3f}",
              flush=True)
    report["definitions"] = {
        "mfu_6nd": "6 x parameters x tokens/s / peak bf16 FLOP/s (the standard count; attention's L^2 term left out)",
        "mfu_counted_flops": "torch.utils.flop_counter's FLOPs of a training step x steps/s / peak bf16 FLOP/s",
        "samples_per_s": "over the metrics.jsonl windows after the first (start-up and warm-up)",
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
