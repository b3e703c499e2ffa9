"""The training data's order and its split across ranks and micro-batches, the same for every workload;
and the evaluation sets' disjoint per-rank shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from distdl.errors import ConfigError


def shard_for_rank(dataset: Any, rank: int, world_size: int) -> Any:
    """A disjoint, contiguous shard per rank; together the shards cover the dataset once (evaluation).

    With fewer examples than ranks (a tiny held-out set), rank r < len holds example r and the
    others hold none, as datasets' own split would, which raises IndexError for the empty shards.
    """
    from datasets.distributed import split_dataset_by_node

    if len(dataset) < world_size:
        return dataset.select([rank] if rank < len(dataset) else [])
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def as_examples(rows: dict[str, list]) -> list[dict[str, Any]]:
    """A `datasets` slice (a dict of columns) as the list of rows a collator takes."""
    return [dict(zip(rows, values)) for values in zip(*rows.values())]


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch of an optimizer step is made and split: `world_size` ranks, each running
    `accumulation_steps` micro-batches of `micro_batch_size`, with data order seeded by `seed`."""

    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    rank: int
    seed: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.world_size


def epoch_permutation(size: int, seed: int, epoch: int) -> Any:
    """The epoch's order of the whole training set: from (seed, epoch) alone, as DistributedSampler's."""
    import numpy as np

    return np.random.default_rng((seed, epoch)).permutation(size)


def global_batches(size: int, global_batch_size: int, seed: int, start: int = 0) -> Iterator[Any]:
    """Endless global batches (arrays of positions in 0..size-1), from global batch `start` on.

    Each epoch is one permutation of the whole set cut into global batches; the last
    size % global_batch_size positions of each epoch's permutation are left out (torch's
    `drop_last=True`), so every step has the full batch; the next epoch reshuffles, so no example is
    left out for good. The sequence depends on the seed and the global batch size only, never on
    how many workers split it.
    """
    per_epoch = size // global_batch_size
    if per_epoch == 0:
        raise ConfigError(f"the training set has {size} examples, fewer than one global batch of "
                          f"{global_batch_size} (trainer.global_batch_size)")
    epoch, position = divmod(start, per_epoch)
    while True:
        order = epoch_permutation(size, seed, epoch)
        for batch in range(position, per_epoch):
            yield order[batch * global_batch_size : (batch + 1) * global_batch_size]
        epoch, position = epoch + 1, 0


def rank_batch_orders(size: int, plan: BatchPlan, start: int = 0) -> Iterator[list[int]]:
    """This rank's micro-batches (lists of positions), beginning after its first `start` ones.

    Each global batch is cut into one contiguous part per rank, in rank order, and each part into the
    rank's accumulation steps; together the ranks' micro-batches of a step are the global batch.
    """
    step, micro = divmod(start, plan.accumulation_steps)
    per_rank = plan.micro_batch_size * plan.accumulation_steps
    for batch in global_batches(size, plan.global_batch_size, plan.seed, step):
        mine = batch[plan.rank * per_rank : (plan.rank + 1) * per_rank]
        for accumulation_step in range(micro, plan.accumulation_steps):
            begin = accumulation_step * plan.micro_batch_size
            yield mine[begin : begin + plan.micro_batch_size].tolist()
        micro = 0


def micro_batches(dataset: Any, plan: BatchPlan, collate: Any, start: int = 0) -> Iterator[dict]:
    """Endless collated micro-batches of this rank from a whole `datasets.Dataset` (see `rank_batch_orders`)."""
    for order in rank_batch_orders(len(dataset), plan, start):
        yield collate(as_examples(dataset[order]))


def lockstep_slices(shard: Any, everything: Any, batch_size: int, world_size: int) -> Iterator[tuple[dict, bool]]:
    """This rank's shard in slices of `batch_size`, as many on every rank, and whether to count each.

    ZeRO-3 gathers parameters collectively in every forward pass, so all ranks must run the same
    number; a rank whose shard is used up gets a filler slice whose results it must not count.
    """
    largest_shard = -(-len(everything) // world_size)
    for begin in range(0, max(largest_shard, 1), batch_size):
        counted = begin < len(shard)
        yield (shard[begin : begin + batch_size] if counted else everything[:batch_size]), counted
