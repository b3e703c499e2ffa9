"""GLUE fine-tuning on 2 Ray Train workers with real DeepSpeed, from real pretrained weights (MiniLM-L6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distdl import cli
from distdl.cluster.connect import connect_ray
from distdl.config import load_config
from distdl.data import glue
from distdl.driver import train
from distdl.glue_report import glue_table
from distdl.rundir import RAY_SNAPSHOT, read_metrics
from tests.helpers.glue_fixtures import SIZES
from tests.helpers.shared import QUIET, REPO

pytestmark = pytest.mark.distributed


def finetune(tmp_path: Path, glue_dir: Path, model: Path, task: str, *overrides: str):
    base = [
        f"run.storage_path={tmp_path}",
        f"model.name_or_path={model}",
        f"data.path={glue_dir}",
        "trainer.epochs=2",  # 160 examples / 2 workers / micro-batch 8: 10 steps an epoch
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=16",
        "trainer.log_every=2",
        "optimizer.lr=2e-4",
        *QUIET,
    ]
    config = load_config(REPO / "configs" / "glue" / f"{task}.yaml", [*base, *overrides])
    return config, train(config, connect_ray)


def evaluations(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


def assert_learned(run_dir: Path) -> None:
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def single_process_metrics(model_dir: Path, task: glue.GlueTask, split: Any) -> dict[str, float]:
    """The dev metrics of exported weights, evaluated in this process in one pass."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    collate = DataCollatorWithPadding(AutoTokenizer.from_pretrained(model_dir))
    features = split.select_columns(["input_ids", "token_type_ids", "attention_mask"])
    with torch.no_grad():
        logits = model(**collate([features[i] for i in range(len(features))])).logits.numpy()
    predictions = logits[:, 0] if task.is_regression else logits.argmax(-1)
    return glue.compute_metrics(task, predictions, np.asarray(split["label"]))


def test_sst2_from_real_weights_keeps_the_best_and_matches_single_process_eval(ray_local, tmp_path, glue_dir, minilm):
    # (Resuming is the same code for every workload: tests/distributed/test_faults.py resumes BERT pretraining.)
    config, summary = finetune(tmp_path, glue_dir, minilm, "sst2")
    run_dir = config.run_dir
    assert summary["completed"] and summary["steps"] == 20
    assert_learned(run_dir)
    accuracy = evaluations(run_dir, "eval_accuracy")
    assert sorted(accuracy) == [10, 20], "evaluated at each epoch's end"
    best = summary["best"]
    assert best["eval_accuracy"] == max(accuracy.values()) >= 0.9
    # Ray Train keeps the best checkpoint by the task's metric, and it holds that step.
    snapshot = json.loads((run_dir / RAY_SNAPSHOT).read_text())
    kept = {r["checkpoint_dir_name"]: r["metrics"]["step"] for r in snapshot["checkpoint_results"]}
    assert f"checkpoint_{best['step']:08d}" in kept
    # Test predictions in the GLUE server's format: every test example once, labels as the files write them.
    rows = (run_dir / glue.SUBMISSION_DIRNAME / "SST-2.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 1 + SIZES["test"]
    assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(SIZES["test"]))
    assert {r.split("\t")[1] for r in rows[1:]} <= {"0", "1"}
    # Distributed evaluation (shards of 23 and 22, gathered) equals one process over the whole dev set.
    exported = tmp_path / "best"
    assert cli.main(["export", str(run_dir), str(exported), "--checkpoint", "best"]) == 0
    dev = dev_split(config, "validation")
    assert single_process_metrics(exported, glue.TASKS["sst2"], dev) == {"accuracy": best["eval_accuracy"]}
    assert f"| SST-2 | Acc | {100 * best['eval_accuracy']:.1f} | glue-sst2 | {best['step']} |" in glue_table([run_dir])


def dev_split(config, name: str):
    from distdl.workloads.glue import load_tokenizer, tokenized_splits

    data, model = config.sections["data"], config.sections["model"]
    return tokenized_splits(glue.get_task(data.task), data, load_tokenizer(model))[name]


def test_pair_task_rte_learns_from_real_weights(ray_local, tmp_path, glue_dir, minilm):
    config, summary = finetune(tmp_path, glue_dir, minilm, "rte")
    assert_learned(config.run_dir)
    assert summary["final"]["eval_accuracy"] >= 0.8, summary["final"]  # chance: about 0.5
    rows = (config.run_dir / glue.SUBMISSION_DIRNAME / "RTE.tsv").read_text().splitlines()[1:]
    assert {r.split("\t")[1] for r in rows} <= {"entailment", "not_entailment"}


# ZeRO-3 with GLUE's model, and STS-B in bf16, train in tests/distributed/test_every_path.py; ZeRO-3's export in
# tests/distributed/test_train_distributed.py. Here: the regression task learns, and its export evaluates alike.
def test_regression_task_stsb(ray_local, tmp_path, glue_dir, minilm):
    config, summary = finetune(tmp_path, glue_dir, minilm, "stsb", "trainer.epochs=4")
    assert_learned(config.run_dir)
    final = summary["final"]
    assert final["eval_spearman"] >= 0.6 and final["eval_pearson"] >= 0.6, final
    assert summary["parameter_checksums"][0] == summary["parameter_checksums"][1]
    # The final weights, exported and evaluated in one process, give the same correlations.
    exported = tmp_path / "final"
    assert cli.main(["export", str(config.run_dir), str(exported)]) == 0
    alone = single_process_metrics(exported, glue.TASKS["stsb"], dev_split(config, "validation"))
    assert alone == pytest.approx({"spearman": final["eval_spearman"], "pearson": final["eval_pearson"]}, abs=1e-5)
    scores = [float(r.split("\t")[1]) for r in
              (config.run_dir / glue.SUBMISSION_DIRNAME / "STS-B.tsv").read_text().splitlines()[1:]]
    assert len(scores) == SIZES["test"] and all(0 <= s <= 5 for s in scores)


def test_pretrain_tiny_then_export_then_finetune(ray_local, tmp_path, glue_dir, corpus):
    pretrain = load_config(REPO / "configs/bert/pretrain_tiny.yaml", [
        f"run.storage_path={tmp_path}", f"data.path={corpus}", "trainer.max_steps=6", "trainer.micro_batch_size=8",
        "trainer.global_batch_size=16", "trainer.log_every=3", "tokenizer.vocab_size=2000", "data.max_seq_length=64",
        *QUIET,
    ])
    train(pretrain, connect_ray)
    exported = tmp_path / "bert-tiny-hf"
    assert cli.main(["export", str(pretrain.run_dir), str(exported)]) == 0
    config, summary = finetune(tmp_path, glue_dir, exported, "sst2", "trainer.epochs=1", "optimizer.lr=3e-3")
    assert summary["completed"] and summary["best"]["step"] == 10
    assert np.isfinite(summary["final"]["eval_loss"])
    # The encoder started from the pretraining run: the fine-tuned word embeddings are still the
    # pretrained ones, up to the few rows the fine-tuning data touched (a fresh model's would be unrelated).
    from transformers import AutoModel

    assert cli.main(["export", str(config.run_dir), str(tmp_path / "finetuned")]) == 0
    before = AutoModel.from_pretrained(exported).embeddings.word_embeddings.weight.flatten()
    after = AutoModel.from_pretrained(tmp_path / "finetuned").embeddings.word_embeddings.weight.flatten()
    assert before.shape == after.shape
    assert torch.nn.functional.cosine_similarity(before, after, dim=0) > 0.9
