"""A finished `resnet` run's classifier, for what measures images with it (the GAN's Frechet
distance in its features): rebuilt from the run's own `classifier.json`, which the resnet workload
keeps in its run directory (the architecture, its options, the classes and the input normalization),
with the weights of the run's latest checkpoint. Nothing of its data set is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distdl.config import config_from_dict
from distdl.data import vision
from distdl.engine.checkpoints import TrainedState, trained_state
from distdl.errors import ConfigError
from distdl.models import classifiers

# What `distdl export` writes beside the weights (model.json), kept in the run directory when the run starts.
CLASSIFIER_FILE = "classifier.json"


@dataclass
class TrainedClassifier:
    model: torch.nn.Module  # fp32, on the CPU, in eval mode
    mean: tuple[float, ...]  # the normalization of its training images, per channel
    std: tuple[float, ...]


def trained_classifier(run: str | Path, key: str) -> TrainedClassifier:
    """The classifier of a `resnet` run (its latest checkpoint); errors name `key`, the config key that
    named the run."""
    trained = trained_state(run, key=key)
    spec_file = trained.run_dir / CLASSIFIER_FILE
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text())
        model = classifiers.from_spec(spec)
        preprocessing = spec["preprocessing"]
        mean, std = tuple(preprocessing["mean"]), tuple(preprocessing["std"])
    else:
        model, mean, std = _from_saved_config(trained)
    missing, unexpected = model.load_state_dict(trained.weights(), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{key}: the checkpoint of {trained.storage} does not match its classifier "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return TrainedClassifier(model.eval(), mean, std)


def _from_saved_config(trained: TrainedState) -> tuple[torch.nn.Module, tuple[float, ...], tuple[float, ...]]:
    """A run from before classifier.json was kept: the classifier and its normalization from the run's
    config, with its data set loaded for the image size and classes."""
    config = config_from_dict(trained.config("resnet"))
    section, data_section = config.sections["model"], config.sections["data"]
    data = vision.load_vision(data_section)
    options = {key: getattr(section, key) for key in classifiers.OPTIONS[section.name]}
    model = classifiers.build_classifier(section.name, data.channels, data.image_size, data.classes, **options)
    spec = vision.spec_for(data_section)
    return model, tuple(spec.mean), tuple(spec.std)
