"""Short tiny-BERT pretraining runs on 2 workers, shared by the distributed and the fault tests."""

from __future__ import annotations

from pathlib import Path

from distdl.cluster.connect import connect_ray
from distdl.config import load_config
from distdl.driver import train
from tests.helpers.shared import QUIET, TINY

QUICKSTART = TINY


def overrides(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        f"run.storage_path={tmp_path}",
        f"data.path={corpus}",
        "trainer.max_steps=16",
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=16",
        "trainer.log_every=4",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "tokenizer.vocab_size=2000",
        "data.max_seq_length=64",
        "optimizer.lr=2e-3",
        "scheduler.warmup_steps=2",
        *QUIET,
        *extra,
    ]


def run(tmp_path: Path, corpus: Path, *extra: str):
    """Train in this process (on the test module's Ray); the config and the run's summary."""
    config = load_config(QUICKSTART, overrides(tmp_path, corpus, *extra))
    return config, train(config, connect_ray)
