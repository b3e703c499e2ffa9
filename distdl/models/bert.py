"""BERT pretraining models that predict the vocabulary only at the masked positions.

transformers' BertForMaskedLM and BertForPreTraining project every position onto the vocabulary,
though the loss reads only the ~15% that are masked. For BERT-base at length 128 that projection
and its softmax over 30,522 words are the largest memory-bound part of a step. These subclasses
gather the masked positions first, as NVIDIA's BERT pretraining does (masked_lm_positions). The
loss is the same (cross-entropy averaged over masked tokens, plus NSP's), and the parameters and
their names are the parents', so checkpoints export to the stock transformers classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import BertForMaskedLM, BertForPreTraining


@dataclass
class MaskedPrediction:
    loss: torch.Tensor
    mlm_logits: torch.Tensor  # [masked tokens, vocabulary]
    mlm_labels: torch.Tensor  # [masked tokens]
    seq_relationship_logits: Optional[torch.Tensor] = None


def masked_lm(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, pooled: bool,
              **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    outputs = model.bert(input_ids=input_ids, **inputs)
    masked = labels != -100
    logits = model.cls.predictions(outputs[0][masked])
    targets = labels[masked]
    # No masked token in the batch: a zero that keeps the graph (BertForMaskedLM would give NaN).
    loss = (torch.nn.functional.cross_entropy(logits.float(), targets) if len(targets)
            else logits.sum() * 0.0)
    return loss, logits, targets, outputs[1] if pooled else None


class BertForMaskedPositionsLM(BertForMaskedLM):
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **inputs: Any) -> MaskedPrediction:
        loss, logits, targets, _ = masked_lm(self, input_ids, labels, pooled=False, **inputs)
        return MaskedPrediction(loss, logits, targets)


class BertForMaskedPositionsPreTraining(BertForPreTraining):
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, next_sentence_label: torch.Tensor,
                **inputs: Any) -> MaskedPrediction:
        mlm_loss, logits, targets, pooled = masked_lm(self, input_ids, labels, pooled=True, **inputs)
        relationship = self.cls.seq_relationship(pooled)
        nsp_loss = torch.nn.functional.cross_entropy(relationship.float(), next_sentence_label.view(-1))
        return MaskedPrediction(mlm_loss + nsp_loss, logits, targets, relationship)
