"""`model.init_from`: a model's starting weights from an earlier distdl run (one of its checkpoints)
or from an exported Hugging Face folder, as BERT's second pretraining phase starts from its first.

Only the weights come over by default; the optimizer's state joins them when the model section says
so (`Engine.warm_start_optimizer`). Position embeddings are fitted to the new run's length here.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Optional

import torch

from distdl.engine.checkpoints import TrainedState, is_run_location, trained_state
from distdl.errors import ConfigError
from distdl.rundir import is_uri

KEY = "model.init_from"


@dataclass(frozen=True)
class WarmStart:
    """Where the starting weights are: a run's checkpoint, or an HF model folder."""

    path: Path  # the run directory (its local copy), or the HF folder
    trained: Optional[TrainedState] = None

    @property
    def is_run(self) -> bool:
        return self.trained is not None

    @property
    def run_dir(self) -> Optional[Path]:
        return self.trained.run_dir if self.trained else None

    @property
    def checkpoint(self) -> Optional[Path]:
        return self.trained.checkpoint if self.trained else None

    def describe(self) -> str:
        return self.trained.describe() if self.trained else f"HF model folder {self.path}"


def locate(init_from: str, which: str) -> WarmStart:
    """A run directory (its `which` checkpoint: latest or best), one of its checkpoint_* folders, or an
    HF model folder (a config.json beside the weights); anything else is refused, naming the key.
    A run directory may be on object storage (s3://...)."""
    if is_uri(init_from):
        return _from_run(init_from, which)
    path = Path(init_from).expanduser()
    if not path.exists():
        raise ConfigError(f"{KEY}: {path} does not exist; give a distdl run directory, one of its "
                          "checkpoint_* folders, or an exported HF model folder")
    if is_run_location(path):
        return _from_run(path, which)
    if (path / "config.json").is_file():
        return WarmStart(path)
    raise ConfigError(f"{KEY}: {path} is neither a distdl run directory (no config.yaml), nor a checkpoint_* "
                      "folder of one, nor an HF model folder (no config.json)")


def _from_run(run: str | Path, which: str) -> WarmStart:
    """A run's checkpoint, in this node's file system (downloaded once per node from object storage)."""
    trained = trained_state(run, which, key=KEY)
    trained.checkpoint  # found (and on object storage downloaded) now, before any worker starts
    return WarmStart(trained.run_dir, trained)


def source_weights(source: WarmStart, model_class: type) -> dict[str, torch.Tensor]:
    """fp32 weights, named as in `model_class`; the ones an HF folder lacks (a head its class does not
    have) are left out, so the new model keeps its own initialization there."""
    if source.trained is not None:
        return source.trained.weights()
    try:
        model, info = model_class.from_pretrained(str(source.path), output_loading_info=True, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for unreadable or foreign folders
        raise ConfigError(f"{KEY}: the weights in {source.path} could not be loaded: {err}") from err
    absent = set(info["missing_keys"])
    return {name: tensor for name, tensor in model.state_dict().items() if name not in absent}


def fit_positions(state: dict[str, torch.Tensor], key: str, positions: int) -> Optional[str]:
    """Cut or tile the learned position embeddings `state[key]` to `positions` rows; what was done.

    Tiling copies the learned rows over the new ones, as Beltagy et al. (2020, Longformer) extend
    BERT-like models: each new position starts from a learned one rather than from noise."""
    learned = state.get(key)
    if learned is None or learned.shape[0] == positions:
        return None
    have = learned.shape[0]
    if have > positions:
        state[key] = learned[:positions].clone()
        return f"kept the first {positions} of its {have} position embeddings"
    repeats = -(-positions // have)
    state[key] = learned.repeat(repeats, 1)[:positions].clone()
    return f"extended its {have} position embeddings to {positions} by copying them"


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: WarmStart,
              optional_prefixes: tuple[str, ...], tied: tuple[str, ...]) -> list[str]:
    """Load `state` into `model`; a weight the model has and the source lacks (or the reverse) is an
    error unless it belongs to a head named in `optional_prefixes`. Returns the skipped names."""
    own = model.state_dict()
    wrong_shape = [f"{name} {tuple(tensor.shape)} (model: {tuple(own[name].shape)})"
                   for name, tensor in state.items() if name in own and own[name].shape != tensor.shape]
    if wrong_shape:
        raise ConfigError(f"{KEY}: {source.describe()} does not fit this model: {', '.join(wrong_shape[:3])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name not in tied]
    essential = [name for name in missing + unexpected if not name.startswith(optional_prefixes)]
    if essential:
        raise ConfigError(f"{KEY}: {source.describe()} does not match this model (weights it lacks or that "
                          f"the model lacks: {essential[:5]})")
    return sorted(missing + unexpected)


def differences(source: Any, target: Any, keys: tuple[str, ...]) -> list[str]:
    """The dotted attribute `keys` whose values differ between two configs, as `key: a there, b here`."""
    return [f"{key}: {attrgetter(key)(source)!r} there, {attrgetter(key)(target)!r} here"
            for key in keys if attrgetter(key)(source) != attrgetter(key)(target)]
