"""The run configuration: YAML file + dotted overrides, typed and validated on the driver.

Precedence is command line > file > dataclass defaults (as in torchtitan and Hydra).
The fixed sections (run, ray, scaling, engine, optimizer, scheduler, trainer,
tracking) are the same for every workload; a workload registers its own
sections (for BERT: model, data, tokenizer), and each component is handed only
its own section.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from annotated_types import BaseMetadata, Ge, GroupedMetadata, Gt, Interval, Le, Len, Lt, MaxLen, MinLen, Predicate

from distdl.errors import ConfigError

# ----------------------------------------------------------------------------- limits

# A field's limits are annotated-types constraints (the vocabulary pydantic and msgspec read) on
# its type: Annotated[int, Ge(1)]. `coerce` checks them and words the error from them, unless a
# Requirement gives the words.


@dataclass(frozen=True)
class Requirement:
    """What the value must be, in words, for the error when the type or limits around it fail."""

    text: str


Finite = Predicate(math.isfinite)
AtLeastOne = Annotated[int, Ge(1)]
NonNegative = Annotated[int, Ge(0)]
# Steps, or "epoch" (an epoch's steps, once the driver knows the data's size); 0: off.
StepInterval = Annotated[Union[NonNegative, Literal["epoch"]],
                         Requirement("must be 0 (off), a number of steps, or 'epoch'")]

# ----------------------------------------------------------------------------- sections


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
    # A raw DeepSpeed JSON merged over the derived config; conflicts are errors.
    deepspeed_config: Optional[str] = None


@dataclass
class OptimizerSection:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Annotated[float, Gt(0), Finite] = 1e-3
    weight_decay: Annotated[float, Ge(0)] = 0.01
    betas: Annotated[list[Annotated[float, Interval(ge=0, lt=1)]], Len(2, 2)] = field(
        default_factory=lambda: [0.9, 0.999])
    eps: Annotated[float, Gt(0)] = 1e-8
    # sgd only.
    momentum: float = 0.9
    nesterov: bool = False
    # Linear scaling rule (Goyal et al. 2017): when set, the learning rate used is
    # lr x global_batch_size / reference_batch_size (e.g. lr 0.1 at reference 256).
    reference_batch_size: Optional[AtLeastOne] = None


@dataclass
class SchedulerSection:
    # Names of transformers.get_scheduler.
    name: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "linear"
    warmup_steps: NonNegative = 0
    # Used when warmup_steps is 0: a fraction of trainer.max_steps.
    warmup_ratio: Annotated[float, Interval(ge=0, le=1)] = 0.0


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
# only where and how this session runs (a Slurm job chain gets a new Ray head every job).
SESSION_KEYS = (
    "trainer.max_steps", "trainer.epochs", "trainer.stop_at_step", "trainer.log_every", "trainer.eval_every",
    "trainer.checkpoint_every", "trainer.keep_checkpoints", "run.max_failures", "ray.address", "ray.num_cpus",
    "scaling.cpus_per_worker", "scaling.placement_strategy", "tracking.wandb_mode", "tracking.progress_bar",
    "tracking.wandb_init_timeout", "data.num_proc", "data.cache_dir",
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
    def run_dir(self) -> Path:
        return Path(self.run.storage_path).expanduser().resolve() / self.run.name

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workload": self.workload}
        for name in FIXED_SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        for name, section in self.sections.items():
            out[name] = dataclasses.asdict(section)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `dotted.key=value` overrides, type-check and validate."""
    raw = read_yaml(path) if path is not None else {}
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    try:
        # YAML typing, as Hydra does: 3 -> int, 1e-3 -> float, true -> bool, null -> None.
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[leaf] = value


# Keys naming local files; made absolute on the driver because Ray workers run in another directory.
PATH_KEYS = ("run.storage_path", "engine.deepspeed_config")


def resolve_paths(config: Config, keys: tuple[str, ...]) -> None:
    """Make relative local paths absolute (leaving hub names and URIs alone)."""
    for dotted in keys:
        section_name, key = dotted.split(".")
        section = getattr(config, section_name, None) or config.sections.get(section_name)
        value = getattr(section, key, None) if section is not None else None
        if not value or "://" in value:
            continue
        path = Path(value).expanduser()
        if path.is_absolute():
            setattr(section, key, str(path))
        elif dotted.endswith(("storage_path", "cache_dir")) or path.exists():  # these may not exist yet
            setattr(section, key, str(path.resolve()))


def config_from_dict(raw: dict[str, Any]) -> Config:
    from distdl.registry import WORKLOADS

    raw = dict(raw)
    workload_name = raw.pop("workload", None)
    if workload_name is None:
        raise ConfigError(f"missing key 'workload'; known workloads: {', '.join(WORKLOADS.names())}")
    spec = WORKLOADS.get(str(workload_name))
    section_types = {**FIXED_SECTIONS, **spec.sections}
    unknown = sorted(set(raw) - set(section_types))
    if unknown:
        raise ConfigError(
            f"unknown section {unknown[0]!r}; valid top-level keys: workload, {', '.join(section_types)}"
        )
    built: dict[str, Any] = {}
    for name, cls in section_types.items():
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of keys, got {value!r}")
        built[name] = build_section(cls, value, name)
    config = Config(
        workload=str(workload_name),
        sections={name: built.pop(name) for name in spec.sections},
        **built,
    )
    resolve_paths(config, PATH_KEYS + spec.path_keys)
    validate(config)
    spec.validate(config)
    return config


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {prefix}.{key}; valid keys in {prefix}: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:
            try:
                return coerce(value, alternative, key)
            except ConfigError:
                pass
        return coerce(value, inner[-1], key)
    if origin is Annotated:
        return coerce_limited(value, args[0], hint.__metadata__, key)
    if origin is Literal:
        # By type too: YAML's true is not the 1 of Literal[0, 1, 2, 3].
        if not any(type(value) is type(allowed) and value == allowed for allowed in args):
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return build_section(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "2e-3" (no dot) as a string; people write it that way all the time.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is Any or isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


def coerce_limited(value: Any, inner: Any, metadata: tuple[Any, ...], key: str) -> Any:
    """`coerce` to the inner type, then check the field's limits."""
    requirement = next((m.text for m in metadata if isinstance(m, Requirement)), None)
    try:
        value = coerce(value, inner, key)
    except ConfigError:
        if requirement is None:
            raise
        raise ConfigError(f"{key}={shown(value)} {requirement}") from None
    limits = [limit for m in metadata if not isinstance(m, Requirement)
              for limit in (m if isinstance(m, GroupedMetadata) else [m])]
    if not all(satisfies(value, limit) for limit in limits):
        raise ConfigError(f"{key}={shown(value)} {requirement or describe(limits)}")
    return value


def satisfies(value: Any, limit: BaseMetadata) -> bool:
    if isinstance(limit, Ge):
        return value >= limit.ge
    if isinstance(limit, Gt):
        return value > limit.gt
    if isinstance(limit, Le):
        return value <= limit.le
    if isinstance(limit, Lt):
        return value < limit.lt
    if isinstance(limit, MinLen):
        return len(value) >= limit.min_length
    if isinstance(limit, MaxLen):
        return len(value) <= limit.max_length
    if isinstance(limit, Predicate):
        return bool(limit.func(value))
    raise TypeError(f"config fields do not support the constraint {limit!r}")


def describe(limits: list[BaseMetadata]) -> str:
    """The limits in words: 'must be at least 1', 'must lie in [0, 1)', 'must be a finite positive number'."""
    bound = {type(limit).__name__: getattr(limit, type(limit).__name__.lower()) for limit in limits
             if isinstance(limit, (Ge, Gt, Le, Lt))}
    finite = any(isinstance(limit, Predicate) and limit.func is math.isfinite for limit in limits)
    low = next((limit.min_length for limit in limits if isinstance(limit, MinLen)), None)
    high = next((limit.max_length for limit in limits if isinstance(limit, MaxLen)), None)
    if low is not None or high is not None:
        if low == high:
            return f"must hold {low} values"
        return f"must hold at least {low} values" if high is None else f"must hold {low or 0} to {high} values"
    lower, upper = bound.get("Ge", bound.get("Gt")), bound.get("Le", bound.get("Lt"))
    if lower is not None and upper is not None:
        return f"must lie in {'[' if 'Ge' in bound else '('}{lower}, {upper}{']' if 'Le' in bound else ')'}"
    if bound.get("Gt") == 0:
        return "must be a finite positive number" if finite else "must be positive"
    if bound.get("Ge") == 0:
        return "must be finite and >= 0" if finite else "must be 0 or more"
    if lower is not None:
        return f"must be at least {lower}" if "Ge" in bound else f"must be greater than {lower}"
    if upper is not None:
        return f"must be at most {upper}" if "Le" in bound else f"must be below {upper}"
    return "must be a finite number" if finite else "is not allowed"


def shown(value: Any) -> str:
    """A value as an error shows it: numbers and lists as written, strings quoted."""
    return str(value) if isinstance(value, (int, float, list)) and not isinstance(value, bool) else repr(value)


# ----------------------------------------------------------------------------- validation


def validate(config: Config) -> None:
    """Checks that need more than one key or knowledge of this machine."""
    if config.optimizer.nesterov and config.optimizer.name != "sgd":
        raise ConfigError("optimizer.nesterov=true applies to optimizer.name=sgd only")
    _check_budget(config.trainer)
    if not config.run.name or "/" in config.run.name or config.run.name in (".", ".."):
        raise ConfigError(f"run.name={config.run.name!r} must be a non-empty name without '/'")
    if config.engine.offload_optimizer and config.engine.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer=true needs engine.zero_stage 1, 2 or 3")
    if config.trainer.noise_scale and not noise_scale_possible(config):
        raise ConfigError("trainer.noise_scale=true compares each worker's gradient with the all-reduced one: it "
                          "needs scaling.num_workers >= 2, engine.zero_stage=0 and engine.precision=fp32 (got "
                          f"{config.scaling.num_workers}, {config.engine.zero_stage}, {config.engine.precision})")
    _resolve_batch(config)
    _check_device(config)


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


def with_defaults(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the keys added to distdl since it was written, at their defaults, so
    that a newer distdl resumes an older run whose settings it would give the same values."""
    try:
        return config_from_dict(yaml.safe_load(yaml.safe_dump(config_dict))).to_dict()
    except ConfigError:
        return config_dict


def without_session_keys(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys a resume may change."""
    copy = yaml.safe_load(yaml.safe_dump(config_dict))
    for dotted in SESSION_KEYS:
        section, key = dotted.split(".")
        copy.get(section, {}).pop(key, None)
    return copy


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, dotted + ".")
        elif a != b:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs
