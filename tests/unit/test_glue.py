"""GLUE without workers: reading the distribution layout, metrics, bad data, submission files, configs, report."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from distdl import cli
from distdl.config import load_config, resolve_epochs
from distdl.data import glue
from distdl.errors import ConfigError
from distdl.glue_report import bert_paper_average, glue_table
from tests.helpers.glue_fixtures import SIZES
from tests.helpers.shared import REPO

PAIR_TASKS = [name for name, task in glue.TASKS.items() if len(task.text_columns) == 2]


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_equal_their_definitions():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    predictions = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    tp, tn, fp, fn = 3, 3, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue.compute_metrics(glue.TASKS["cola"], predictions, labels) == {"mcc": pytest.approx(mcc)}
    assert glue.compute_metrics(glue.TASKS["mrpc"], predictions, labels) == {
        "f1": pytest.approx(2 * tp / (2 * tp + fp + fn)), "accuracy": pytest.approx((tp + tn) / 8)}
    assert glue.compute_metrics(glue.TASKS["rte"], predictions, labels) == {"accuracy": 0.75}


def test_metrics_agree_with_scikit_learn_and_scipy_on_random_inputs():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    assert glue.compute_metrics(glue.TASKS["qqp"], predictions, labels) == {
        "f1": f1_score(labels, predictions), "accuracy": accuracy_score(labels, predictions)}
    assert glue.compute_metrics(glue.TASKS["cola"], predictions, labels)["mcc"] == matthews_corrcoef(labels, predictions)
    three = rng.integers(0, 3, 500)
    assert glue.compute_metrics(glue.TASKS["mnli"], three, labels)["accuracy"] == accuracy_score(labels, three)
    scores, guesses = rng.uniform(0, 5, 300), rng.uniform(0, 5, 300)
    stsb = glue.compute_metrics(glue.TASKS["stsb"], guesses, scores)
    assert stsb["pearson"] == pytest.approx(pearsonr(guesses, scores)[0])
    assert stsb["spearman"] == pytest.approx(spearmanr(guesses, scores)[0])
    assert stsb["pearson"] == pytest.approx(np.corrcoef(guesses, scores)[0, 1])


def test_spearman_is_rank_correlation_and_a_constant_has_none():
    stsb = glue.TASKS["stsb"]
    monotone = glue.compute_metrics(stsb, np.array([0.1, 0.9, 2.5, 2.9, 50.0]), np.arange(5.0))
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 0.9
    constant = glue.compute_metrics(stsb, np.full(5, 2.0), np.arange(5.0))
    assert math.isnan(constant["spearman"]) and math.isnan(constant["pearson"])


# ----------------------------------------------------------------------------- reading


def raw_rows(file: Path, header: bool = True) -> list[dict[str, str]]:
    with open(file, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    names = rows[0] if header else ["source", "label", "original_label", "sentence"]
    return [dict(zip(names, row)) for row in (rows[1:] if header else rows)]


@pytest.mark.parametrize("name", list(glue.TASKS))
def test_every_task_reads_its_distribution_layout(name, glue_dir):
    task = glue.TASKS[name]
    splits = glue.load_task(task, str(glue_dir))
    dev_names = [s.name for s in task.dev]
    assert len(splits["train"]) == SIZES["train"]
    for split in dev_names:
        assert len(splits[split]) == SIZES["dev"]
        assert splits[split]["idx"] == list(range(SIZES["dev"]))
    for key, _ in glue.test_splits(task):
        assert len(splits[key]) == SIZES["test"] and set(splits[key]["label"]) == {-1}
    assert ("text_b" in splits["train"].column_names) == (name in PAIR_TASKS)
    # Labels map to the hub's ids: the file's label string is labels[id].
    dev_file = glue_dir / task.folder / task.dev[0].file
    rows = raw_rows(dev_file, header=name != "cola")
    for row, example in zip(rows, splits[dev_names[0]]):
        if task.is_regression:
            assert example["label"] == pytest.approx(float(row[task.label_column]))
        else:
            assert task.labels[example["label"]] == row[task.label_column]
        assert example["text_a"] == row[task.text_columns[0]]


def test_mnli_reads_both_dev_sets_and_the_diagnostic_set(glue_dir):
    splits = glue.load_task(glue.TASKS["mnli"], str(glue_dir))
    assert {"validation_matched", "validation_mismatched", "test_matched", "test_mismatched", "ax"} <= set(splits)


def test_the_task_folder_itself_is_accepted(glue_dir):
    assert len(glue.load_task(glue.TASKS["sst2"], str(glue_dir / "SST-2"))["train"]) == SIZES["train"]


def test_missing_test_file_only_skips_the_submission(glue_dir, tmp_path):
    shutil.copytree(glue_dir / "RTE", tmp_path / "RTE")
    (tmp_path / "RTE" / "test.tsv").unlink()
    assert "test" not in glue.load_task(glue.TASKS["rte"], str(tmp_path))


def edit_line(file: Path, number: int, edit) -> None:
    lines = file.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    file.write_text("\n".join(lines) + "\n")


BAD_DATA = {
    "label outside the set": ("sst2", "SST-2/dev.tsv", lambda f: edit_line(f, 5, lambda line: line.rsplit("\t", 1)[0] + "\t7"),
                              ["SST-2/dev.tsv:5", "'7'", "0, 1"]),
    "mnli label outside the set": ("mnli", "MNLI/train.tsv",
                                   lambda f: edit_line(f, 9, lambda line: line.rsplit("\t", 1)[0] + "\tmaybe"),
                                   ["MNLI/train.tsv:9", "'maybe'", "entailment, neutral, contradiction"]),
    "missing column": ("mrpc", "MRPC/train.tsv", lambda f: edit_line(f, 1, lambda line: line.replace("Quality", "Qualty")),
                       ["MRPC/train.tsv", "'Quality'", "Qualty"]),
    "empty split": ("rte", "RTE/dev.tsv", lambda f: f.write_text(""), ["RTE/dev.tsv", "empty"]),
    "header only": ("qnli", "QNLI/train.tsv", lambda f: f.write_text(f.read_text().splitlines()[0] + "\n"),
                    ["QNLI/train.tsv", "no rows"]),
    "row with an extra field": ("cola", "CoLA/train.tsv", lambda f: edit_line(f, 3, lambda line: line + "\textra"),
                                ["CoLA/train.tsv", "line 3"]),
    "row cut short": ("sst2", "SST-2/train.tsv", lambda f: edit_line(f, 4, lambda line: line.split("\t")[0]),
                      ["SST-2/train.tsv:4", "'label'"]),
    "score out of range": ("stsb", "STS-B/dev.tsv", lambda f: edit_line(f, 6, lambda line: line.rsplit("\t", 1)[0] + "\t9.5"),
                           ["STS-B/dev.tsv:6", "'9.5'", "[0, 5]"]),
    "test index not a number": ("wnli", "WNLI/test.tsv", lambda f: edit_line(f, 2, lambda line: "x" + line),
                                ["WNLI/test.tsv:2", "index"]),
    "missing dev file": ("qqp", "QQP/dev.tsv", lambda f: f.unlink(), ["QQP/dev.tsv", "missing"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_named_by_file_and_line(case, glue_dir, tmp_path):
    name, relative, damage, expected = BAD_DATA[case]
    task = glue.TASKS[name]
    shutil.copytree(glue_dir / task.folder, tmp_path / task.folder)
    damage(tmp_path / relative)
    with pytest.raises(ConfigError) as info:
        glue.load_task(task, str(tmp_path))
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_a_path_without_the_layout_lists_what_it_expects(tmp_path):
    with pytest.raises(ConfigError, match=r"MNLI/train.tsv.*MNLI/dev_matched.tsv"):
        glue.load_task(glue.TASKS["mnli"], str(tmp_path))


# ----------------------------------------------------------------------------- model and tokenizer checks


def glue_config(task: str, *overrides: str):
    return load_config(REPO / "configs" / "glue" / f"{task}.yaml", list(overrides))


def prepare_error(*overrides: str) -> str:
    from distdl.workloads.glue import GlueFinetune

    with pytest.raises(ConfigError) as info:
        GlueFinetune.prepare(glue_config("sst2", *overrides))
    return str(info.value)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(glue_dir, tmp_path, minilm):
    from transformers import BertConfig, BertModel

    small = BertConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16)
    BertModel(small).save_pretrained(tmp_path / "small-vocab")
    message = prepare_error(f"model.name_or_path={tmp_path / 'small-vocab'}", f"model.tokenizer={minilm}",
                            f"data.path={glue_dir}")
    assert "30522 tokens" in message and "1000" in message and "do not belong together" in message


def test_a_run_directory_given_as_model_points_to_export(glue_dir, tmp_path):
    run_dir = tmp_path / "bert-tiny"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("workload: bert_pretrain\n")
    message = prepare_error(f"model.name_or_path={run_dir}", f"data.path={glue_dir}")
    assert "distdl export" in message


@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_damaged_model_or_tokenizer_file_is_named(glue_dir, tiny_bert, tmp_path, file):
    model = tmp_path / "damaged"
    shutil.copytree(tiny_bert, model)
    content = (model / file).read_bytes()
    (model / file).write_bytes(content[: len(content) // 2])  # a copy cut short
    message = prepare_error(f"model.name_or_path={model}", f"data.path={glue_dir}")
    assert f"model.name_or_path: {model / file} is damaged" in message


def test_a_sequence_longer_than_the_models_positions_is_refused(glue_dir, tiny_bert):
    message = prepare_error(f"model.name_or_path={tiny_bert}", f"data.path={glue_dir}", "data.max_seq_length=512")
    assert "max_position_embeddings=128" in message


def test_bad_data_exits_2_with_the_message_from_the_command_line(glue_dir, tiny_bert, tmp_path, capsys):
    shutil.copytree(glue_dir / "SST-2", tmp_path / "glue" / "SST-2")
    edit_line(tmp_path / "glue" / "SST-2" / "train.tsv", 3, lambda line: line.rsplit("\t", 1)[0] + "\tpositive")
    code = cli.main(["train", str(REPO / "configs/glue/sst2.yaml"), f"model.name_or_path={tiny_bert}",
                     f"data.path={tmp_path / 'glue'}", f"run.storage_path={tmp_path / 'runs'}"])
    assert code == 2
    assert "SST-2/train.tsv:3: label 'positive' is not one of 0, 1" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "glue-sst2").exists(), "a failed first start leaves no run directory"


# ----------------------------------------------------------------------------- submission files


def test_submission_files_hold_label_strings_in_index_order(tmp_path):
    mnli = glue.TASKS["mnli"]
    matched = mnli.test[0]
    path = glue.write_submission(mnli, matched, np.array([2, 0, 1]), np.array([2, 0, 1]), tmp_path)
    assert path.name == "MNLI-m.tsv"
    assert path.read_text().splitlines() == ["index\tprediction", "0\tentailment", "1\tneutral", "2\tcontradiction"]
    stsb = glue.TASKS["stsb"]
    path = glue.write_submission(stsb, stsb.test[0], np.array([0, 1, 2]), np.array([-0.4, 2.25, 7.0]), tmp_path)
    assert path.read_text().splitlines()[1:] == ["0\t0.000", "1\t2.250", "2\t5.000"]
    assert not list(tmp_path.glob("*.partial"))


# ----------------------------------------------------------------------------- configs and epochs


@pytest.mark.parametrize("name", list(glue.TASKS))
def test_every_task_config_holds_the_bert_recipe(name):
    config = glue_config(name)
    assert config.workload == "glue" and config.sections["data"].task == name
    assert config.sections["data"].max_seq_length == 128
    assert config.trainer.global_batch_size == 32 and config.trainer.epochs == 3
    assert config.optimizer.lr == 2e-5 and config.scheduler.warmup_ratio == 0.1
    assert config.trainer.eval_every == "epoch" and config.trainer.checkpoint_every == "epoch"


def test_epochs_become_steps_once_the_data_size_is_known():
    config = glue_config("rte")  # 2 workers x micro-batch 16, 3 epochs
    assert config.trainer.max_steps is None
    assert resolve_epochs(config, 2490) == 2490 // 32  # one epoch: the global batches of one permutation
    assert config.trainer.max_steps == 3 * 77 and config.trainer.eval_every == 77 == config.trainer.checkpoint_every


def test_max_steps_wins_over_epochs_and_too_little_data_is_refused():
    config = glue_config("rte", "trainer.max_steps=10")
    resolve_epochs(config, 2490)
    assert config.trainer.max_steps == 10 and config.trainer.eval_every == 77
    with pytest.raises(ConfigError, match="20 examples are fewer than one global batch of trainer.global_batch_size=32"):
        resolve_epochs(glue_config("rte"), 20)


# ----------------------------------------------------------------------------- report


BERT_BASE = {  # Devlin et al. 2019, table 1, BERT-base (test set), average 79.6
    ("mnli", "eval_matched_accuracy"): 84.6, ("mnli", "eval_mismatched_accuracy"): 83.4, ("qqp", "eval_f1"): 71.2,
    ("qnli", "eval_accuracy"): 90.5, ("sst2", "eval_accuracy"): 93.5, ("cola", "eval_mcc"): 52.1,
    ("stsb", "eval_spearman"): 85.8, ("mrpc", "eval_f1"): 88.9, ("rte", "eval_accuracy"): 66.4,
}


def test_the_average_is_computed_as_in_the_bert_paper():
    average, missing = bert_paper_average({**BERT_BASE, ("wnli", "eval_accuracy"): 10.0})
    assert round(average, 1) == 79.6 and missing == []
    partial, missing = bert_paper_average({k: v for k, v in BERT_BASE.items() if k[0] != "mnli"})
    assert missing == ["MNLI-m", "MNLI-mm"] and partial == pytest.approx((sum(BERT_BASE.values()) - 168.0) / 7)


def finished_run(root: Path, name: str, task: str, best: dict) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"workload": "glue", "data": {"task": task}}))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 30, "best": {"step": 20, **best}}))
    return run_dir


def test_report_shows_each_tasks_best_run_and_the_average(tmp_path):
    runs = [
        finished_run(tmp_path, "sst2-lr5e-5", "sst2", {"eval_accuracy": 0.91}),
        finished_run(tmp_path, "sst2-lr2e-5", "sst2", {"eval_accuracy": 0.93}),
        finished_run(tmp_path, "mnli", "mnli", {"eval_matched_accuracy": 0.84, "eval_mismatched_accuracy": 0.83}),
        finished_run(tmp_path, "mrpc", "mrpc", {"eval_f1": 0.889, "eval_accuracy": 0.85}),
    ]
    table = glue_table(runs)
    assert "| SST-2 | Acc | 93.0 | sst2-lr2e-5 | 20 |" in table
    assert "| MNLI | Acc m/mm | 84.0/83.0 | mnli | 20 |" in table and "| MRPC | F1/Acc | 88.9/85.0 | mrpc | 20 |" in table
    assert "sst2-lr5e-5" not in table
    assert f"{(93.0 + 84.0 + 83.0 + 88.9) / 4:.1f} over 4 of its 9 entries" in table


def test_report_refuses_what_is_not_a_finished_glue_run(tmp_path):
    pretrain = tmp_path / "bert"
    pretrain.mkdir()
    (pretrain / "config.yaml").write_text("workload: bert_pretrain\n")
    with pytest.raises(ConfigError, match="'bert_pretrain' run, not a glue run"):
        glue_table([pretrain])
    with pytest.raises(ConfigError, match="no config.yaml"):
        glue_table([tmp_path / "nothing"])


# ----------------------------------------------------------------------------- the hub's layout


def write_hub_copy(glue_dir: Path, root: Path) -> Path:
    """A local copy of the hub's nyu-mll/glue layout (parquet per config and split, declared in the
    README's YAML header), built from the fixtures, so the hub code path runs on real `datasets` APIs."""
    hub_columns = {"sst2": ("sentence",), "mnli": ("premise", "hypothesis"), "ax": ("premise", "hypothesis")}
    configs = []
    local = {"sst2": glue.load_task(glue.TASKS["sst2"], str(glue_dir)),
             "mnli": glue.load_task(glue.TASKS["mnli"], str(glue_dir))}
    local["ax"] = {"test": local["mnli"]["ax"]}
    for config, splits in local.items():
        files = []
        for split, dataset in splits.items():
            if config == "mnli" and split == "ax":
                continue
            names = dict(zip(("text_a", "text_b"), hub_columns[config]))
            path = f"{config}/{split}-00000-of-00001.parquet"
            (root / config).mkdir(parents=True, exist_ok=True)
            dataset.rename_columns(names).to_parquet(root / path)
            files.append({"split": split, "path": path})
        configs.append({"config_name": config, "data_files": files})
    (root / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n")
    return root


def test_the_hub_layout_gives_the_same_examples_as_the_distribution(glue_dir, tmp_path):
    hub = write_hub_copy(glue_dir, tmp_path / "glue-hub")
    for name in ("sst2", "mnli"):
        from_hub = glue._load_hub(glue.TASKS[name], str(hub), None)
        from_files = glue.load_task(glue.TASKS[name], str(glue_dir))
        assert set(from_hub) == set(from_files)
        for split in from_files:
            assert from_hub[split].to_dict() == from_files[split].to_dict(), (name, split)


def test_w_and_b_summary_entries_flatten_the_best_and_final_metrics():
    from distdl.tracking import scalar_entries

    summary = {"steps": 20, "task": "sst2", "final": {"eval_accuracy": 0.9, "grad_norm": None},
               "best": {"step": 10, "eval_accuracy": 0.95}, "parameter_checksums": ["a", "b"]}
    assert scalar_entries(summary) == {"steps": 20, "task": "sst2", "final/eval_accuracy": 0.9,
                                       "best/step": 10, "best/eval_accuracy": 0.95}


# ----------------------------------------------------------------------------- every task, in one process


@pytest.mark.parametrize("name", list(glue.TASKS))
def test_every_task_trains_evaluates_and_writes_its_submission(name, glue_dir, tiny_bert, tmp_path):
    import torch

    from distdl.workloads.base import WorkerContext
    from distdl.workloads.glue import GlueFinetune

    task = glue.TASKS[name]
    config = glue_config(name, f"model.name_or_path={tiny_bert}", f"data.path={glue_dir}")
    context = WorkerContext(rank=0, world_size=1, seed=0, micro_batch_size=8, run_dir=tmp_path,
                            device=torch.device("cpu"))
    workload = GlueFinetune(config.sections, context)
    torch.manual_seed(0)
    model = workload.build_model()
    assert model.num_labels == task.num_labels
    # Minibatch noise reweights per-example losses: their mean is transformers' own loss.
    model.eval()
    with torch.no_grad():
        first = next(workload.train_batches(start=0))
        losses, _ = workload.example_losses(model, first)
        assert losses.shape == (8,) and losses.mean().item() == pytest.approx(workload.loss(model, first)[0].item(),
                                                                             rel=1e-5)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = workload.train_batches(start=0)
    for _ in range(3):
        loss, _ = workload.loss(model, next(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = workload.evaluate(model, step=3)
    expected = {f"eval_{split.metric_prefix}{metric}" for split in task.dev for metric in (*task.metrics, "loss")}
    assert set(metrics) == expected and all(np.isfinite(v) for v in metrics.values())
    assert workload.summary()["best"]["step"] == 3
    written = sorted(p.name for p in (tmp_path / glue.SUBMISSION_DIRNAME).iterdir())
    assert written == sorted(split.submission for _, split in glue.test_splits(task))
    for file in written:
        assert len((tmp_path / glue.SUBMISSION_DIRNAME / file).read_text().splitlines()) == 1 + SIZES["test"]
