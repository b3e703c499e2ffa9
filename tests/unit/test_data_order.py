"""The training data's order (distdl.data.shards): one permutation per epoch from the seed, cut into
global batches that do not depend on how many workers share them, split across ranks and their
accumulation steps, and resumable mid-epoch. In-process: the orders are pure functions."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from distdl.data import shards
from distdl.data.shards import BatchPlan


def steps_as_seen_by_all_ranks(size: int, global_batch: int, world: int, seed: int, steps: int,
                               start_step: int = 0) -> list[list[int]]:
    """Each step's examples, read off every rank's micro-batches (rank by rank, accumulation step by step)."""
    micro = 4
    accumulation = global_batch // (micro * world)
    per_rank = []
    for rank in range(world):
        plan = BatchPlan(micro, accumulation, world, rank, seed)
        orders = shards.rank_batch_orders(size, plan, start=start_step * accumulation)
        per_rank.append(list(itertools.islice(orders, steps * accumulation)))
    return [[i for rank in range(world) for micro_batch in per_rank[rank][s * accumulation:(s + 1) * accumulation]
             for i in micro_batch] for s in range(steps)]


def test_the_sequence_of_global_batches_is_the_same_for_1_2_and_4_workers():
    # 1000 examples in global batches of 32: 31 steps an epoch; 70 steps cross two epoch boundaries.
    by_workers = {world: steps_as_seen_by_all_ranks(1000, 32, world, seed=7, steps=70) for world in (1, 2, 4)}
    assert by_workers[1] == by_workers[2] == by_workers[4]
    reference = [batch.tolist() for batch in itertools.islice(shards.global_batches(1000, 32, seed=7), 70)]
    assert by_workers[1] == reference
    # Another seed, another order.
    assert steps_as_seen_by_all_ranks(1000, 32, 2, seed=8, steps=3) != by_workers[2][:3]


def test_each_epoch_is_a_permutation_cut_into_full_batches_and_reshuffled():
    size, batch = 1000, 32
    per_epoch = size // batch  # 31 full batches; the last 8 of each permutation are left out (drop_last)
    steps = steps_as_seen_by_all_ranks(size, batch, 2, seed=0, steps=2 * per_epoch)
    for epoch in range(2):
        seen = [i for step in steps[epoch * per_epoch:(epoch + 1) * per_epoch] for i in step]
        assert len(seen) == len(set(seen)) == per_epoch * batch
        assert set(seen) <= set(range(size))
        assert seen == shards.epoch_permutation(size, 0, epoch)[: per_epoch * batch].tolist()
    assert steps[0] != steps[per_epoch]


@pytest.mark.parametrize("start_step", [1, 30, 31, 45])
def test_a_resumed_rank_continues_exactly_mid_epoch_and_across_epochs(start_step):
    full = steps_as_seen_by_all_ranks(1000, 32, 2, seed=3, steps=start_step + 10)
    resumed = steps_as_seen_by_all_ranks(1000, 32, 2, seed=3, steps=10, start_step=start_step)
    assert full[start_step:] == resumed


def test_a_resume_between_accumulation_steps_continues_exactly():
    plan = BatchPlan(micro_batch_size=4, accumulation_steps=3, world_size=2, rank=1, seed=5)
    full = list(itertools.islice(shards.rank_batch_orders(500, plan), 20))
    assert list(itertools.islice(shards.rank_batch_orders(500, plan, start=7), 13)) == full[7:]


def test_every_rank_sees_every_class_of_a_class_sorted_image_folder_in_near_equal_shares(digits_folder):
    """ImageFolder lists files class by class; each rank must still see all ten classes, about half of
    each (a contiguous block per rank gave each of 2 ranks 5 classes and never the other 5)."""
    from distdl.data import vision

    data = vision.load_vision(vision.VisionDataSection(dataset="imagefolder", path=str(digits_folder), image_size=8))
    labels = np.array(data.train.targets)
    assert (np.diff(labels) >= 0).all(), "the folder's files are sorted by class"
    world, micro = 2, 16
    steps_per_epoch = len(labels) // (world * micro)
    for rank in range(world):
        plan = BatchPlan(micro, 1, world, rank, seed=0)
        seen = [i for order in itertools.islice(shards.rank_batch_orders(len(labels), plan), steps_per_epoch)
                for i in order]
        counts, totals = Counter(labels[seen].tolist()), Counter(labels.tolist())
        shares = {label: counts[label] / totals[label] for label in totals}
        assert set(counts) == set(totals), f"rank {rank} saw classes {sorted(counts)} of {sorted(totals)}"
        assert all(0.35 < share < 0.65 for share in shares.values()), (rank, shares)
