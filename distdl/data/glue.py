"""GLUE (Wang et al. 2019): the nine tasks' files, labels, metrics and test-server submission format.

Data comes from the hub (`nyu-mll/glue`, for users with network) or from a local folder in the
official distribution layout (`SST-2/train.tsv`, `MNLI/dev_matched.tsv`, header-less CoLA, ...).
Either way each split becomes a `datasets.Dataset` with the columns `text_a`, `text_b` (pair
tasks), `label` (the hub's label ids; a float score for STS-B; -1 on test sets) and `idx`.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from distdl.errors import ConfigError

HUB_DATASET = "nyu-mll/glue"
SUBMISSION_DIRNAME = "glue_submission"
STSB_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class Split:
    """One dev or test set of a task, as the hub and the distribution name it."""

    name: str  # the hub's split name: validation, validation_matched, test, ...
    file: str  # in the task folder of the distribution
    metric_prefix: str = ""  # for dev sets: MNLI's matched_/mismatched_
    submission: str = ""  # for test sets: the file the GLUE server expects
    hub_config: str = ""  # when not the task's own (AX)
    columns: tuple[str, ...] = ()  # when not the task's text columns (AX)


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str  # in the official distribution
    text_columns: tuple[str, ...]  # in the distribution's TSV files
    hub_text_columns: tuple[str, ...]
    label_column: str
    # Label strings as the files write them, in the order of the hub's label ids; () for regression.
    labels: tuple[str, ...]
    # Human-readable label names (the hub's), for the model config's id2label.
    label_names: tuple[str, ...]
    # GLUE's metrics for the task; the first is the one the BERT paper reports and selects by.
    metrics: tuple[str, ...]
    dev: tuple[Split, ...]
    test: tuple[Split, ...]
    test_index_column: str = "index"
    # CoLA's train and dev files have no header row: source, label, original label, sentence.
    headerless_columns: tuple[str, ...] = ()
    extra_test: tuple[Split, ...] = field(default=())

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def primary_metric(self) -> str:
        """The evaluation key the best checkpoint is chosen by (matched accuracy for MNLI)."""
        return f"eval_{self.dev[0].metric_prefix}{self.metrics[0]}"


def _single(submission: str) -> tuple[tuple[Split, ...], tuple[Split, ...]]:
    return (Split("validation", "dev.tsv"),), (Split("test", "test.tsv", submission=submission),)


BINARY = ("0", "1")
NLI_2 = ("entailment", "not_entailment")
TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", ("sentence",), ("sentence",), "label", BINARY, ("unacceptable", "acceptable"),
                     ("mcc",), *_single("CoLA.tsv"),
                     headerless_columns=("source", "label", "original_label", "sentence")),
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", BINARY, ("negative", "positive"),
                     ("accuracy",), *_single("SST-2.tsv")),
    "mrpc": GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality", BINARY,
                     ("not_equivalent", "equivalent"), ("f1", "accuracy"), *_single("MRPC.tsv")),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", (), (),
                     ("spearman", "pearson"), *_single("STS-B.tsv")),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", BINARY,
                    ("not_duplicate", "duplicate"), ("f1", "accuracy"), *_single("QQP.tsv"), test_index_column="id"),
    "mnli": GlueTask(
        "mnli", "MNLI", ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label",
        ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"), ("accuracy",),
        dev=(Split("validation_matched", "dev_matched.tsv", metric_prefix="matched_"),
             Split("validation_mismatched", "dev_mismatched.tsv", metric_prefix="mismatched_")),
        test=(Split("test_matched", "test_matched.tsv", submission="MNLI-m.tsv"),
              Split("test_mismatched", "test_mismatched.tsv", submission="MNLI-mm.tsv")),
        # The diagnostic set is scored with the MNLI model; it sits beside the task folders.
        extra_test=(Split("test", "../diagnostic/diagnostic.tsv", submission="AX.tsv", hub_config="ax",
                          columns=("sentence1", "sentence2")),),
    ),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", NLI_2, NLI_2,
                     ("accuracy",), *_single("QNLI.tsv")),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", NLI_2, NLI_2,
                    ("accuracy",), *_single("RTE.tsv")),
    "wnli": GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", BINARY,
                     ("not_entailment", "entailment"), ("accuracy",), *_single("WNLI.tsv")),
}


def get_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise ConfigError(f"data.task={name!r} is not a GLUE task; allowed: {', '.join(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------- metrics


def compute_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics for one dev set (class ids, or scores for STS-B), by scikit-learn and scipy."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task.is_regression:
        if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
            # A constant has no correlation; scipy would warn and return nan.
            return {"spearman": float("nan"), "pearson": float("nan")}
        return {"spearman": float(spearmanr(predictions, labels)[0]), "pearson": float(pearsonr(predictions, labels)[0])}
    functions = {
        "mcc": matthews_corrcoef,
        "accuracy": accuracy_score,
        "f1": f1_score,  # of the positive class (1: equivalent, duplicate), as GLUE reports
    }
    return {name: float(functions[name](labels, predictions)) for name in task.metrics}


# ----------------------------------------------------------------------------- reading


def load_task(task: GlueTask, path: str, cache_dir: Optional[str] = None) -> Any:
    """All splits of the task as a DatasetDict: train, its dev set(s) and whichever test sets exist."""
    from distdl.data.text import is_local_path

    if is_local_path(path):
        return _load_local(task, Path(path).expanduser(), cache_dir)
    return _load_hub(task, path, cache_dir)


def _task_folder(task: GlueTask, root: Path) -> Path:
    """`root` may be the GLUE folder (holding SST-2/ ...) or the task's own folder."""
    if not root.exists():
        raise ConfigError(f"data.path: {root} does not exist (give the GLUE folder, the task folder, or a hub name)")
    for folder in (root / task.folder, root):
        if (folder / "train.tsv").is_file():
            return folder
    raise ConfigError(
        f"data.path: neither {root / task.folder} nor {root} holds train.tsv for task {task.name} "
        f"(expected the GLUE distribution layout: {task.folder}/train.tsv, "
        f"{', '.join(f'{task.folder}/{s.file}' for s in task.dev)})"
    )


def _load_local(task: GlueTask, root: Path, cache_dir: Optional[str]) -> Any:
    import datasets

    folder = _task_folder(task, root)
    splits = {"train": _read_split(task, folder / "train.tsv", None, cache_dir)}
    for split in task.dev:
        file = folder / split.file
        if not file.is_file():
            raise ConfigError(f"data.path: {file} is missing; task {task.name} needs it for evaluation")
        splits[split.name] = _read_split(task, file, None, cache_dir)
    for split in task.test + task.extra_test:
        file = (folder / split.file).resolve()
        if file.is_file():
            splits[_test_key(split)] = _read_split(task, file, split, cache_dir)
    return datasets.DatasetDict(splits)


def _test_key(split: Split) -> str:
    return "ax" if split.hub_config == "ax" else split.name


def test_splits(task: GlueTask) -> tuple[tuple[str, Split], ...]:
    """(dataset key, split) of every test set a submission may hold."""
    return tuple((_test_key(s), s) for s in task.test + task.extra_test)


def _header(file: Path) -> list[str]:
    with open(file, encoding="utf-8", newline="") as handle:
        first = handle.readline().rstrip("\r\n")
    return first.split("\t") if first else []


def _has_second_line(file: Path) -> bool:
    with open(file, encoding="utf-8", newline="") as handle:
        handle.readline()
        return bool(handle.readline().strip())


def _read_split(task: GlueTask, file: Path, test: Optional[Split], cache_dir: Optional[str]) -> Any:
    """One TSV file as text_a/text_b/label/idx; errors name the file and, for a bad row, its line."""
    import datasets

    headerless = bool(task.headerless_columns) and test is None
    if file.stat().st_size == 0:
        raise ConfigError(f"{file}: is empty (an empty split; task {task.name} needs rows here)")
    columns = list(task.headerless_columns) if headerless else _header(file)
    if not headerless and not _has_second_line(file):
        raise ConfigError(f"{file}: holds no rows below its header (an empty split)")
    text_columns = (test.columns or task.text_columns) if test else task.text_columns
    needed = [*text_columns, task.test_index_column if test else task.label_column]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ConfigError(f"{file}: no column {missing[0]!r} (task {task.name} needs {', '.join(needed)}; "
                          f"the header has {', '.join(columns) or 'nothing'})")
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    try:
        # QUOTE_NONE: GLUE's TSVs hold bare quotes; keep_default_na off: "null", "NA" are text.
        raw = datasets.load_dataset(
            "csv", data_files={"rows": str(file)}, split="rows", delimiter="\t", quoting=csv.QUOTE_NONE,
            keep_default_na=False, skip_blank_lines=False, features=features, cache_dir=cache_dir,
            **({"column_names": columns} if headerless else {}),
        )
    except Exception as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{file}: cannot be read as a tab-separated GLUE file: {str(cause).strip()}") from err
    first_line = 1 if headerless else 2
    convert = _row_converter(task, file, text_columns, test, first_line)
    return raw.map(convert, batched=True, with_indices=True, remove_columns=raw.column_names,
                   new_fingerprint=_fingerprint(raw._fingerprint, task.name, str(test)), desc=f"reading {file.name}")


def _row_converter(task: GlueTask, file: Path, text_columns: tuple[str, ...], test: Optional[Split],
                   first_line: int) -> Any:
    label_ids = {label: i for i, label in enumerate(task.labels)}
    index_column = task.test_index_column

    def where(position: int) -> str:
        return f"{file}:{position + first_line}"

    def parse_label(value: Optional[str], position: int) -> float | int:
        if value is None or value == "":
            raise ConfigError(f"{where(position)}: the {task.label_column!r} column is empty")
        if task.is_regression:
            try:
                score = float(value)
            except ValueError:
                score = math.nan
            if not STSB_RANGE[0] <= score <= STSB_RANGE[1]:
                raise ConfigError(f"{where(position)}: score {value!r} is not a number in [0, 5] (task stsb)")
            return score
        if value not in label_ids:
            raise ConfigError(f"{where(position)}: label {value!r} is not one of {', '.join(task.labels)} "
                              f"(task {task.name})")
        return label_ids[value]

    def parse_index(value: Optional[str], position: int) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where(position)}: index {value!r} in column {index_column!r} is not an integer")

    def convert(batch: dict[str, list], positions: list[int]) -> dict[str, list]:
        out: dict[str, list] = {}
        for name, column in zip(("text_a", "text_b"), text_columns):
            values = batch[column]
            for value, position in zip(values, positions):
                if value is None:
                    raise ConfigError(f"{where(position)}: the row ends before column {column!r}")
            out[name] = values
        if test is None:
            out["label"] = [parse_label(v, p) for v, p in zip(batch[task.label_column], positions)]
            out["idx"] = positions
        else:
            out["label"] = [-1] * len(positions)
            out["idx"] = [parse_index(v, p) for v, p in zip(batch[index_column], positions)]
        return out

    return convert


def _load_hub(task: GlueTask, path: str, cache_dir: Optional[str]) -> Any:
    import datasets

    def load(config: str) -> Any:
        try:
            return datasets.load_dataset(path, config, cache_dir=cache_dir)
        except Exception as err:
            raise ConfigError(f"data.path: could not load GLUE task {config!r} from hub dataset {path!r}: {err}") from err

    loaded = load(task.name)
    splits = {"train": loaded["train"], **{s.name: loaded[s.name] for s in task.dev}}
    splits.update({s.name: loaded[s.name] for s in task.test if s.name in loaded})
    if task.extra_test:
        splits["ax"] = load("ax")["test"]
    renamed = {}
    for name, dataset in splits.items():
        hub_columns = ("premise", "hypothesis") if name == "ax" else task.hub_text_columns
        mapping = dict(zip(hub_columns, ("text_a", "text_b")))
        renamed[name] = dataset.rename_columns(mapping).select_columns([*mapping.values(), "label", "idx"])
    return datasets.DatasetDict(renamed)


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- submission


def write_submission(task: GlueTask, split: Split, indices: np.ndarray, predictions: np.ndarray, out_dir: Path) -> Path:
    """One `<Task>.tsv` as the GLUE server takes it: a header, then index and prediction per row.

    Labels are written as the task's files write them (MNLI's "entailment", SST-2's 0/1); STS-B
    scores are clipped to the task's [0, 5]. The file appears whole or not at all.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / split.submission
    partial = target.with_suffix(".tsv.partial")
    order = np.argsort(indices, kind="stable")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write("index\tprediction\n")
        for index, prediction in zip(indices[order], predictions[order]):
            if task.is_regression:
                value = f"{float(np.clip(prediction, *STSB_RANGE)):.3f}"
            else:
                value = task.labels[int(prediction)]
            handle.write(f"{int(index)}\t{value}\n")
    os.replace(partial, target)
    return target
