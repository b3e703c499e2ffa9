"""A `resnet` run's classifier as its run directory describes it: `classifier.json`, which the resnet
workload writes when the run starts (the architecture and its options, the classes, the input size
and normalization: what `distdl export` writes as model.json), and the classifier of a finished run
rebuilt from it with the weights of its latest checkpoint, for what measures images with it (the
GAN's Frechet distance in its features). Nothing of the data set is read where the file is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distdl.config import config_from_dict
from distdl.data import vision
from distdl.engine.checkpoints import trained_state
from distdl.errors import ConfigError
from distdl.models import classifiers

CLASSIFIER_FILE = "classifier.json"


def classifier_options(model: Any) -> dict[str, Any]:
    """The options of the resnet workload's model section that the architectures take (each takes its own)."""
    return {"zero_init_residual": model.zero_init_residual, "width_multiplier": model.width_multiplier,
            "hidden_sizes": model.hidden_sizes, "batch_norm": model.batch_norm, "width": model.width,
            "train_output_layer": model.train_output_layer}


def spec_of(sections: dict[str, Any], data: vision.VisionData) -> dict[str, Any]:
    """What classifier.json holds for a resnet config and its loaded data set."""
    spec = vision.spec_for(sections["data"])
    return classifiers.export_spec(sections["model"].name, classifier_options(sections["model"]), data.channels,
                                   data.image_size, data.names(), spec.mean, spec.std,
                                   vision.eval_resize(sections["data"], data.image_size))


def saved_spec(run_dir: Path, sections: dict[str, Any]) -> dict[str, Any]:
    """A run's classifier.json; for a run from before it was kept, the same rebuilt from the run's
    config (`sections`) and its data set, loaded for the image size and classes."""
    saved = Path(run_dir) / CLASSIFIER_FILE
    if saved.is_file():
        return json.loads(saved.read_text())
    return spec_of(sections, vision.load_vision(sections["data"]))


@dataclass
class TrainedClassifier:
    model: torch.nn.Module  # fp32, on the CPU, in eval mode
    mean: tuple[float, ...]  # the normalization of its training images, per channel
    std: tuple[float, ...]


def trained_classifier(run: str | Path, key: str) -> TrainedClassifier:
    """The classifier of a `resnet` run (its latest checkpoint); errors name `key`, the config key that
    named the run."""
    trained = trained_state(run, key=key)
    spec = saved_spec(trained.run_dir, config_from_dict(trained.config("resnet")).sections)
    model = classifiers.from_spec(spec)
    missing, unexpected = model.load_state_dict(trained.weights(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{key}: the checkpoint of {trained.storage} does not match its classifier "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    preprocessing = spec["preprocessing"]
    return TrainedClassifier(model.eval(), tuple(preprocessing["mean"]), tuple(preprocessing["std"]))
