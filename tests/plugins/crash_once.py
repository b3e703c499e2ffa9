"""A test workload whose worker process dies once, mid-run, to exercise Ray Train's restart."""

from __future__ import annotations

import os

from distdl.registry import WORKLOADS
from distdl.workloads.bert_pretrain import BertPretrain

CRASH_AT_MICRO_BATCH = 7


@WORKLOADS.register("bert_pretrain_crash_once")
class BertPretrainCrashOnce(BertPretrain):
    def train_batches(self, start):
        self.micro_batch = start
        return super().train_batches(start)

    def loss(self, model, batch):
        self.micro_batch += 1
        marker = self.context.run_dir / "crashed_once"
        if self.micro_batch == CRASH_AT_MICRO_BATCH and self.context.rank == 1 and not marker.exists():
            marker.write_text("rank 1 exited at micro-batch 7\n")
            os._exit(1)  # as abrupt as a dead process: no exception, no cleanup
        return super().loss(model, batch)


@WORKLOADS.register("bert_pretrain_broken_node")
class BertPretrainBrokenNode(BertPretrain):
    """Rank 1 cannot read its data, as on a node without the shared corpus."""

    def __init__(self, sections, context):
        if context.rank == 1:
            raise FileNotFoundError("corpus shard unreadable on this node")
        super().__init__(sections, context)
