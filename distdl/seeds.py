"""Seeds derived from the run's seed, for what draws random numbers: every micro-batch, and the
optimizers' injected noise. Each is a function of its key alone, never of the worker count."""

from __future__ import annotations


def derived_seed(*key: int) -> int:
    """A 64-bit seed mixed from `key` (numpy's SeedSequence): nearby keys give unrelated streams."""
    import numpy as np

    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The seed of what one training micro-batch draws (masks, dropout, noise): from the run's seed, the
    optimizer step and the micro-batch's place in the global batch (`index`: rank x accumulation steps +
    accumulation step). A global batch is cut into the same micro-batches on any number of workers, so
    a run draws the same numbers on any, and a run resumed on another worker count continues as it was."""
    return derived_seed(seed, step, index)
