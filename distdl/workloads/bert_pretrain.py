"""BERT pretraining (Devlin et al. 2019): HF transformers model, masked LM with 15% masking at
80/10/10, and next-sentence prediction as an option (BertForPreTraining)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch

from distdl.config import Config
from distdl.data import shards, text
from distdl.errors import ConfigError
from distdl.models.checkpointing import checkpoint_transformer_layers
from distdl.registry import WORKLOADS
from distdl.workloads.base import WorkerContext, Workload, evaluate_in_lockstep, evaluation_mode, summed_over_ranks

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


def bert_config(model: BertModelSection, tokenizer: Any, max_seq_length: int) -> Any:
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
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.max_position_embeddings = max(config.max_position_embeddings, max_seq_length)
    config._attn_implementation = model.attn_implementation
    return config


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
    path_keys = ("data.path", "data.cache_dir", "tokenizer.name_or_path", "model.config_path")

    def __init__(self, sections: dict[str, Any], context: WorkerContext) -> None:
        super().__init__(sections, context)
        self.model_section: BertModelSection = sections["model"]
        self.data: text.TextDataSection = sections["data"]
        raw = text.load_raw_corpus(self.data)
        self.tokenizer = text.load_tokenizer(sections["tokenizer"], context.run_dir)
        blocks = text.tokenized_blocks(raw, self.tokenizer, self.data, context.seed)
        self.train_set = blocks["train"]
        self.eval_all = blocks["eval"]
        self.eval_shard = shards.shard_for_rank(self.eval_all, context.rank, context.world_size)

    @classmethod
    def validate(cls, config: Config) -> None:
        model, data = config.sections["model"], config.sections["data"]
        if model.config_path is None and model.preset not in PRESETS:
            raise ConfigError(f"model.preset={model.preset!r} is not allowed; allowed: {', '.join(PRESETS)}")
        if data.path is None:
            raise ConfigError("data.path is required: a text file, a folder of text files, or a hub dataset name")

    @classmethod
    def prepare(cls, config: Config) -> int:
        """Train or check the tokenizer and fill the tokenization cache once, before the workers read it."""
        data = config.sections["data"]
        raw = text.load_raw_corpus(data)
        tokenizer = text.prepare_tokenizer(raw, config.sections["tokenizer"], config.run_dir)
        blocks = text.tokenized_blocks(raw, tokenizer, data, config.run.seed)
        if len(blocks["train"]) < config.trainer.global_batch_size:
            raise ConfigError(
                f"data.path: {len(blocks['train'])} training blocks of {data.max_seq_length} tokens are fewer than "
                f"one global batch (trainer.global_batch_size={config.trainer.global_batch_size}); give more text"
            )
        return len(blocks["train"])

    def build_model(self) -> torch.nn.Module:
        model = training_class(self.data)(bert_config(self.model_section, self.tokenizer, self.data.max_seq_length))
        return checkpoint_transformer_layers(model) if self.model_section.activation_checkpointing else model

    def _collator(self, seed: Optional[int] = None) -> Any:
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.data.mlm_probability, seed=seed)

    def train_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        # Masking draws from the global torch RNG, which checkpoints save per rank.
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
