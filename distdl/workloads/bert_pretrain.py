"""BERT pretraining (Devlin et al. 2019): HF transformers model, masked LM with 15% masking at
80/10/10, and next-sentence prediction as an option (BertForPreTraining)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch

from distdl.config import Config, config_from_dict
from distdl.data import prepared, shards, text
from distdl.errors import ConfigError
from distdl.models.activation_checkpointing import checkpoint_transformer_layers
from distdl.registry import WORKLOADS
from distdl.rundir import saved_config
from distdl.workloads import warm_start
from distdl.workloads.base import (
    ExampleStep,
    WorkerContext,
    Workload,
    evaluate_in_lockstep,
    evaluation_mode,
    summed_over_ranks,
)

POSITIONS = "bert.embeddings.position_embeddings.weight"
# What one BERT class has and another lacks (the NSP head and the pooler that feeds it): absent in
# init_from, they keep their fresh initialization.
OPTIONAL_HEADS = ("cls.seq_relationship.", "bert.pooler.")
# Tied to the word embeddings, so a checkpoint may store them once.
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
ARCHITECTURE = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                "type_vocab_size")
# What a carried optimizer state was partitioned and shaped by.
OPTIMIZER_STATE_KEYS = ("optimizer.name", "engine.zero_stage", "engine.precision", "engine.offload_optimizer",
                        "scaling.num_workers")

# (layers, hidden, heads) of Google's BERT checkpoints (Turc et al. 2019 for the small ones).
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


@dataclass
class BertModelSection:
    # One of PRESETS, or None when config_path is given.
    preset: Optional[str] = "tiny"
    # An HF config.json or a folder holding one (vocab size still comes from the tokenizer).
    config_path: Optional[str] = None
    # HF attention backend: sdpa (PyTorch scaled-dot-product attention) or eager.
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Recompute each encoder layer's activations in the backward pass: less memory, about a third
    # more compute; the same loss and gradients. A resume may turn it on or off.
    activation_checkpointing: bool = False
    # Start from earlier weights (two-phase pretraining): a distdl bert_pretrain run directory, one of
    # its checkpoint_* folders, or an exported HF model folder. The shapes must match the preset's.
    init_from: Optional[str] = None
    # Which checkpoint of an init_from run directory: latest, or best (for runs that rank checkpoints).
    init_checkpoint: Literal["latest", "best"] = "latest"
    # Also carry the init_from run's optimizer state (moments and their step counts) over, as NVIDIA's
    # phase 2 does; its hyperparameters and LR schedule stay this config's. Needs a run saved with the
    # same optimizer, ZeRO stage, precision, offload and number of workers.
    init_optimizer: bool = False
    # When data.max_seq_length needs more position embeddings than init_from has: false refuses;
    # true extends them by copying the learned ones (as Longformer does).
    extend_positions: bool = False


def bert_config(model: BertModelSection, tokenizer: Any, max_seq_length: int) -> Any:
    return sized_bert_config(model, len(tokenizer), tokenizer.pad_token_id, max_seq_length)


def sized_bert_config(model: BertModelSection, vocab_size: int, pad_token_id: Optional[int], max_seq_length: int) -> Any:
    from transformers import BertConfig

    if model.config_path:
        path = Path(model.config_path).expanduser()
        if not path.exists():
            raise ConfigError(f"model.config_path: {path} does not exist")
        config = BertConfig.from_pretrained(str(path))
    else:
        layers, hidden, heads = PRESETS[model.preset]
        config = BertConfig(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden
        )
    config.vocab_size = vocab_size
    config.pad_token_id = pad_token_id
    config.max_position_embeddings = max(config.max_position_embeddings, max_seq_length)
    config._attn_implementation = model.attn_implementation
    return config


def fresh_bert(model: BertModelSection, data: text.TextDataSection, vocab_size: int,
               pad_token_id: Optional[int]) -> torch.nn.Module:
    """The model the config trains, freshly initialized (activation checkpointing on where configured)."""
    bert = training_class(data)(sized_bert_config(model, vocab_size, pad_token_id, data.max_seq_length))
    return checkpoint_transformer_layers(bert) if model.activation_checkpointing else bert


def source_run_config(source: warm_start.WarmStart) -> Config:
    """The config of the bert_pretrain run init_from names."""
    return config_from_dict(saved_config(source.run_dir, "bert_pretrain", key=warm_start.KEY))


def adopt_tokenizer(source: warm_start.WarmStart, run_dir: Path) -> None:
    """With no tokenizer.name_or_path, a run that starts from init_from uses that model's tokenizer
    (saved into the run like a trained one): another vocabulary would not fit its embeddings."""
    from transformers import AutoTokenizer

    if (run_dir / text.TOKENIZER_DIRNAME / "tokenizer.json").is_file():
        return
    if source.is_run:
        saved = source_run_config(source)
        tokenizer = text.load_tokenizer(saved.sections["tokenizer"], source.run_dir)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.path))
        except Exception as err:
            raise ConfigError(f"{warm_start.KEY}: {source.path} has no tokenizer to start from ({err}); "
                              "set tokenizer.name_or_path to the one it was trained with") from err
    tokenizer.save_pretrained(str(run_dir / text.TOKENIZER_DIRNAME))


def source_architecture(source: warm_start.WarmStart) -> Any:
    """The BertConfig init_from's weights were made with."""
    from transformers import BertConfig

    if not source.is_run:
        try:
            config = BertConfig.from_pretrained(str(source.path))
        except Exception as err:
            raise ConfigError(f"{warm_start.KEY}: {source.path}/config.json is not a BERT config: {err}") from err
        if config.model_type != "bert":
            raise ConfigError(f"{warm_start.KEY}: {source.path} holds a {config.model_type!r} model, not a BERT")
        return config
    saved = source_run_config(source)
    tokenizer = text.load_tokenizer(saved.sections["tokenizer"], source.run_dir)
    return bert_config(saved.sections["model"], tokenizer, saved.sections["data"].max_seq_length)


def check_warm_start(source: warm_start.WarmStart, config: Config, target: Any) -> None:
    """Before any worker starts: init_from's model has this run's shapes (its positions fitted as
    model.extend_positions allows), and a carried optimizer state was saved under these settings."""
    theirs = source_architecture(source)
    different = [f"{key} {getattr(theirs, key)} (here {getattr(target, key)})" for key in ARCHITECTURE
                 if getattr(theirs, key) != getattr(target, key)]
    if different:
        hint = (" (the vocabulary is the tokenizer's: leave tokenizer.name_or_path unset to use init_from's)"
                if theirs.vocab_size != target.vocab_size else "")
        raise ConfigError(f"{warm_start.KEY}: {source.describe()} is another shape than model.preset/"
                          f"model.config_path make: {', '.join(different)}{hint}")
    model, positions = config.sections["model"], target.max_position_embeddings
    if positions > theirs.max_position_embeddings and not model.extend_positions:
        raise ConfigError(
            f"{warm_start.KEY}: {source.describe()} has {theirs.max_position_embeddings} position embeddings and "
            f"data.max_seq_length={config.sections['data'].max_seq_length} needs {positions}; set "
            "model.extend_positions: true to extend them by copying the learned ones, or shorten the sequences")
    if model.init_optimizer:
        check_optimizer_source(source, config, positions == theirs.max_position_embeddings)


def check_optimizer_source(source: warm_start.WarmStart, config: Config, same_positions: bool) -> None:
    if not source.is_run:
        raise ConfigError(f"model.init_optimizer: {source.path} is an HF model folder, which holds no optimizer "
                          "state; point model.init_from at the distdl run that trained it, or set init_optimizer: false")
    saved = source_run_config(source)
    different = warm_start.differences(saved, config, OPTIMIZER_STATE_KEYS)
    if saved.sections["data"].next_sentence_prediction != config.sections["data"].next_sentence_prediction:
        different.append("data.next_sentence_prediction (the NSP head's parameters)")
    if not same_positions:
        different.append("the number of position embeddings")
    if different:
        raise ConfigError(f"model.init_optimizer: the optimizer state of {source.describe()} does not fit this "
                          f"run, which differs in {'; '.join(different)}. DeepSpeed's optimizer states are "
                          "partitioned by these; set model.init_optimizer: false to start the optimizer afresh")


def adopt_prepared_tokenizer(root: Path, run_dir: Path) -> None:
    """With no tokenizer.name_or_path, a run that trains on prepared shards uses the tokenizer they were
    made with (saved into the run like a trained one, so export finds it)."""
    import shutil

    target, theirs = run_dir / text.TOKENIZER_DIRNAME, root / text.TOKENIZER_DIRNAME
    if (target / "tokenizer.json").is_file():
        return  # the run's own, from its start: checked against the manifest like any other
    if not (theirs / "tokenizer.json").is_file():
        raise ConfigError(f"data.prepared_path: {theirs} holds no tokenizer.json; set tokenizer.name_or_path to the "
                          "tokenizer the shards were made with")
    # Copied as new files (not with their times): a run on object storage pushes what was written since it began.
    shutil.copytree(theirs, target, dirs_exist_ok=True, copy_function=shutil.copy)


def count_prepared_training_examples(data: text.TextDataSection, tokenizer: Any, seed: int) -> int:
    """Check the prepared shards against this config and the files themselves (on the driver, before
    any worker starts); the number of training examples they give."""
    import math

    storage = prepared.prepared_storage(data)
    manifest = prepared.read_manifest(storage.local)
    expected = {"source": text.source_fingerprint(data), "settings": prepared.settings(data, tokenizer, seed)}
    different = prepared.differences(manifest, expected)
    if different:
        raise ConfigError(f"data.prepared_path: the shards in {storage} were not made from this config's corpus and "
                          f"settings: {'; '.join(different)}. Prepare again into another folder, or fix the config")
    prepared.check_shards(storage.local, manifest["shards"], storage=storage if storage.remote else None)
    examples = manifest["counts"]["examples"]
    if examples < 2:
        raise ConfigError(f"data.prepared_path: {storage} holds only {examples} example(s); prepare more text")
    return examples - math.ceil(data.eval_fraction * examples)  # datasets' train_test_split sizes


def model_class(data: text.TextDataSection) -> type:
    """The stock transformers class that `distdl export` writes."""
    from transformers import BertForMaskedLM, BertForPreTraining

    return BertForPreTraining if data.next_sentence_prediction else BertForMaskedLM


def training_class(data: text.TextDataSection) -> type:
    """The same model and parameter names, with the vocabulary predicted at masked positions only."""
    from distdl.models.bert import BertForMaskedPositionsLM, BertForMaskedPositionsPreTraining

    return BertForMaskedPositionsPreTraining if data.next_sentence_prediction else BertForMaskedPositionsLM


@WORKLOADS.register("bert_pretrain")
class BertPretrain(Workload):
    sections = {"model": BertModelSection, "data": text.TextDataSection, "tokenizer": text.TokenizerSection}
    path_keys = ("data.path", "data.cache_dir", "data.prepared_path", "tokenizer.name_or_path", "model.config_path",
                 "model.init_from")

    def __init__(self, sections: dict[str, Any], context: WorkerContext) -> None:
        super().__init__(sections, context)
        self.model_section: BertModelSection = sections["model"]
        self.data: text.TextDataSection = sections["data"]
        # Located once per worker: the model and the optimizer state both start from it.
        model = self.model_section
        self.warm_start = warm_start.locate(model.init_from, model.init_checkpoint) if model.init_from else None
        self.tokenizer = text.load_tokenizer(sections["tokenizer"], context.run_dir)
        if self.data.prepared_path:
            storage = prepared.prepared_storage(self.data)
            root = prepared.pull_records(storage)
            manifest = prepared.read_manifest(root)
            prepared.fetch_shards(storage, manifest["shards"])
            blocks = text.split_train_eval(prepared.load_rows(root, manifest["shards"]), self.data, context.seed,
                                           prepared.split_indices_cache(manifest, self.data, context.seed))
        else:
            blocks = text.tokenized_blocks(text.load_raw_corpus(self.data), self.tokenizer, self.data, context.seed)
        self.train_set = blocks["train"]
        self.eval_all = blocks["eval"]
        self.eval_shard = shards.shard_for_rank(self.eval_all, context.rank, context.world_size)

    @classmethod
    def validate(cls, config: Config) -> None:
        model, data = config.sections["model"], config.sections["data"]
        if model.config_path is None and model.preset not in PRESETS:
            raise ConfigError(f"model.preset={model.preset!r} is not allowed; allowed: {', '.join(PRESETS)}")
        if data.path is None and data.prepared_path is None:
            raise ConfigError("data.path is required (a text file, a folder of text files, or a hub dataset name), "
                              "or data.prepared_path (shards from distdl prepare)")
        if model.init_optimizer and model.init_from is None:
            raise ConfigError("model.init_optimizer: true needs model.init_from, the run whose optimizer state to take")

    @classmethod
    def prepare(cls, config: Config) -> int:
        """Train or check the tokenizer and fill the tokenization cache once, before the workers read it."""
        data, model = config.sections["data"], config.sections["model"]
        raw = None if data.prepared_path else text.load_raw_corpus(data)
        source = warm_start.locate(model.init_from, model.init_checkpoint) if model.init_from else None
        if source is not None and config.sections["tokenizer"].name_or_path is None:
            adopt_tokenizer(source, config.run_dir)
        if data.prepared_path:
            prepared.pull_records(prepared.prepared_storage(data))  # the manifest and the tokenizer, from object storage
        if data.prepared_path and config.sections["tokenizer"].name_or_path is None:
            adopt_prepared_tokenizer(prepared.prepared_root(data), config.run_dir)
        tokenizer = text.prepare_tokenizer(raw, config.sections["tokenizer"], config.run_dir)
        if source is not None:
            check_warm_start(source, config, bert_config(model, tokenizer, data.max_seq_length))
        if data.prepared_path:
            train_count = count_prepared_training_examples(data, tokenizer, config.run.seed)
        else:
            train_count = len(text.tokenized_blocks(raw, tokenizer, data, config.run.seed)["train"])
        if train_count < config.trainer.global_batch_size:
            key = "data.prepared_path" if data.prepared_path else "data.path"
            raise ConfigError(
                f"{key}: {train_count} training blocks of {data.max_seq_length} tokens are fewer than "
                f"one global batch (trainer.global_batch_size={config.trainer.global_batch_size}); give more text"
            )
        return train_count

    @classmethod
    def example_step(cls, config: Config) -> ExampleStep:
        """A block of data.max_seq_length random tokens, data.mlm_probability of them masked; the
        vocabulary of tokenizer.name_or_path, or of tokenizer.vocab_size where a tokenizer is trained."""
        model, data, section = config.sections["model"], config.sections["data"], config.sections["tokenizer"]
        tokenizer = text.load_tokenizer(section, config.run_dir) if section.name_or_path else None
        vocab_size = len(tokenizer) if tokenizer is not None else section.vocab_size
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None else None
        bert = fresh_bert(model, data, vocab_size, pad_token_id)
        seq = data.max_seq_length
        labels = torch.full((1, seq), -100)
        masked = torch.randperm(seq)[:max(1, round(data.mlm_probability * seq))]
        batch = {"input_ids": torch.randint(vocab_size, (1, seq)), "attention_mask": torch.ones(1, seq, dtype=torch.long),
                 "token_type_ids": torch.zeros(1, seq, dtype=torch.long), "labels": labels.index_fill(1, masked, 0)}
        if data.next_sentence_prediction:
            batch["next_sentence_label"] = torch.zeros(1, dtype=torch.long)
        caveat = None if tokenizer is not None else (f"the vocabulary taken as tokenizer.vocab_size={vocab_size}, "
                                                     "the size the tokenizer is trained to")
        return ExampleStep({"model": bert}, lambda: bert(**batch).loss, caveat=caveat)

    @classmethod
    def evaluation_metrics(cls, sections: dict[str, Any]) -> list[str]:
        return ["eval_loss", "eval_mlm_accuracy", "eval_masked_tokens",
                *(["eval_nsp_accuracy"] if sections["data"].next_sentence_prediction else [])]

    def build_model(self) -> torch.nn.Module:
        model = fresh_bert(self.model_section, self.data, len(self.tokenizer), self.tokenizer.pad_token_id)
        if self.model_section.init_from:
            self._load_initial_weights(model)
        return model

    def _load_initial_weights(self, model: torch.nn.Module) -> None:
        source = self.warm_start
        state = warm_start.source_weights(source, model_class(self.data))
        fitted = warm_start.fit_positions(state, POSITIONS, model.config.max_position_embeddings)
        skipped = warm_start.load_into(model, state, source, OPTIONAL_HEADS, TIED)
        if self.context.rank == 0:
            notes = [note for note in (fitted, skipped and f"initialized {', '.join(skipped)} afresh") if note]
            print(f"distdl: model weights from {source.describe()}" + "".join(f"; {note}" for note in notes))

    def optimizer_warm_start(self) -> Optional[Path]:
        return self.warm_start.checkpoint if self.model_section.init_optimizer else None

    def _collator(self, seed: Optional[int] = None) -> Any:
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.data.mlm_probability, seed=seed)

    def train_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        # Masking draws from the global torch RNG, which the loop seeds for each training micro-batch.
        return shards.micro_batches(self.train_set, self.context.batch_plan(), self._collator(), start)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**batch)
        correct = (out.mlm_logits.argmax(-1) == out.mlm_labels).sum()
        # Tensors, not floats: no device sync per micro-batch.
        metrics = {"mlm_accuracy": correct / max(len(out.mlm_labels), 1)}
        if "next_sentence_label" in batch:
            nsp_correct = out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]
            metrics["nsp_accuracy"] = nsp_correct.float().mean()
        return out.loss, metrics

    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        """MLM loss and accuracy (and NSP accuracy) over the whole held-out slice, the same masks every time."""
        collate = self._collator(seed=self.context.seed + 7919 * self.context.rank)
        device = self.context.device

        def totals(rows: dict[str, list]) -> torch.Tensor:
            """MLM loss sum, MLM correct, masked tokens, NSP correct, pairs."""
            batch = {k: v.to(device) for k, v in collate(shards.as_examples(rows)).items()}
            out = model(**batch)
            logits, labels = out.mlm_logits.float(), out.mlm_labels
            values = [torch.nn.functional.cross_entropy(logits, labels, reduction="sum"),
                      (logits.argmax(-1) == labels).sum(), len(labels), 0, 0]
            if "next_sentence_label" in batch:
                pair_labels = batch["next_sentence_label"]
                values[3:] = [(out.seq_relationship_logits.argmax(-1) == pair_labels).sum(), len(pair_labels)]
            return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])

        with evaluation_mode(model):
            parts = evaluate_in_lockstep(self.context, self.eval_shard, self.eval_all, totals)
        loss_sum, correct, masked_count, nsp_correct, pairs = summed_over_ranks(parts, 5, device)
        count = max(masked_count, 1.0)
        metrics = {"eval_loss": loss_sum / count, "eval_mlm_accuracy": correct / count,
                   "eval_masked_tokens": int(masked_count)}
        if pairs > 0:
            metrics["eval_nsp_accuracy"] = nsp_correct / pairs
        return metrics

    @classmethod
    def export(cls, sections: dict[str, Any], run_dir: Path, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        tokenizer = text.load_tokenizer(sections["tokenizer"], run_dir)
        config = bert_config(sections["model"], tokenizer, sections["data"].max_seq_length)
        model = model_class(sections["data"])(config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        # The MLM decoder is tied to the word embeddings, so its weight may be stored once.
        missing = [k for k in missing if k != "cls.predictions.decoder.weight"]
        if missing or unexpected:
            raise ConfigError(f"{run_dir}: the checkpoint does not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
