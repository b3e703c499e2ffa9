"""GANs with the generator and the discriminator each in its own DeepSpeed engine.

Objectives: DCGAN's non-saturating loss (Goodfellow et al. 2014, section 3; Radford et al. 2016),
and WGAN-GP (Gulrajani et al. 2017): a critic trained with a gradient penalty, the generator
updated once every `n_critic` critic updates. Each evaluation renders a fixed noise batch into a
sample grid (PNG in the run directory, an image in W&B) and, when a classifier that distdl trained on
the same dataset is given, the Frechet distance between real and generated images in that
classifier's feature space. That is not the Inception FID of Heusel et al.: its numbers are only
comparable between runs that use the same classifier. Given the FID InceptionV3 weights file, the
Inception FID is computed too (with `frechet_images` images; papers use 10,000 or 50,000).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge

from distdl.collectives import gather_objects
from distdl.config import AtLeastOne, Config
from distdl.data import vision
from distdl.errors import ConfigError
from distdl.models.activation_checkpointing import checkpoint_conv_blocks, compile_refused
from distdl.models.dcgan import Discriminator, Generator
from distdl.registry import WORKLOADS
from distdl.workloads.base import WorkerContext, Workload, evaluation_mode
from distdl.workloads.classifier_run import trained_classifier
from distdl.workloads.frechet import (
    Statistics,
    feature_statistics,
    frechet_distance,
    inception_features,
    load_inception,
)

OBJECTIVES = ("dcgan", "wgan_gp")
SAMPLES_DIRNAME = "samples"


@dataclass
class GanModelSection:
    latent_dim: int = 100
    generator_width: int = 64
    discriminator_width: int = 64
    # batch (DCGAN), layer (WGAN-GP's critic: the penalty is per sample) or none.
    discriminator_norm: Literal["batch", "layer", "none"] = "batch"
    # Recompute each convolution block's activations (convolution, norm, activation) of both nets in
    # the backward pass: for large images or batches, where activations outweigh the weights. The
    # same losses and weights; a resume may turn it on or off.
    activation_checkpointing: bool = False


@dataclass
class ObjectiveSection:
    # dcgan (non-saturating) or wgan_gp.
    name: str = "dcgan"
    # wgan_gp: critic updates per generator update, and the penalty's weight (the paper's 5 and 10).
    n_critic: AtLeastOne = 5
    gradient_penalty: float = 10.0


@dataclass
class GanEvalSection:
    # Images in the sample grid (a fixed noise batch, the same at every evaluation).
    grid_images: AtLeastOne = 64
    # A distdl `resnet` run trained on the same dataset: the Frechet distance in its feature space.
    classifier_run: Optional[str] = None
    # The FID InceptionV3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth): adds
    # eval_inception_fid, the FID of Heusel et al. Nothing is downloaded at run time.
    inception_weights: Optional[str] = None
    # Real and generated images compared for the Frechet distance.
    frechet_images: Annotated[int, Ge(2)] = 1000


@WORKLOADS.register("gan")
class Gan(Workload):
    sections = {"model": GanModelSection, "data": vision.VisionDataSection, "objective": ObjectiveSection,
                "eval": GanEvalSection}
    path_keys = ("data.path", "data.prepared_path", "eval.classifier_run", "eval.inception_weights")
    export_engine = "generator"
    sharpness_aware_refusal = ("its generator and discriminator step in turn against each other's losses, and "
                               "SAM's ascent is defined for one model minimizing one loss")

    def __init__(self, sections: dict[str, Any], context: WorkerContext) -> None:
        super().__init__(sections, context)
        self.model_section: GanModelSection = sections["model"]
        self.data_section: vision.VisionDataSection = sections["data"]
        self.objective: ObjectiveSection = sections["objective"]
        self.eval_section: GanEvalSection = sections["eval"]
        self.data = vision.load_vision(self.data_section, symmetric=True)
        self.micro_batches_seen = 0
        self.last_generator_loss = torch.zeros(())
        # The same grid at every evaluation and on every rank, whatever the training RNG did.
        self.grid_noise = torch.randn(self.eval_section.grid_images, self.model_section.latent_dim,
                                      generator=torch.Generator().manual_seed(context.seed + 4242))
        self._spaces: Optional[dict[str, Callable[[torch.Tensor], np.ndarray]]] = None
        self._real_statistics: Optional[dict[str, Statistics]] = None

    @classmethod
    def validate(cls, config: Config) -> None:
        model, objective = config.sections["model"], config.sections["objective"]
        vision.spec_for(config.sections["data"])
        if objective.name not in OBJECTIVES:
            raise ConfigError(f"objective.name={objective.name!r} is not known; known: {', '.join(OBJECTIVES)}")
        if objective.name == "wgan_gp" and model.discriminator_norm == "batch":
            raise ConfigError("objective.name=wgan_gp needs model.discriminator_norm=layer or none: the gradient "
                              "penalty is per sample, and batch norm couples a batch's samples")
        if objective.name == "wgan_gp" and config.trainer.compile:
            raise ConfigError("trainer.compile=true cannot train objective.name=wgan_gp: its gradient penalty "
                              "differentiates the critic twice, and torch.compile has no double backward; set "
                              "trainer.compile=false (or objective.name=dcgan)")
        if model.activation_checkpointing and config.trainer.compile:
            raise compile_refused("GANs")
        if config.engine.zero_stage == 3:
            raise ConfigError("engine.zero_stage=3 is not supported for GANs: the generator's update runs the "
                              "discriminator outside its own engine's step; use stages 0-2")
        if config.trainer.gradient_accumulation_steps != 1:
            raise ConfigError("GANs alternate their two updates every micro-batch: set "
                              "trainer.global_batch_size = micro_batch_size x num_workers (no accumulation)")

    @classmethod
    def prepare(cls, config: Config) -> int:
        data = vision.load_vision(config.sections["data"], allow_download=True, symmetric=True)
        run = config.sections["eval"].classifier_run
        if run is not None:
            classifier_data = _classifier_section(Path(run))
            if (classifier_data.dataset, classifier_data.image_size) != (config.sections["data"].dataset,
                                                                         config.sections["data"].image_size):
                raise ConfigError(f"eval.classifier_run: {run} was trained on {classifier_data.dataset} "
                                  f"(image size {classifier_data.image_size}), not on this GAN's data")
        weights = config.sections["eval"].inception_weights
        if weights is not None:
            load_inception(Path(weights))  # a wrong file fails here, before any worker starts
        return len(data.train)

    @classmethod
    def evaluation_metrics(cls, sections: dict[str, Any]) -> list[str]:
        evaluation = sections["eval"]
        return [name for name, source in (("eval_frechet_distance", evaluation.classifier_run),
                                          ("eval_inception_fid", evaluation.inception_weights)) if source is not None]

    def build_models(self) -> dict[str, torch.nn.Module]:
        section, data = self.model_section, self.data
        models = {
            "generator": Generator(section.latent_dim, data.channels, data.image_size, section.generator_width),
            "discriminator": Discriminator(data.channels, data.image_size, section.discriminator_width,
                                           section.discriminator_norm),
        }
        if section.activation_checkpointing:
            for model in models.values():
                model.net = checkpoint_conv_blocks(model.net)
        return models

    def train_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        self.micro_batches_seen = start
        return vision.train_batches(self.data.train, self.context.batch_plan(), start, self.data_section.loader_workers)

    def batch_size(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        images = batch["images"]
        return {"samples": int(images.shape[0]), "tokens": int(images.shape[0] * images.shape[-1] * images.shape[-2])}

    def train_step(self, engines: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        generator, discriminator = engines["generator"], engines["discriminator"]
        real = batch["images"]
        noise = torch.randn(len(real), self.model_section.latent_dim, device=real.device)
        fake = generator(noise)
        # Losses in fp32 whatever the engines compute in (bf16 logits round the BCE's log terms).
        d_real, d_fake = discriminator(real).float(), discriminator(fake.detach()).float()
        if self.objective.name == "dcgan":
            d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        else:
            # The penalty's inner gradient is taken through the bare module; its outer one reaches the
            # critic's weights through discriminator.backward like the rest of the loss.
            d_loss = d_fake.mean() - d_real.mean() + self.objective.gradient_penalty * self._penalty(
                discriminator.module, real, fake.detach())
        discriminator.backward(d_loss)
        discriminator.step()
        self.micro_batches_seen += 1
        update_generator = self.objective.name == "dcgan" or self.micro_batches_seen % self.objective.n_critic == 0
        if update_generator:
            # Through the discriminator's bare module, frozen: its engine must neither see this
            # backward pass nor gradients it did not step on (ZeRO 0-2 hold its full weights).
            critic = discriminator.module
            critic.requires_grad_(False)
            scores = critic(fake).float()
            critic.requires_grad_(True)
            if self.objective.name == "dcgan":
                g_loss = F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))  # non-saturating
            else:
                g_loss = -scores.mean()
            generator.backward(g_loss)
            generator.step()
            self.last_generator_loss = g_loss.detach()
        return {"loss_d": d_loss.detach(), "loss_g": self.last_generator_loss.to(real.device),
                "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}

    @staticmethod
    def _penalty(critic: Any, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """(|grad_x critic(x)| - 1)^2 at points between real and generated images (Gulrajani et al., eq. 3)."""
        # In the images' dtype: the critic here is the bare module, whose weights are in the compute dtype.
        mix = torch.rand(len(real), 1, 1, 1, device=real.device, dtype=real.dtype)
        between = (mix * real + (1 - mix) * fake).requires_grad_(True)
        (gradient,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
        return ((gradient.float().flatten(1).norm(dim=1) - 1) ** 2).mean()

    def evaluate(self, engines: dict[str, Any], step: int) -> dict[str, Any]:
        generator = engines["generator"]
        with evaluation_mode(generator):
            metrics: dict[str, Any] = {"sample_grid": self._write_grid(generator, step)}
            if self.eval_section.classifier_run is not None or self.eval_section.inception_weights is not None:
                metrics.update(self._frechet_distances(generator))
        return metrics

    def _write_grid(self, generator: Any, step: int) -> Optional[Path]:
        from torchvision.utils import save_image

        images = generator(self.grid_noise.to(self.context.device)).float().cpu()
        if self.context.rank != 0:
            return None
        folder = self.context.run_dir / SAMPLES_DIRNAME
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:08d}.png"
        rows = int(np.ceil(np.sqrt(len(images))))
        save_image(images, path, nrow=rows, normalize=True, value_range=(-1, 1))
        return path

    def _frechet_distances(self, generator: Any) -> dict[str, float]:
        """Real eval images against as many generated ones, in each feature space configured; each
        rank embeds its share and every rank computes the distances from all of them. The real
        images' statistics do not change between evaluations, so they are computed once."""
        spaces = self._feature_spaces()
        total, world, rank = self.eval_section.frechet_images, self.context.world_size, self.context.rank
        size, device = self.context.micro_batch_size, self.context.device
        if self._real_statistics is None:
            indices = vision.rank_indices(min(total, len(self.data.eval)), rank, world)
            reals = [torch.stack([self.data.eval[i][0] for i in indices[b : b + size]]).to(device)
                     for b in range(0, len(indices), size)]
            self._real_statistics = {name: feature_statistics(_gather_rows([embed(images) for images in reals]))
                                     for name, embed in spaces.items()}
        noise = torch.Generator().manual_seed(self.context.seed * 7 + rank)
        fake_count = len(vision.rank_indices(total, rank, world))
        fakes = [generator(torch.randn(min(size, fake_count - b), self.model_section.latent_dim,
                                       generator=noise).to(device)).float()
                 for b in range(0, fake_count, size)]
        return {name: frechet_distance(self._real_statistics[name],
                                       feature_statistics(_gather_rows([embed(images) for images in fakes])))
                for name, embed in spaces.items()}

    def _feature_spaces(self) -> dict[str, Callable[[torch.Tensor], np.ndarray]]:
        """Metric name -> embedding of [-1, 1] images, loaded on first use."""
        if self._spaces is None:
            self._spaces = {}
            device = self.context.device
            if self.eval_section.classifier_run is not None:
                self._spaces["eval_frechet_distance"] = self._classifier_embedding(device)
            if self.eval_section.inception_weights is not None:
                inception = load_inception(Path(self.eval_section.inception_weights)).to(device)
                self._spaces["eval_inception_fid"] = partial(inception_features, inception)
        return self._spaces

    def _classifier_embedding(self, device: torch.device) -> Callable[[torch.Tensor], np.ndarray]:
        classifier = trained_classifier(self.eval_section.classifier_run, key="eval.classifier_run")
        model = classifier.model
        model.fc = torch.nn.Identity()  # penultimate features
        model = model.to(device).eval()
        mean, std = (torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (classifier.mean, classifier.std))

        def embed(images: torch.Tensor) -> np.ndarray:
            # GAN pixels are in [-1, 1]; the classifier was trained on the dataset's normalization.
            return model(((images + 1) / 2 - mean) / std).cpu().numpy()

        return embed

    @classmethod
    def export(cls, sections: dict[str, Any], run_dir: Path, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
        """generator.safetensors and generator.json: `Generator(**json)` then `load_state_dict`."""
        import json

        from safetensors.torch import save_file

        data = vision.load_vision(sections["data"], symmetric=True)
        model = sections["model"]
        arguments = {"latent_dim": model.latent_dim, "channels": data.channels, "image_size": data.image_size,
                     "width": model.generator_width}
        try:  # the shapes must match before anything is written
            Generator(**arguments).load_state_dict(state_dict)
        except RuntimeError as err:
            raise ConfigError(f"{run_dir}: the generator's checkpoint does not match its config ({err})") from None
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / "generator.safetensors"))
        (out_dir / "generator.json").write_text(json.dumps(arguments, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"last_generator_loss": float(self.last_generator_loss)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_generator_loss = torch.tensor(state.get("last_generator_loss", 0.0))


def _gather_rows(pieces: list[np.ndarray]) -> np.ndarray:
    """This rank's feature rows and every other rank's, stacked (every rank calls it)."""
    everyone = gather_objects(np.concatenate(pieces) if pieces else None)
    return np.concatenate([rows for rows in everyone if rows is not None])


def _classifier_section(run_dir: Path) -> vision.VisionDataSection:
    from distdl.models.resnet import MODEL_NAMES as RESNETS
    from distdl.rundir import saved_config

    saved = saved_config(run_dir, "resnet", key="eval.classifier_run")
    name = saved.get("model", {}).get("name", "cifar_resnet20")
    if name not in RESNETS:
        raise ConfigError(f"eval.classifier_run: {run_dir} trained a {name}; the Frechet distance uses a ResNet's "
                          "pooled features")
    return vision.VisionDataSection(**saved.get("data", {}))
