"""Image classification with ResNets (He et al. 2016), with the large-batch recipe of Goyal et al. 2017
as options: linear learning-rate scaling (optimizer.reference_batch_size), gradual warmup
(scheduler.warmup_*), SGD with momentum and weight decay, label smoothing and SyncBatchNorm.
It also trains the studies' fully connected networks (`mlp`, `two_layer_relu`), with cross-entropy
or the squared error on one-hot targets that the over-parametrization theory assumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import torch
import torch.nn.functional as F
from annotated_types import Interval

from distdl.config import AtLeastOne, Config
from distdl.data import vision
from distdl.errors import ConfigError
from distdl.models import classifiers
from distdl.models.activation_checkpointing import checkpoint_residual_stages, compile_refused
from distdl.models.classifiers import CLASSIFIER_NAMES as MODEL_NAMES
from distdl.models.resnet import MODEL_NAMES as RESNET_NAMES
from distdl.registry import WORKLOADS
from distdl.workloads.base import (
    ExampleStep,
    WorkerContext,
    Workload,
    evaluate_in_lockstep,
    evaluation_mode,
    summed_over_ranks,
)
from distdl.workloads.classifier_run import CLASSIFIER_FILE, classifier_options, saved_spec, spec_of

LOSSES = ("cross_entropy", "mse")


@dataclass
class ResNetModelSection:
    # torchvision's resnet18/34/50/101/152, wide_resnet50_2/101_2, cifar_resnet20/32/44/56/110,
    # mlp or two_layer_relu.
    name: str = "cifar_resnet20"
    # Batch-norm statistics over all workers' batches (GPUs only; PyTorch has no CPU SyncBatchNorm).
    sync_batchnorm: bool = False
    # torchvision ResNets: start each residual branch's last BN at zero (Goyal et al. 2017, section 5.1).
    zero_init_residual: bool = False
    # cifar_resnet*: channels 16k/32k/64k for width multiplier k.
    width_multiplier: AtLeastOne = 1
    # mlp: hidden layer sizes, and batch norm after each hidden linear layer.
    hidden_sizes: list[AtLeastOne] = field(default_factory=lambda: [512, 512, 512])
    batch_norm: bool = True
    # two_layer_relu: hidden units m, and whether the +-1 output layer trains (Du et al. fix it).
    width: AtLeastOne = 1024
    train_output_layer: bool = False
    # ResNets: recompute each residual block's activations in the backward pass (less memory, one more
    # forward; the same loss, gradients and batch-norm statistics). A resume may turn it on or off.
    activation_checkpointing: bool = False


@dataclass
class LossSection:
    # cross_entropy, or mse: the squared error against one-hot targets (summed over classes).
    name: str = "cross_entropy"
    # Szegedy et al. 2016; 0.1 in the common ImageNet recipes.
    label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.0


def build_classifier(section: ResNetModelSection, channels: int, image_size: int, classes: int) -> torch.nn.Module:
    return classifiers.build_classifier(section.name, channels, image_size, classes, **classifier_options(section))


def fresh_classifier(section: ResNetModelSection, channels: int, image_size: int, classes: int) -> torch.nn.Module:
    """The classifier the config trains, freshly initialized (its residual stages checkpointed where configured)."""
    model = build_classifier(section, channels, image_size, classes)
    return checkpoint_residual_stages(model) if section.activation_checkpointing else model


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, loss: LossSection,
                        reduction: str = "mean") -> torch.Tensor:
    if loss.name == "mse":
        targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        per_example = ((logits - targets) ** 2).sum(-1)
        if reduction == "none":
            return per_example
        return per_example.sum() if reduction == "sum" else per_example.mean()
    return F.cross_entropy(logits, labels, label_smoothing=loss.label_smoothing, reduction=reduction)


@WORKLOADS.register("resnet")
class ResNetClassification(Workload):
    sections = {"model": ResNetModelSection, "data": vision.VisionDataSection, "loss": LossSection}
    path_keys = ("data.path", "data.prepared_path")
    minibatch_noise_refusal = None

    def __init__(self, sections: dict[str, Any], context: WorkerContext) -> None:
        super().__init__(sections, context)
        self.model_section: ResNetModelSection = sections["model"]
        self.data_section: vision.VisionDataSection = sections["data"]
        self.loss_section: LossSection = sections["loss"]
        self.data = vision.load_vision(self.data_section)
        self.eval_indices = vision.rank_indices(len(self.data.eval), context.rank, context.world_size)

    @classmethod
    def validate(cls, config: Config) -> None:
        model, data, loss = config.sections["model"], config.sections["data"], config.sections["loss"]
        if model.name not in MODEL_NAMES:
            raise ConfigError(f"model.name={model.name!r} is not known; known: {', '.join(MODEL_NAMES)}")
        vision.spec_for(data)
        if model.activation_checkpointing and config.trainer.compile:
            raise compile_refused("ResNets")
        if model.activation_checkpointing and model.name not in RESNET_NAMES:
            raise ConfigError(f"model.activation_checkpointing=true applies to ResNets (residual blocks), not "
                              f"model.name={model.name}; ResNets: {', '.join(RESNET_NAMES)}")
        if model.sync_batchnorm and not config.scaling.use_gpu:
            raise ConfigError("model.sync_batchnorm=true needs GPU workers (scaling.use_gpu=true): "
                              "PyTorch's SyncBatchNorm runs on GPUs only")
        if loss.name not in LOSSES:
            raise ConfigError(f"loss.name={loss.name!r} is not known; known: {', '.join(LOSSES)}")

    @classmethod
    def prepare(cls, config: Config) -> int:
        """Download (once, here) or check the dataset, and check that one image goes through the model.
        What `distdl export` needs to know of the data is kept in the run directory (when there is one
        yet: a study checks its settings before its trials' directories exist)."""
        data = vision.load_vision(config.sections["data"], allow_download=True)
        image, _ = _first_image(data.train, config.sections["data"])
        expected = (data.channels, data.image_size, data.image_size)
        if tuple(image.shape) != expected:
            raise ConfigError(f"data.path: images come out as {tuple(image.shape)} (channels, height, width), "
                              f"not {expected}; set data.image_size, or check the image files")
        if config.run_dir.is_dir():
            (config.run_dir / CLASSIFIER_FILE).write_text(json.dumps(spec_of(config.sections, data), indent=2)
                                                           + "\n")
        return len(data.train)

    @classmethod
    def export(cls, sections: dict[str, Any], run_dir: Path, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """model.safetensors and model.json (distdl.models.classifiers): a torchvision ResNet on colour
        images loads into torchvision's constructor strictly; every classifier loads with
        `distdl.models.classifiers.load_exported`."""
        classifiers.write_exported(out_dir, saved_spec(run_dir, sections), state_dict)

    @classmethod
    def example_step(cls, config: Config) -> ExampleStep:
        """Two random images of the data's channels and crop through the classifier (batch norm needs
        two); the classes of the dataset (an image folder's are its class folders' names)."""
        section, data = config.sections["model"], config.sections["data"]
        spec = vision.spec_for(data)
        size = data.image_size or spec.image_size
        model = fresh_classifier(section, spec.channels, size, vision.class_count(data))
        images, labels = torch.randn(2, spec.channels, size, size), torch.zeros(2, dtype=torch.long)
        return ExampleStep({"model": model},
                           lambda: classification_loss(model(images).float(), labels, config.sections["loss"]), samples=2)

    @classmethod
    def evaluation_metrics(cls, sections: dict[str, Any]) -> list[str]:
        return ["eval_loss", "eval_top1", "eval_top5", "eval_images"]

    def build_model(self) -> torch.nn.Module:
        model = fresh_classifier(self.model_section, self.data.channels, self.data.image_size, self.data.classes)
        if self.model_section.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def train_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        return vision.train_batches(self.data.train, self.context.batch_plan(), start, self.data_section.loader_workers)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["images"]).float()  # the loss in fp32 whatever the engine computes in
        loss = classification_loss(logits, batch["labels"], self.loss_section)
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}

    def example_losses(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["images"]).float()
        losses = classification_loss(logits, batch["labels"], self.loss_section, reduction="none")
        return losses, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}

    def batch_size(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        # "tokens" counts pixels per channel, so tokens_per_s reads as pixels/s.
        images = batch["images"]
        return {"samples": int(images.shape[0]), "tokens": int(images.shape[0] * images.shape[-1] * images.shape[-2])}

    # -- for the studies' measurements (distdl.studies.measures.LossOracle)
    def measurement_batches(self, split: str, limit: Optional[int] = None,
                            batch_size: int = 500) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's block of the first `limit` examples of `train` or `eval`, batched, on the device."""
        dataset = self.data.train if split == "train" else self.data.eval
        count = len(dataset) if limit is None else min(limit, len(dataset))
        indices = vision.rank_indices(count, self.context.rank, self.context.world_size)
        batches = [vision.stack([dataset[i] for i in indices[b : b + batch_size]])
                   for b in range(0, len(indices), batch_size)]
        return [(b["images"].to(self.context.device), b["labels"].to(self.context.device)) for b in batches]

    def loss_sum(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss summed over a batch (no label smoothing's effect removed), and the correct count."""
        images, labels = batch
        logits = model(images)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
        return classification_loss(logits, labels, self.loss_section, "sum"), (logits.argmax(-1) == labels).sum()

    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy over the whole eval set, each image counted once."""
        device = self.context.device

        def totals(indices: Any) -> torch.Tensor:
            """Loss sum, top-1 correct, top-5 correct, images."""
            batch = vision.stack([self.data.eval[i] for i in indices])
            images, labels = batch["images"].to(device), batch["labels"].to(device)
            logits = model(images).float()
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            values = [classification_loss(logits, labels, self.loss_section, reduction="sum"),
                      (top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(-1).sum(), len(labels)]
            return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])

        with evaluation_mode(model):
            parts = evaluate_in_lockstep(self.context, self.eval_indices, range(len(self.data.eval)), totals)
        loss_sum, top1, top5, count = summed_over_ranks(parts, 4, device)
        if int(count) != len(self.data.eval):
            raise RuntimeError(f"evaluation counted {int(count)} images of {len(self.data.eval)}")
        return {"eval_loss": loss_sum / count, "eval_top1": top1 / count, "eval_top5": top5 / count,
                "eval_images": int(count)}


def _first_image(dataset: Any, data: vision.VisionDataSection) -> tuple[torch.Tensor, int]:
    try:
        return dataset[0]
    except Exception as err:
        raise ConfigError(f"data.path: the first training image of {data.dataset} could not be read: {err}") from err
