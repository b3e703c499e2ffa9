"""The run configuration's sections, with each field's type, default and limits, and the checks
that need more than one key. The fixed sections (run, ray, scaling, engine, optimizer, scheduler,
trainer, tracking) are the same for every workload; a workload registers its own sections (for
BERT: model, data, tokenizer), and each component is handed only its own section.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from annotated_types import Ge, Gt, Interval, Len

from distdl.config.fields import AtLeastOne, Finite, NonNegative, Requirement, StepInterval
from distdl.errors import ConfigError
from distdl.rundir import RunStorage, is_uri


@dataclass
class RunSection:
    name: str = "distdl-run"
    storage_path: str = "runs"
    seed: NonNegative = 0
    # Ray Train restarts the worker group from the latest checkpoint this many times.
    max_failures: NonNegative = 0


@dataclass
class RaySection:
    # None starts an embedded local Ray; "auto" or "HOST:PORT" joins a cluster.
    address: Optional[str] = None
    # CPUs the embedded local Ray may use (None: all of this machine's).
    num_cpus: Optional[Annotated[int, Ge(1), Requirement("must be at least 1 (or null: all)")]] = None


@dataclass
class ScalingSection:
    num_workers: AtLeastOne = 2
    use_gpu: bool = False
    cpus_per_worker: AtLeastOne = 1
    # Ray placement of the workers' bundles.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass
class EngineSection:
    zero_stage: Literal[0, 1, 2, 3] = 0
    # fp16 needs GPUs (DeepSpeed's CPU accelerator has no fp16).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_clipping: Annotated[float, Ge(0), Finite, Requirement("must be finite and >= 0 (0: off)")] = 1.0
    # ZeRO stages 1-3 only: optimizer state lives in CPU memory.
    offload_optimizer: bool = False
    # ZeRO 1-3: reduce gradients bucket by bucket while the backward pass still runs. null: on for
    # GPU workers (communication runs beside compute), off for CPU workers, where it competes with
    # compute for the same cores (benchmarks/scaling.py: 0.80 against 0.86 efficiency on 2 workers).
    overlap_comm: Optional[bool] = None
    # Elements per bucket of ZeRO's gradient reduce and parameter all-gather (DeepSpeed's default,
    # 5e8, makes one bucket of most models, which leaves nothing to overlap).
    bucket_elements: AtLeastOne = 25_000_000
    # GPU workers: fp32 matmuls and convolutions on TF32 tensor cores (Ampere and later), as PyTorch
    # recommends for training; false keeps them in full fp32.
    tf32: bool = True
    # A raw DeepSpeed JSON merged over the derived config; conflicts are errors.
    deepspeed_config: Optional[str] = None


@dataclass
class SharpnessAwareSection:
    """Sharpness-aware minimization (Foret et al. 2021) around the optimizer: each micro-batch's
    gradient is taken at the weights moved rho along that micro-batch's own normalized gradient."""

    # The neighbourhood's radius. Foret et al.: 0.05 for SGD on CIFAR-10 (0.05-0.1 on ImageNet).
    rho: Annotated[float, Gt(0), Finite] = 0.05
    # ASAM (Kwon et al. 2021): the neighbourhood scales with |w|, so a rescaling of the network that
    # leaves its function alone leaves the update alone too; its rho is larger (Kwon et al.: 0.5-2).
    adaptive: bool = False


@dataclass
class NoiseSection:
    """Gaussian noise injected into training."""

    # isotropic: Langevin dynamics at `temperature` (Welling & Teh 2011's update, SGLD): after each
    # step, every weight gets N(0, 2 lr T), lr the step's scheduled rate.
    # minibatch: the gradient gets noise with the covariance of gradient noise at `batch_size`
    # (below the global batch), which then has the noise of that small batch: Sigma (1/b - 1/B).
    kind: Literal["isotropic", "minibatch"] = "isotropic"
    temperature: Annotated[float, Ge(0), Finite, Requirement("must be a finite number >= 0 (0: no noise)")] = 0.0
    batch_size: Optional[AtLeastOne] = None


@dataclass
class OptimizerSection:
    # lamb and lars: layer-wise adaptive (distdl.optim.layerwise), for large global batches.
    name: Literal["adamw", "adam", "sgd", "lamb", "lars"] = "adamw"
    lr: Annotated[float, Gt(0), Finite] = 1e-3
    weight_decay: Annotated[float, Ge(0)] = 0.01
    betas: Annotated[list[Annotated[float, Interval(ge=0, lt=1)]], Len(2, 2)] = field(
        default_factory=lambda: [0.9, 0.999])
    eps: Annotated[float, Gt(0)] = 1e-8
    # sgd and lars.
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    # sgd only.
    nesterov: bool = False
    # lars only: eta in You et al. 2017 (MLPerf's ResNet-50 reference uses 0.001).
    trust_coefficient: Annotated[float, Gt(0), Finite] = 0.001
    # When set, optimizer.lr is the learning rate at this global batch, and other batches scale it
    # by lr_scaling (e.g. lr 0.1 at reference 256, as Goyal et al. 2017 train ResNet-50).
    reference_batch_size: Optional[AtLeastOne] = None
    # linear: lr x B / reference (Goyal et al. 2017, for SGD); sqrt: lr x sqrt(B / reference)
    # (Hoffer et al. 2017 and Malladi et al. 2022 for Adam; You et al. 2019 scale LAMB so).
    lr_scaling: Literal["linear", "sqrt"] = "linear"
    # Sharpness-aware minimization around the optimizer above (two forward and backward passes a
    # micro-batch); null: off. Set it as {rho: 0.05} or {rho: 1.0, adaptive: true}.
    sam: Optional[SharpnessAwareSection] = None
    # Noise injected into the weights after each step (SGLD); null: none. {kind: isotropic, temperature: 1e-4}.
    noise: Optional[NoiseSection] = None


@dataclass
class SchedulerSection:
    # transformers.get_scheduler's names, and step (step decay after the warmup).
    name: Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial", "step"] = "linear"
    warmup_steps: NonNegative = 0
    # Used when warmup_steps is 0: a fraction of trainer.max_steps.
    warmup_ratio: Annotated[float, Interval(ge=0, le=1)] = 0.0
    # polynomial: lr_end + (lr - lr_end) (1 - progress)^power after the warmup (NVIDIA's BERT
    # pretraining: power 0.5; MLPerf's ResNet-50: power 2).
    power: Annotated[float, Gt(0), Finite] = 1.0
    lr_end: Annotated[float, Ge(0), Finite] = 0.0
    # step: the lr is multiplied by gamma at each milestone, given as fractions of trainer.max_steps
    # (He et al.'s ResNet-50 schedule, 90 epochs decayed at 30, 60 and 80: [0.3333, 0.6667, 0.8889]).
    milestones: list[Annotated[float, Interval(gt=0, lt=1)]] = field(default_factory=lambda: [0.5, 0.75])
    gamma: Annotated[float, Interval(gt=0, lt=1)] = 0.1


@dataclass
class TrainerSection:
    # The step budget; set this or `epochs` (when both are set, max_steps wins, as in HF's Trainer).
    max_steps: Optional[AtLeastOne] = None
    # Passes over the training set; turned into max_steps once the driver knows the data's size.
    epochs: Optional[Annotated[float, Gt(0), Finite]] = None
    # End this session after this step (with a checkpoint), keeping the LR schedule planned
    # for max_steps; rerun with a later stop_at_step (or none) to go on, as Slurm job chains do.
    stop_at_step: Optional[AtLeastOne] = None
    micro_batch_size: AtLeastOne = 8
    # Set either of these (or neither: accumulation 1). They must agree with
    # global = micro_batch_size x gradient_accumulation_steps x num_workers.
    global_batch_size: Optional[AtLeastOne] = None
    gradient_accumulation_steps: Optional[AtLeastOne] = None
    log_every: AtLeastOne = 10
    # 0: evaluate only at the end.
    eval_every: StepInterval = 0
    # 0: checkpoint only at the end.
    checkpoint_every: StepInterval = 0
    keep_checkpoints: AtLeastOne = 2
    # Log the gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018) from each
    # rank's gradient against the all-reduced one: no extra passes. Needs 2+ workers, ZeRO 0, fp32.
    noise_scale: bool = False
    # End the run (with a checkpoint) at the first log step whose window-mean training loss is at or
    # below this: the scaling study's steps-to-target runs.
    stop_at_loss: Optional[Annotated[float, Finite]] = None
    # Dense peak TFLOP/s of one device at the run's precision, for MFU. null: the datasheet figure
    # of a known GPU model (distdl.flops), a measured matmul on CPU workers; unknown GPUs log no MFU.
    peak_tflops: Optional[Annotated[float, Gt(0), Finite, Requirement("must be a positive number (TFLOP/s)")]] = None
    # [first, last] optimizer step to trace with torch.profiler on rank 0 and the last rank, into the
    # run directory's profiles/ (open in Perfetto or TensorBoard). null: no profile.
    profile_steps: Optional[Annotated[list[AtLeastOne], Len(2, 2)]] = None
    # The profile also records tensor allocations (and shapes), and Python stacks of each op.
    profile_memory: bool = False
    profile_stacks: bool = False
    # torch.compile the model (through DeepSpeed's engine.compile); the first step's compile time is
    # reported apart from the step rate.
    compile: bool = False


@dataclass
class TrackingSection:
    # auto: online when a W&B login is configured, offline otherwise.
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "distdl"
    wandb_entity: Optional[str] = None
    # W&B's run group (a study sets it to the study's name, so its trials show together).
    wandb_group: Optional[str] = None
    # Seconds W&B online may take to reach its server before the run logs offline instead (W&B's default).
    wandb_init_timeout: Annotated[float, Gt(0), Finite, Requirement("must be a positive number of seconds")] = 90.0
    progress_bar: bool = True


FIXED_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "ray": RaySection,
    "scaling": ScalingSection,
    "engine": EngineSection,
    "optimizer": OptimizerSection,
    "scheduler": SchedulerSection,
    "trainer": TrainerSection,
    "tracking": TrackingSection,
}

# Keys a rerun may change and still resume the same run: the step budget, and what concerns
# only where and how this session runs (a Slurm job chain gets a new Ray head every job; a job
# requeued onto fewer nodes gets fewer workers, and gradient accumulation keeps the global batch).
SESSION_KEYS = (
    "trainer.max_steps", "trainer.epochs", "trainer.stop_at_step", "trainer.log_every", "trainer.eval_every",
    "trainer.checkpoint_every", "trainer.keep_checkpoints", "run.max_failures", "ray.address", "ray.num_cpus",
    "scaling.num_workers", "trainer.gradient_accumulation_steps",
    "scaling.cpus_per_worker", "scaling.placement_strategy", "tracking.wandb_mode", "tracking.progress_bar",
    "tracking.wandb_init_timeout", "data.num_proc", "data.cache_dir", "model.activation_checkpointing",
    "trainer.peak_tflops", "trainer.profile_steps", "trainer.profile_memory", "trainer.profile_stacks",
    "trainer.compile",
)


@dataclass
class Config:
    workload: str
    run: RunSection
    ray: RaySection
    scaling: ScalingSection
    engine: EngineSection
    optimizer: OptimizerSection
    scheduler: SchedulerSection
    trainer: TrainerSection
    tracking: TrackingSection
    # The workload's own sections, typed by the dataclasses it registered.
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def run_storage(self) -> RunStorage:
        """Where the run directory lives: a local folder or an object-store URI (s3://, gs://)."""
        storage = self.run.storage_path
        return RunStorage(f"{storage.rstrip('/')}/{self.run.name}" if is_uri(storage)
                          else Path(storage).expanduser().resolve() / self.run.name)

    @property
    def run_dir(self) -> Path:
        """The local folder the run works in: the run directory, or its working copy when it lives on
        object storage."""
        return self.run_storage.local

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workload": self.workload}
        for name in FIXED_SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        for name, section in self.sections.items():
            out[name] = dataclasses.asdict(section)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- validation


def validate(config: Config) -> None:
    """Checks that need more than one key or knowledge of this machine."""
    if config.optimizer.nesterov and config.optimizer.name != "sgd":
        raise ConfigError("optimizer.nesterov=true applies to optimizer.name=sgd only")
    _check_schedule(config.scheduler, config.optimizer)
    _check_budget(config.trainer)
    if not config.run.name or "/" in config.run.name or config.run.name in (".", ".."):
        raise ConfigError(f"run.name={config.run.name!r} must be a non-empty name without '/'")
    if config.engine.offload_optimizer and config.engine.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer=true needs engine.zero_stage 1, 2 or 3")
    _check_sharpness_aware(config)
    if config.trainer.noise_scale and not noise_scale_possible(config):
        raise ConfigError("trainer.noise_scale=true compares each worker's gradient with the all-reduced one: it "
                          "needs scaling.num_workers >= 2, engine.zero_stage=0 and engine.precision=fp32 (got "
                          f"{config.scaling.num_workers}, {config.engine.zero_stage}, {config.engine.precision})")
    _resolve_batch(config)
    _check_noise(config)
    _check_device(config)


def _check_schedule(scheduler: SchedulerSection, optimizer: OptimizerSection) -> None:
    if scheduler.name == "polynomial" and scheduler.lr_end >= optimizer.lr:
        raise ConfigError(f"scheduler.lr_end={scheduler.lr_end} must be below optimizer.lr={optimizer.lr}: the "
                          "polynomial schedule decays from optimizer.lr to scheduler.lr_end")
    if scheduler.name == "step" and sorted(set(scheduler.milestones)) != scheduler.milestones:
        raise ConfigError(f"scheduler.milestones={scheduler.milestones} must be increasing fractions of "
                          "trainer.max_steps, each in (0, 1)")


def _check_noise(config: Config) -> None:
    noise = config.optimizer.noise
    if noise is None:
        return
    if noise.kind == "isotropic":
        if noise.batch_size is not None:
            raise ConfigError("optimizer.noise.batch_size applies to kind minibatch; isotropic noise takes a temperature")
        return
    if noise.temperature:
        raise ConfigError("optimizer.noise.temperature applies to kind isotropic; minibatch noise takes a batch_size")
    batch, micro = config.trainer.global_batch_size, config.trainer.micro_batch_size
    if noise.batch_size is None or noise.batch_size >= batch:  # the batch is resolved by now
        raise ConfigError(f"optimizer.noise.batch_size={noise.batch_size} must be set below trainer.global_batch_size="
                          f"{batch}: minibatch noise gives the large batch the gradient noise of that smaller one")
    if micro < 2:
        raise ConfigError(f"optimizer.noise kind minibatch draws its noise from the spread of each micro-batch's "
                          f"per-example gradients: trainer.micro_batch_size={micro} must be at least 2")
    if config.optimizer.sam is not None:
        raise ConfigError("optimizer.noise kind minibatch and optimizer.sam each take over a micro-batch's backward "
                          "pass: choose one")


def _check_sharpness_aware(config: Config) -> None:
    if config.optimizer.sam is None:
        return
    if config.engine.zero_stage == 3:
        raise ConfigError("optimizer.sam needs engine.zero_stage 0, 1 or 2: SAM moves every weight along its "
                          "own gradient between two passes, and under ZeRO-3 a rank holds only its partition "
                          "of the weights outside a forward pass")
    if config.engine.precision == "fp16":
        raise ConfigError("optimizer.sam needs engine.precision fp32 or bf16: under fp16, SAM's first gradient "
                          "would need DeepSpeed's dynamic loss scale, which only its own backward applies")


def noise_scale_possible(config: Config) -> bool:
    """trainer.noise_scale needs each rank's whole gradient before the all-reduce: 2+ workers, no
    ZeRO partitioning of gradients, and fp32 gradients in the parameters' .grad."""
    return config.scaling.num_workers >= 2 and config.engine.zero_stage == 0 and config.engine.precision == "fp32"


def _check_budget(trainer: TrainerSection) -> None:
    if trainer.max_steps is None and trainer.epochs is None:
        raise ConfigError("set trainer.max_steps (optimizer steps) or trainer.epochs (passes over the training data)")
    stop = trainer.stop_at_step
    if stop is not None and trainer.max_steps is not None and not 1 <= stop <= trainer.max_steps:
        raise ConfigError(f"trainer.stop_at_step={stop} must lie in 1..trainer.max_steps={trainer.max_steps}")
    if trainer.profile_steps is not None:
        first, last = trainer.profile_steps
        if first > last or (trainer.max_steps is not None and last > trainer.max_steps):
            raise ConfigError(f"trainer.profile_steps={trainer.profile_steps} must be [first, last] steps with "
                              f"1 <= first <= last <= trainer.max_steps={trainer.max_steps}")


def resolve_epochs(config: Config, train_examples: Optional[int]) -> Optional[int]:
    """Turn `epochs` and "epoch" intervals into steps, once the driver knows the training set's size.

    An epoch is one pass over a permutation of the training set in global batches (the last partial
    global batch is dropped; the next epoch reshuffles). Returns the steps per epoch.
    """
    trainer = config.trainer
    if trainer.max_steps is not None and "epoch" not in (trainer.eval_every, trainer.checkpoint_every):
        return None
    if train_examples is None:
        raise ConfigError(f"workload {config.workload} has no fixed training set: give trainer.max_steps, and "
                          "trainer.eval_every and trainer.checkpoint_every in steps")
    steps_per_epoch = train_examples // trainer.global_batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the training set's {train_examples} examples are fewer than one global batch of "
            f"trainer.global_batch_size={trainer.global_batch_size} (micro_batch_size x gradient_accumulation_steps "
            f"x num_workers = {trainer.micro_batch_size} x {trainer.gradient_accumulation_steps} x "
            f"{config.scaling.num_workers})"
        )
    if trainer.max_steps is None:
        trainer.max_steps = math.ceil(trainer.epochs * steps_per_epoch)
    for key in ("eval_every", "checkpoint_every"):
        if getattr(trainer, key) == "epoch":
            setattr(trainer, key, steps_per_epoch)
    _check_budget(trainer)
    return steps_per_epoch


def _resolve_batch(config: Config) -> None:
    trainer, workers = config.trainer, config.scaling.num_workers
    per_step = trainer.micro_batch_size * workers
    if trainer.global_batch_size is not None:
        if trainer.global_batch_size % per_step:
            raise ConfigError(
                f"trainer.global_batch_size={trainer.global_batch_size} is not divisible by "
                f"trainer.micro_batch_size x scaling.num_workers = {trainer.micro_batch_size} x {workers}"
            )
        accumulation = trainer.global_batch_size // per_step
        if trainer.gradient_accumulation_steps not in (None, accumulation):
            raise ConfigError(
                f"trainer.global_batch_size={trainer.global_batch_size} != micro_batch_size x "
                f"gradient_accumulation_steps x num_workers = {trainer.micro_batch_size} x "
                f"{trainer.gradient_accumulation_steps} x {workers}"
            )
        trainer.gradient_accumulation_steps = accumulation
    trainer.gradient_accumulation_steps = trainer.gradient_accumulation_steps or 1
    trainer.global_batch_size = per_step * trainer.gradient_accumulation_steps


def _check_device(config: Config) -> None:
    precision = config.engine.precision
    if precision == "fp16" and not config.scaling.use_gpu:
        raise ConfigError(
            "engine.precision=fp16 needs GPUs (scaling.use_gpu=true); on CPU workers use bf16 or fp32"
        )
