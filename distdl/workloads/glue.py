"""GLUE fine-tuning (Devlin et al. 2019, section 4.1): a pretrained encoder with a classification head
(a regression head for STS-B), evaluated on the whole dev set with GLUE's own metrics.

The best checkpoint by the task's metric is kept (Ray Train scores checkpoints by it), and whenever
that metric improves the test sets are predicted into the GLUE server's submission files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval

from distdl.collectives import gather_objects
from distdl.config import Config
from distdl.data import glue, shards, text
from distdl.data.files import check_local_model_files
from distdl.errors import ConfigError
from distdl.models.activation_checkpointing import checkpoint_transformer_layers
from distdl.registry import WORKLOADS
from distdl.rundir import CONFIG_FILE
from distdl.workloads.base import ExampleStep, WorkerContext, Workload, evaluate_in_lockstep, evaluation_mode

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@dataclass
class GlueModelSection:
    # A hub name (users with network), a local HF model folder, or a folder written by `distdl export`.
    name_or_path: Optional[str] = None
    # The tokenizer, when it is not saved beside the weights.
    tokenizer: Optional[str] = None
    # HF attention backend: sdpa (PyTorch scaled-dot-product attention) or eager.
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Dropout before the classifier; null keeps the model's (BERT: hidden_dropout_prob, 0.1).
    classifier_dropout: Optional[Annotated[float, Interval(ge=0, lt=1)]] = None
    # Recompute each layer's activations in the backward pass (transformers' gradient checkpointing).
    activation_checkpointing: bool = False


@dataclass
class GlueDataSection:
    # cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli.
    task: str = "sst2"
    # A hub dataset (GLUE itself: nyu-mll/glue), or a local folder in the GLUE distribution layout.
    path: str = glue.HUB_DATASET
    max_seq_length: Annotated[int, Ge(8)] = 128
    # Predict the test sets into GLUE submission files whenever the dev metric improves.
    write_submission: bool = True
    num_proc: Optional[int] = None
    cache_dir: Optional[str] = None


def load_tokenizer(model: GlueModelSection) -> Any:
    from transformers import AutoTokenizer

    source = model.tokenizer or model.name_or_path
    key = "model.tokenizer" if model.tokenizer else "model.name_or_path"
    check_local_model_files(source, key)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise ConfigError(f"{key}: could not load a tokenizer from {source!r}: {err}") from err


def model_config(model: GlueModelSection, task: glue.GlueTask) -> Any:
    from transformers import AutoConfig

    source = Path(model.name_or_path).expanduser()
    if source.is_dir() and not (source / "config.json").exists() and (source / CONFIG_FILE).exists():
        raise ConfigError(f"model.name_or_path: {source} is a distdl run directory; "
                          f"write its weights with `distdl export {source} OUT_DIR` and give OUT_DIR")
    options: dict[str, Any] = {
        "num_labels": task.num_labels,
        "finetuning_task": task.name,
        "problem_type": "regression" if task.is_regression else "single_label_classification",
    }
    if not task.is_regression:
        options["id2label"] = dict(enumerate(task.label_names))
        options["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    if model.classifier_dropout is not None:
        options["classifier_dropout"] = model.classifier_dropout
    try:
        config = AutoConfig.from_pretrained(model.name_or_path, **options)
    except Exception as err:
        raise ConfigError(f"model.name_or_path: could not load a model config from {model.name_or_path!r}: {err}") from err
    config._attn_implementation = model.attn_implementation
    return config


def local_architecture(model: GlueModelSection, data: GlueDataSection) -> tuple[glue.GlueTask, Any]:
    """The task and the model's config for it, the model's files checked to be there."""
    task = glue.get_task(data.task)
    check_local_model_files(model.name_or_path, "model.name_or_path")
    return task, model_config(model, task)


def check_tokenizer(tokenizer: Any, config: Any, model: GlueModelSection, max_seq_length: int) -> None:
    """The tokenizer must emit only ids the model's embedding has, and pad."""
    source = model.tokenizer or model.name_or_path
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"model.tokenizer: the tokenizer from {source!r} has {len(tokenizer)} tokens but the model "
            f"{model.name_or_path!r} embeds only {config.vocab_size} (vocab_size): they do not belong together"
        )
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"model.tokenizer: the tokenizer from {source!r} has no padding token")
    check_positions(config, max_seq_length)


def check_positions(config: Any, max_seq_length: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise ConfigError(f"data.max_seq_length={max_seq_length} exceeds the model's max_position_embeddings={limit}")


def tokenized_splits(task: glue.GlueTask, data: GlueDataSection, tokenizer: Any) -> Any:
    """Every split tokenized (pairs as [CLS] A [SEP] B [SEP]), cached by `datasets` across processes."""
    import datasets

    raw = glue.load_task(task, data.path, data.cache_dir)

    def tokenize(batch: Any) -> dict[str, list]:
        second = batch["text_b"] if "text_b" in batch else None
        return tokenizer(batch["text_a"], second, truncation=True, max_length=data.max_seq_length)

    out = {}
    for name, split in raw.items():
        fingerprint = text.tokenizer_fingerprint(split._fingerprint, tokenizer, data.max_seq_length, data.num_proc)
        text_columns = [c for c in ("text_a", "text_b") if c in split.column_names]
        out[name] = split.map(tokenize, batched=True, remove_columns=text_columns, num_proc=data.num_proc,
                              new_fingerprint=fingerprint, desc=f"tokenizing {name}")
    return datasets.DatasetDict(out)


@WORKLOADS.register("glue")
class GlueFinetune(Workload):
    sections = {"model": GlueModelSection, "data": GlueDataSection}
    path_keys = ("data.path", "data.cache_dir", "model.name_or_path", "model.tokenizer")
    minibatch_noise_refusal = None

    def __init__(self, sections: dict[str, Any], context: WorkerContext) -> None:
        super().__init__(sections, context)
        self.model_section: GlueModelSection = sections["model"]
        self.data: GlueDataSection = sections["data"]
        self.task = glue.get_task(self.data.task)
        self.tokenizer = load_tokenizer(self.model_section)
        self.splits = tokenized_splits(self.task, self.data, self.tokenizer)
        from transformers import DataCollatorWithPadding

        # Pads each batch to its longest sequence, not to max_seq_length; on GPUs to a multiple of 8, for
        # tensor cores. A CPU gains nothing from that: it cost 8% more tokens per batch at length 128.
        self.collator = DataCollatorWithPadding(
            self.tokenizer, pad_to_multiple_of=8 if context.device.type == "cuda" else None)
        self.best: dict[str, Any] = {"step": None, "score": None, "metrics": {}, "submission": None}

    @classmethod
    def validate(cls, config: Config) -> None:
        model, data = config.sections["model"], config.sections["data"]
        glue.get_task(data.task)
        if not model.name_or_path:
            raise ConfigError("model.name_or_path is required: a hub model name, a local HF model folder, "
                              "or a folder written by `distdl export`")

    @classmethod
    def prepare(cls, config: Config) -> int:
        """Check model, tokenizer and data together, and fill the tokenization cache for the workers."""
        model, data = config.sections["model"], config.sections["data"]
        task, config = local_architecture(model, data)
        tokenizer = load_tokenizer(model)
        check_tokenizer(tokenizer, config, model, data.max_seq_length)
        splits = tokenized_splits(task, data, tokenizer)
        return len(splits["train"])

    @classmethod
    def example_step(cls, config: Config) -> ExampleStep:
        """A sequence of data.max_seq_length random tokens through the model's architecture (fresh weights)."""
        from transformers import AutoModelForSequenceClassification

        model, data = config.sections["model"], config.sections["data"]
        task, architecture = local_architecture(model, data)
        check_positions(architecture, data.max_seq_length)
        classifier = AutoModelForSequenceClassification.from_config(architecture, dtype=torch.float32)
        if model.activation_checkpointing:
            classifier = checkpoint_transformer_layers(classifier)
        seq = data.max_seq_length
        labels = torch.zeros(1, dtype=torch.float if task.is_regression else torch.long)
        batch = {"input_ids": torch.randint(architecture.vocab_size, (1, seq)),
                 "attention_mask": torch.ones(1, seq, dtype=torch.long), "labels": labels}
        caveat = (f"every sequence taken as data.max_seq_length={seq} tokens: batches are padded to their "
                  "longest only, so compute is overestimated for shorter sentences")
        return ExampleStep({"model": classifier}, lambda: classifier(**batch).loss, caveat=caveat)

    @classmethod
    def checkpoint_metric(cls, sections: dict[str, Any]) -> Optional[str]:
        return glue.get_task(sections["data"].task).primary_metric

    @classmethod
    def evaluation_metrics(cls, sections: dict[str, Any]) -> list[str]:
        task = glue.get_task(sections["data"].task)
        return [f"eval_{split.metric_prefix}{name}" for split in task.dev for name in ("loss", *task.metrics)]

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        config = model_config(self.model_section, self.task)
        # fp32 weights whatever the file holds; DeepSpeed casts for bf16/fp16 training itself.
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_section.name_or_path, config=config, dtype=torch.float32
        )
        return checkpoint_transformer_layers(model) if self.model_section.activation_checkpointing else model

    def _collate(self, rows: dict[str, list]) -> dict[str, torch.Tensor]:
        return self.collator(shards.as_examples({k: v for k, v in rows.items() if k in MODEL_INPUTS}))

    def train_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        train = self.splits["train"]
        columns = [c for c in (*MODEL_INPUTS, "label") if c in train.column_names]
        train = train.select_columns(columns)
        dtype = torch.float32 if self.task.is_regression else torch.long

        def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            batch = self._collate({k: [e[k] for e in examples] for k in columns})
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
            return batch

        return shards.micro_batches(train, self.context.batch_plan(), collate, start)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**batch)
        if self.task.is_regression:
            return out.loss, {}
        return out.loss, {"accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean()}

    def example_losses(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each example's loss as transformers' sequence classifiers compute the mean: squared error
        for STS-B's scores, cross-entropy otherwise."""
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="none"), {}
        return F.cross_entropy(logits, labels, reduction="none"), {"accuracy": (logits.argmax(-1) == labels).float().mean()}

    def batch_size(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"samples": int(batch["input_ids"].shape[0]), "tokens": int(batch["input_ids"].numel())}

    def predict(self, model: Any, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        """(idx, logits) of every example of `dataset`, in its order, from all ranks together."""
        shard = shards.shard_for_rank(dataset, self.context.rank, self.context.world_size)

        def logits(rows: dict[str, list]) -> tuple[list[int], np.ndarray]:
            batch = {k: v.to(self.context.device) for k, v in self._collate(rows).items()}
            return rows["idx"], model(**batch).logits.float().cpu().numpy()

        parts = evaluate_in_lockstep(self.context, shard, dataset, logits)
        mine = (np.asarray([i for indices, _ in parts for i in indices], dtype=np.int64),
                np.concatenate([out for _, out in parts]) if parts else np.zeros((0, self.task.num_labels), np.float32))
        gathered = gather_objects(mine)
        # Shards are contiguous blocks in rank order, so concatenation restores the dataset's order.
        return np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, 0] if self.task.is_regression else logits.argmax(-1)

    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        with evaluation_mode(model):
            return self._evaluate(model, step)

    def _evaluate(self, model: Any, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for split in self.task.dev:
            dataset = self.splits[split.name]
            indices, logits = self.predict(model, dataset)
            if not np.array_equal(indices, np.arange(len(dataset))):
                raise RuntimeError(f"evaluation of {split.name} did not see every example exactly once")
            labels = np.asarray(dataset["label"])
            values = {"loss": dev_loss(self.task, logits, labels),
                      **glue.compute_metrics(self.task, self.predictions(logits), labels)}
            metrics.update({f"eval_{split.metric_prefix}{name}": value for name, value in values.items()})
        score = metrics[self.task.primary_metric]
        # Ties go to the later step, as Ray Train's checkpoint ranking breaks them.
        if not math.isnan(score) and (self.best["score"] is None or score >= self.best["score"]):
            self.best.update(step=step, score=score, metrics=dict(metrics))
            if self.data.write_submission:
                self.best["submission"] = self.write_test_predictions(model)
        return metrics

    def write_test_predictions(self, model: Any) -> Optional[str]:
        """The GLUE server's files for every test set present (rank 0 writes them)."""
        out_dir = self.context.run_dir / glue.SUBMISSION_DIRNAME
        written = False
        for key, split in glue.test_splits(self.task):
            if key not in self.splits:
                continue
            indices, logits = self.predict(model, self.splits[key])
            if self.context.rank == 0:
                glue.write_submission(self.task, split, indices, self.predictions(logits), out_dir)
            written = True
        return str(out_dir) if written else None

    def state_dict(self) -> dict[str, Any]:
        return dict(self.best)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.update(state)

    def summary(self) -> dict[str, Any]:
        best = {"step": self.best["step"], **self.best["metrics"]}
        return {"task": self.task.name, "best": best, "submission_dir": self.best["submission"]}

    @classmethod
    def export(cls, sections: dict[str, Any], run_dir: Path, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        from transformers import AutoModelForSequenceClassification

        task = glue.get_task(sections["data"].task)
        model = AutoModelForSequenceClassification.from_config(model_config(sections["model"], task))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{run_dir}: the checkpoint does not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
        model.save_pretrained(str(out_dir))
        load_tokenizer(sections["model"]).save_pretrained(str(out_dir))


def dev_loss(task: glue.GlueTask, logits: np.ndarray, labels: np.ndarray) -> float:
    """The training objective on the dev set: cross-entropy, or mean squared error for STS-B."""
    logits_t = torch.from_numpy(logits).double()
    if task.is_regression:
        return float(torch.nn.functional.mse_loss(logits_t[:, 0], torch.from_numpy(labels).double()))
    return float(torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(labels).long()))
