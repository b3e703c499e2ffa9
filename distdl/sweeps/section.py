"""A sweep's own settings (the `sweep:` section): the search space over dotted config keys, the
metric and mode, the scheduler and the budget; checked against the training config before any
trial starts, and turned into Ray Tune's search space and scheduler.

    sweep:
      name: glue-mrpc-search          # the sweep directory, under run.storage_path
      space:                          # any dotted key of the training config
        optimizer.lr: {grid: [5.0e-5, 4.0e-5, 3.0e-5, 2.0e-5]}
        trainer.global_batch_size: {choice: [16, 32]}
        optimizer.weight_decay: {uniform: [0.0, 0.1]}
        scheduler.warmup_ratio: {loguniform: [0.01, 0.2]}
      search: basic                   # basic (grid points crossed, the rest drawn at random) or optuna
      samples: 1                      # basic: each grid point this many times; optuna: the trial budget
      metric: eval_f1                 # default: the workload's checkpoint metric
      mode: max
      scheduler: asha                 # none, asha or pbt
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal, Optional

from annotated_types import Gt, Interval

from distdl.config import AtLeastOne, Config, Finite, build_section, config_from_dict, set_dotted
from distdl.errors import ConfigError
from distdl.registry import WORKLOADS

SWEEP_KEY = "sweep"
# How a key's values are given: every one of a list (grid), one of a list at random (choice), or a
# number drawn uniformly on a linear or a log scale between two bounds.
KINDS = ("grid", "choice", "uniform", "loguniform")
# ASHA runs until a trial ends by itself: its last rung lies beyond any run's steps.
UNBOUNDED_STEPS = 2**31


@dataclass
class SweepSection:
    # The sweep directory's name, under the training config's run.storage_path (default: <run.name>-sweep).
    name: Optional[str] = None
    space: dict[str, Any] = field(default_factory=dict)
    # basic: Tune's variant generator, which crosses the grid keys and draws the others at random.
    # optuna: Optuna's TPE sampler (Bergstra et al. 2011; seeded by run.seed), which draws each
    # trial's values from the trials finished before it; its keys are choice, uniform or loguniform.
    search: Literal["basic", "optuna"] = "basic"
    # Tune's num_samples. basic: every grid point this many times, each with its own draw of the
    # other keys; optuna: how many trials it proposes.
    samples: AtLeastOne = 1
    # What ranks the trials (an evaluation metric of the workload) and whether higher is better.
    metric: Optional[str] = None
    mode: Optional[Literal["max", "min"]] = None
    # asha: Li et al. 2020's asynchronous successive halving, which stops a trial at one of its
    # evaluations when it is outside the best 1/reduction_factor of the trials that reached that step.
    # pbt: Jaderberg et al. 2017's population-based training. The trials train side by side; every
    # perturbation_steps, one in the bottom quantile_fraction continues from the latest checkpoint
    # of one in the top fraction, with that trial's settings, its optimizer keys perturbed (x0.8 or
    # x1.2, a neighbouring listed value, or with resample_probability a fresh draw).
    scheduler: Literal["none", "asha", "pbt"] = "none"
    # ASHA's first rung, in optimizer steps (default: the first evaluation, trainer.eval_every);
    # the next rungs lie reduction_factor times further each.
    grace_steps: Optional[AtLeastOne] = None
    reduction_factor: Annotated[float, Gt(1), Finite] = 3.0
    # PBT's interval in optimizer steps (default: trainer.checkpoint_every, which must equal
    # trainer.eval_every: a trial reports its checkpoint with each evaluation).
    perturbation_steps: Optional[AtLeastOne] = None
    quantile_fraction: Annotated[float, Interval(gt=0, le=0.5)] = 0.25
    resample_probability: Annotated[float, Interval(ge=0, le=1)] = 0.25
    # PBT: every trial waits at each interval until the whole population has reached it, and the
    # trials are ranked together (each decision then independent of which trial ran faster); a
    # trial that waits is paused and goes on from its checkpoint as a new run.
    synchronous: bool = False
    # Trials trained at once; null: as many as the Ray cluster holds side by side.
    max_concurrent_trials: Optional[AtLeastOne] = None


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str
    values: tuple[Any, ...]


def parse_sweep(values: dict[str, Any], training: dict[str, Any]) -> tuple[SweepSection, list[Dimension]]:
    """The validated section and its search space over the training config (as written, before its
    derived values are resolved); every error names the key at fault."""
    base = config_from_dict(copy.deepcopy(training))
    section = build_section(SweepSection, values, SWEEP_KEY)
    if section.name is None:
        section.name = f"{base.run.name}-sweep"
    if not section.name or "/" in section.name:
        raise ConfigError(f"sweep.name={section.name!r} must be a non-empty name without '/'")
    if not isinstance(section.space, dict) or not section.space:
        raise ConfigError("sweep.space is empty: give at least one dotted config key, e.g. "
                          "optimizer.lr: {grid: [3.0e-5, 5.0e-5]}")
    dimensions = [parse_dimension(key, spec) for key, spec in flat_space(section.space).items()]
    check_values(dimensions, base, training)
    if section.search == "optuna":
        check_optuna(dimensions)
    section.metric, section.mode = ranking(section, base)
    if section.scheduler == "asha":
        section.grace_steps = section.grace_steps or first_evaluation(base)
    if section.scheduler == "pbt":
        if section.search != "basic":
            raise ConfigError(f"sweep.scheduler=pbt explores by itself, around its initial population; it does not "
                              f"combine with sweep.search={section.search} (Tune's PBT refuses a searcher): use "
                              "sweep.search=basic")
        section.perturbation_steps = perturbation_interval(section, dimensions, base)
    return section, dimensions


def flat_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The space with dotted keys: `optimizer: {lr: {grid: ...}}` (what a command-line override
    sweep.space.optimizer.lr=... writes) is `optimizer.lr: {grid: ...}`; a later entry for the same
    key replaces an earlier one, as an override replaces the file's."""
    flat: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, dict) and spec and not (len(spec) == 1 and next(iter(spec)) in KINDS):
            for inner, inner_spec in flat_space(spec, f"{prefix}{key}.").items():
                flat.pop(inner, None)
                flat[inner] = inner_spec
        else:
            flat.pop(prefix + key, None)
            flat[prefix + key] = spec
    return flat


def parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"sweep.space.{key}"
    if key.split(".")[0] in ("run", SWEEP_KEY):
        raise ConfigError(f"{where}: run.* and sweep.* name and place the trials; they cannot be searched")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}={spec!r} must be one of {{grid: [...]}}, {{choice: [...]}}, "
                          "{uniform: [low, high]}, {loguniform: [low, high]}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}={values!r} must be a non-empty list")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                or not values[0] < values[1]:
            raise ConfigError(f"{where}.{kind}={values} must be two numbers [low, high] with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}.loguniform={values}: a log-uniform draw needs low > 0")
    elif len({repr(v) for v in values}) != len(values):
        raise ConfigError(f"{where}.{kind}={values} lists a value twice")
    return Dimension(key, kind, tuple(values))


# Up to this many combinations of the searched values are each checked as a whole config; beyond,
# each key's values are checked alone.
MAX_CHECKED_COMBINATIONS = 1000


def check_optuna(dimensions: list[Dimension]) -> None:
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search=optuna needs the optuna package, which is not installed here: "
                          "pip install 'distdl[optuna]' (or sweep.search=basic)")
    for dimension in dimensions:
        if dimension.kind == "grid":
            raise ConfigError(f"sweep.space.{dimension.key}: sweep.search=optuna draws every value itself and runs "
                              f"no grid; give it as {{choice: {list(dimension.values)}}}")


def check_values(dimensions: list[Dimension], base: Config, training: dict[str, Any]) -> None:
    """Every combination of the values the keys may take (a range by its two bounds), set on the
    training config, must give a valid config: a trial never fails on a setting known before it starts."""
    tree = base.to_dict()
    for dimension in dimensions:
        if not is_key(tree, dimension.key):
            raise ConfigError(f"sweep.space.{dimension.key} is not a key of the training config")
    if math.prod(len(d.values) for d in dimensions) <= MAX_CHECKED_COMBINATIONS:
        combinations = itertools.product(*[[(d.key, v) for v in d.values] for d in dimensions])
    else:
        combinations = ([(d.key, v)] for d in dimensions for v in d.values)
    for combination in combinations:
        raw = copy.deepcopy(training)
        for key, value in combination:
            set_dotted(raw, key, value)
        try:
            config_from_dict(raw)
        except ConfigError as err:
            shown = " ".join(f"{key}={value!r}" for key, value in combination)
            raise ConfigError(f"sweep.space: the trial with {shown} would have an invalid config: {err}") from err


def is_key(tree: dict[str, Any], dotted: str) -> bool:
    """Whether the config has this dotted key; below an optional section left out (null), any key is
    the config's to check when it is set."""
    for part in dotted.split("."):
        if tree is None:
            return True
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def ranking(section: SweepSection, base: Config) -> tuple[str, str]:
    """The metric the trials are ranked by, and its mode; the workload's checkpoint metric by default."""
    workload = WORKLOADS.get(base.workload)
    reported = workload.evaluation_metrics(base.sections)
    if section.metric is None:
        metric = workload.checkpoint_metric(base.sections)
        if metric is None:
            raise ConfigError(f"set sweep.metric (and sweep.mode): the {base.workload} workload has no default; it "
                              f"reports {', '.join(reported) or 'no evaluation metrics'}")
        return metric, section.mode or "max"
    if section.metric not in reported:
        raise ConfigError(f"sweep.metric={section.metric!r} is not reported by the {base.workload} workload's "
                          f"evaluations here; it reports: {', '.join(reported) or 'nothing'}")
    if section.mode is None:
        raise ConfigError(f"sweep.metric={section.metric}: set sweep.mode to max or min (is higher better?)")
    return section.metric, section.mode


def first_evaluation(base: Config) -> int:
    every = base.trainer.eval_every
    if not every:
        raise ConfigError("sweep.scheduler=asha stops trials at their evaluations: set trainer.eval_every "
                          "(steps, or epoch) to evaluate during training")
    return every if isinstance(every, int) else 1


# What population-based training may change in a trial that continues from another's checkpoint:
# the optimizer's settings, which the run's own config sets over the loaded state (Engine.load).
PBT_KEYS = ("optimizer.lr", "optimizer.weight_decay", "optimizer.momentum", "optimizer.eps")


def perturbation_interval(section: SweepSection, dimensions: list[Dimension], base: Config) -> int:
    """PBT's interval in steps; refuses a sweep whose trials report no checkpoint with their
    evaluations, or which searches nothing PBT can perturb."""
    trainer = base.trainer
    if not trainer.checkpoint_every or trainer.eval_every != trainer.checkpoint_every:
        raise ConfigError(f"sweep.scheduler=pbt continues trials from the checkpoints they report with their "
                          f"evaluations: set trainer.eval_every and trainer.checkpoint_every to the same steps (they "
                          f"are {trainer.eval_every} and {trainer.checkpoint_every})")
    if not any(d.key in PBT_KEYS for d in dimensions):
        raise ConfigError(f"sweep.scheduler=pbt perturbs {', '.join(PBT_KEYS)} as it trains; sweep.space searches "
                          f"none of them ({', '.join(d.key for d in dimensions)})")
    interval = section.perturbation_steps
    if interval is None:
        if not isinstance(trainer.checkpoint_every, int):
            raise ConfigError(f"sweep.scheduler=pbt: trainer.checkpoint_every={trainer.checkpoint_every}; give "
                              "sweep.perturbation_steps in optimizer steps")
        interval = trainer.checkpoint_every
    return interval


def population(section: SweepSection, dimensions: list[Dimension]) -> int:
    """How many trials the sweep runs: each grid point `samples` times (Optuna: `samples`)."""
    return section.samples * math.prod(len(d.values) for d in dimensions if d.kind == "grid")


def search_space(dimensions: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's param_space: one entry per searched key."""
    from ray import tune

    samplers = {"grid": tune.grid_search, "choice": tune.choice,
                "uniform": lambda bounds: tune.uniform(*bounds), "loguniform": lambda bounds: tune.loguniform(*bounds)}
    return {d.key: samplers[d.kind](list(d.values)) for d in dimensions}


def search_algorithm(section: SweepSection, seed: int) -> Optional[Any]:
    """Tune's searcher; None: its variant generator (grid and random draws)."""
    if section.search == "basic":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)


def trial_scheduler(section: SweepSection, dimensions: list[Dimension]) -> Optional[Any]:
    if section.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if section.scheduler == "asha":
        return ASHAScheduler(time_attr="step", max_t=UNBOUNDED_STEPS, grace_period=section.grace_steps,
                             reduction_factor=section.reduction_factor)
    mutable = [d for d in dimensions if d.key in PBT_KEYS]
    space = search_space(mutable)
    mutations = {d.key: list(d.values) if d.kind in ("grid", "choice") else space[d.key] for d in mutable}
    return PopulationBasedTraining(
        time_attr="step", perturbation_interval=section.perturbation_steps, hyperparam_mutations=mutations,
        quantile_fraction=section.quantile_fraction, resample_probability=section.resample_probability,
        synch=section.synchronous, custom_explore_fn=partial(within_bounds, [d for d in mutable if d.kind in ("uniform", "loguniform")]))


def within_bounds(ranges: list[Dimension], config: dict[str, Any]) -> dict[str, Any]:
    """A perturbed value (x0.8 or x1.2) back inside its key's [low, high]: momentum 0.9 x 1.2 is no momentum."""
    for dimension in ranges:
        low, high = dimension.values
        config[dimension.key] = min(max(config[dimension.key], low), high)
    return config


def trial_name(trial_id: str, values: dict[str, Any], start_step: Optional[int] = None) -> str:
    """A trial's run directory name: its index (Tune numbers the basic search's trials; a searcher's
    trials have a random id instead), then each searched key's last part and value; under PBT, a
    trial that continues from another's checkpoint is a new run, named after the step it starts at."""
    index = trial_id.rsplit("_", 1)[-1]
    parts = [f"{key.rsplit('.', 1)[-1]}{value:.4g}" if isinstance(value, float) else f"{key.rsplit('.', 1)[-1]}{value}"
             for key, value in values.items()]
    name = re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join([f"trial{index}", *parts]))
    return name[:120] if start_step is None else f"{name[:110]}-from{start_step}"
