"""Hostile checkpoints: a pickle payload planted in a torch file, which creates a sentinel file when it
is unpickled in full. A test that plants one asserts that loading is refused and the sentinel never
appears; `test_a_planted_payload_runs_when_unpickled_in_full` shows that it would."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch


class Payload:
    """Unpickling it runs a shell command, as a hostile checkpoint's object would."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = Path(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.sentinel))}",)


def plant(file: Path, sentinel: Path) -> Path:
    """Add a payload to a torch file distdl or DeepSpeed wrote (a dict of states) in place; the file."""
    saved = torch.load(file, map_location="cpu", weights_only=False)  # the test's own, clean file
    assert isinstance(saved, dict), f"{file} holds a {type(saved).__name__}"
    saved["planted"] = Payload(sentinel)
    torch.save(saved, file)
    return file


# Where each kind of file lies in a checkpoint folder of one engine.
KINDS = {
    "model states": "global_step*/mp_rank_00_model_states.pt",
    "optimizer states": "global_step*/*zero_pp_rank_*_optim_states.pt",
    "random state": "rng_state_rank*.pt",
    "universal checkpoint": "global_step*_universal/zero/*/fp32.pt",
}


def plant_kind(checkpoint: Path, kind: str, sentinel: Path) -> list[Path]:
    """Plant a payload in every file of `kind` in a checkpoint folder; those files."""
    files = sorted(checkpoint.glob(KINDS[kind]))
    assert files, f"{checkpoint} has no {kind} ({KINDS[kind]})"
    return [plant(file, sentinel) for file in files]
