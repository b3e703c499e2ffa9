"""Splitting a `datasets.Dataset` across ranks and into micro-batches, the same way for every workload."""

from __future__ import annotations

from typing import Any, Iterator

from distdl.config import ConfigError


def shard_for_rank(dataset: Any, rank: int, world_size: int) -> Any:
    """A disjoint, contiguous shard per rank; together the shards cover the dataset once."""
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def as_examples(rows: dict[str, list]) -> list[dict[str, Any]]:
    """A `datasets` slice (a dict of columns) as the list of rows a collator takes."""
    return [dict(zip(rows, values)) for values in zip(*rows.values())]


def batch_orders(size: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Endless lists of `batch_size` positions in 0..size-1, a new permutation each epoch (the last
    partial batch of an epoch dropped); `start` skips that many, so a resumed run continues exactly."""
    import torch

    per_epoch = size // batch_size
    if per_epoch == 0:
        raise ConfigError(f"a rank's shard has {size} examples, fewer than trainer.micro_batch_size={batch_size}")
    index = start
    while True:
        epoch, position = divmod(index, per_epoch)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for batch_start in range(position * batch_size, per_epoch * batch_size, batch_size):
            yield order[batch_start : batch_start + batch_size].tolist()
            index += 1


def micro_batches(dataset: Any, batch_size: int, collate: Any, seed: int, start: int = 0) -> Iterator[dict]:
    """Endless collated micro-batches of a `datasets.Dataset` (see `batch_orders`)."""
    for order in batch_orders(len(dataset), batch_size, seed, start):
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
