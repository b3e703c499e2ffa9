"""The per-worker training loop: the one place where steps happen.

Runs inside every Ray Train worker: build the workload and its DeepSpeed engine,
resume from Ray Train's latest checkpoint, step, log (rank 0), evaluate,
checkpoint and report to Ray Train.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from distdl.collectives import DeferredAnyRank, all_reduce_sum, gather_objects, world_size
from distdl.collectives import rank as process_rank
from distdl.config import Config, config_from_dict
from distdl.engine.checkpoints import (
    checkpoint_name,
    restore_rng_state,
    save_rng_state,
    saved_world_size,
    verify_manifests,
    write_manifest,
)
from distdl.engine.engine import Engine, EngineSet, offload_adam_factory
from distdl.errors import CheckpointError, ConfigError
from distdl.flops import ModelFlops, Utilization, WorldPeak, counted_flops, device_peak
from distdl.noise_scale import step_terms, with_noise_scale
from distdl.optim import (
    effective_lr,
    minibatch_noise_scale,
    minibatch_noise_weights,
    optimizer_factory,
    param_groups,
    scheduler_factory,
    with_noise,
)
from distdl.precision import set_tf32
from distdl.profiling import StepProfiler
from distdl.registry import WORKLOADS
from distdl.rundir import (
    CHECKPOINT_SCORE,
    METRICS_FILE,
    WANDB_ID_FILE,
    RunStorage,
    RunSummary,
    back_up_snapshot,
)
from distdl.seeds import micro_batch_seed
from distdl.stop_requests import SignalMarginCheck, stop_request_watch
from distdl.tracking import Tracker
from distdl.workloads.base import WorkerContext, Workload, initial_models


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's entry point; `payload` holds the resolved config as a plain dict."""
    import ray.train

    config = config_from_dict(payload["config"])
    context = worker_context(config)
    pull_run_files(config.run_storage)
    if config.scaling.use_gpu:
        set_tf32(config.engine.tf32)
    rank = context.rank
    workload: Workload = WORKLOADS.get(config.workload)(config.sections, context)
    engines = EngineSet({name: build_engine(model, config, payload["deepspeed_config"])
                         for name, model in initial_models(workload, config.run.seed).items()})
    resumed = ray.train.get_checkpoint() is not None
    start_step, model_flops = start(engines, workload, config.run.seed, rank, payload.get("start_from"))
    tracker = None
    if rank == 0:
        tracker = Tracker(config.tracking, config.run_dir, config.run.name, config.to_dict(),
                          payload["wandb_mode"], start_step, config.trainer.max_steps,
                          payload.get("console_is_terminal", False))
    with stop_request_watch(config.run_storage, rank) as stop_requested:
        run_steps(config, workload, engines, tracker, start_step, rank, model_flops,
                  report_evaluations=payload.get("report_evaluations", False),
                  previous_checkpoint=checkpoint_name(start_step) if resumed else None,
                  stop_requested=stop_requested, signal_seconds=payload.get("signal_seconds"))


def pull_run_files(storage: RunStorage) -> None:
    """A run on object storage: the driver's files (its tokenizer, say) into this node's working copy,
    pulled by one worker per node while the others wait."""
    import ray.train

    if not storage.remote:
        return
    if ray.train.get_context().get_local_rank() == 0:
        storage.pull()
    if dist.is_initialized():
        dist.barrier()


def quiet_worker(use_gpu: bool) -> None:
    """Keep what says nothing to a distdl user off the console (Ray forwards workers' output there).

    DeepSpeed is told its accelerator rather than guessing (CPU workers on a GPU node must not pick
    CUDA; on a CPU it warns that it guessed), torch's note that CUDA is absent and a deprecation
    warning DeepSpeed's own collectives trigger are dropped. Called before DeepSpeed is imported.
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # torch.profiler's Kineto logs every start and stop, and errors about the GPUs a CPU worker lacks.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:  # Ray Train logs every report at INFO under this file's path, which its log level misses
        from ray.train.v2._internal.execution import context as ray_train_context

        logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def worker_context(config: Config) -> WorkerContext:
    """This Ray Train worker's place, for a training run or a study's measurement job."""
    import ray.train
    import ray.train.torch

    quiet_worker(config.scaling.use_gpu)
    train_context = ray.train.get_context()
    # Ray gives each worker a CPU budget; more intra-op threads than that thrash (measured ~50x).
    torch.set_num_threads(config.scaling.cpus_per_worker)
    return WorkerContext(
        rank=train_context.get_world_rank(),
        world_size=train_context.get_world_size(),
        seed=config.run.seed,
        micro_batch_size=config.trainer.micro_batch_size,
        run_dir=config.run_dir,
        device=ray.train.torch.get_device(),
        gradient_accumulation_steps=config.trainer.gradient_accumulation_steps,
    )


def build_engine(model: torch.nn.Module, config: Config, ds_config: dict[str, Any]) -> Engine:
    make_optimizer = optimizer_factory(config.optimizer, config.trainer.global_batch_size, config.run.seed)
    if config.engine.offload_optimizer and config.optimizer.name in ("adam", "adamw"):
        make_optimizer = with_noise(offload_adam_factory(
            config.optimizer, effective_lr(config.optimizer, config.trainer.global_batch_size)),
            config.optimizer.noise, config.run.seed)
    return Engine(
        model,
        param_groups(model, config.optimizer.weight_decay),
        make_optimizer,
        scheduler_factory(config.scheduler, config.trainer.max_steps),
        ds_config,
        measure_noise=config.trainer.noise_scale,
        compile=config.trainer.compile,
        sharpness_aware=config.optimizer.sam,
    )


def fresh_start(engines: EngineSet, workload: Workload, seed: int, rank: int) -> int:
    if (checkpoint := workload.optimizer_warm_start()) is not None:
        engines.warm_start_optimizers(checkpoint)
    # Ranks draw differently, reproducibly, until the first micro-batch seeds its own draws (train_step):
    # what draws before it, such as a DataLoader's worker seeds.
    torch.manual_seed(seed + 1 + rank)
    return 0


def start(engines: EngineSet, workload: Workload, seed: int, rank: int,
          start_from: Optional[str]) -> tuple[int, Optional[ModelFlops]]:
    """Where training starts: the run's latest checkpoint; else `start_from`, another run's checkpoint
    (a population-based training trial cloning a better one), under this run's hyperparameters; else
    step 0. The step, and the model FLOPs counted so far (None: count them on the first step)."""
    import ray.train

    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            verify_on_each_node(Path(directory))
            return resume(engines, workload, seed, rank, Path(directory))
    if start_from is not None:
        verify_on_each_node(Path(start_from))
        return resume(engines, workload, seed, rank, Path(start_from), own_hyperparameters=True)
    return fresh_start(engines, workload, seed, rank), None


def verify_on_each_node(directory: Path) -> None:
    """The checkpoint's files against their manifests, once per node: every rank reads most of them
    (DeepSpeed loads every rank's ZeRO-1/2 shards), and a node's ranks share one copy (Ray Train
    downloads a checkpoint on object storage once per node)."""
    import ray.train

    if ray.train.get_context().get_local_rank() == 0:
        verify_manifests(directory)
    if dist.is_initialized():
        dist.barrier()


def resume(engines: EngineSet, workload: Workload, seed: int, rank: int, directory: Path,
           own_hyperparameters: bool = False) -> tuple[int, Optional[ModelFlops]]:
    """Load a checkpoint; the step it was saved at and the model FLOPs the run counted."""
    client_state = engines.load(directory, own_hyperparameters)
    workload.load_state_dict(client_state.get("workload", {}))
    # The loop's step (a GAN's engines may step different numbers of times).
    step = int(client_state.get("step", engines.primary.global_steps))
    if saved_world_size(directory) == world_size():
        restore_rng_state(directory, rank, engines.device)
    else:
        # Another worker count: ranks no longer match the saved random streams. Training micro-batches
        # seed their own (micro_batch_seed); what else draws starts anew from the seed, step and rank.
        torch.manual_seed(seed + 1 + rank + 1_000_003 * step)
    flops = client_state.get("model_flops")
    return step, ModelFlops(**flops) if flops else None


class Window:
    """Sums over the steps since the last log line, reduced across ranks when logged."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.step_sums: dict[str, float] = {}  # once per optimizer step, not per micro-batch
        self.steps = 0
        self.micro_batches = 0
        self.samples = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self.elapsed = 0.0  # of the window, once reduced

    def add(self, metrics: dict[str, Any], counts: dict[str, int]) -> None:
        for name, value in metrics.items():
            value = torch.as_tensor(value).detach().float().cpu() if not torch.is_tensor(value) else value.detach().float()
            self.sums[name] = self.sums.get(name, 0) + value
        self.micro_batches += 1
        self.samples += counts["samples"]
        self.tokens += counts["tokens"]

    def add_step(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.step_sums[name] = self.step_sums.get(name, 0.0) + value
        self.steps += 1

    def left_out(self, run: Callable[[], Any]) -> float:
        """Run `run` (a step that adds to this window) keeping its time and its samples and tokens
        out of the window's rates (its losses and metrics stay in); its seconds."""
        samples, tokens, started = self.samples, self.tokens, time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        self.started += seconds
        self.samples, self.tokens = samples, tokens
        return seconds

    def reduce(self, device: torch.device) -> dict[str, Optional[float]]:
        names, step_names = sorted(self.sums), sorted(self.step_sums)
        values = torch.stack([self.sums[n].to(device).reshape(()) for n in names]
                             + [torch.tensor(float(self.step_sums[n]), device=device) for n in step_names]
                             + [torch.tensor(float(x), device=device) for x in (self.samples, self.tokens)])
        all_reduce_sum(values)
        world = world_size()
        elapsed = self.elapsed = max(time.perf_counter() - self.started, 1e-9)
        means = {n: values[i].item() / (self.micro_batches * world) for i, n in enumerate(names)}
        means.update({n: values[len(names) + i].item() / (self.steps * world) for i, n in enumerate(step_names)})
        samples, tokens = values[-2].item(), values[-1].item()
        if not samples:  # every step of the window was left out of the rates
            return {**means, "samples_per_s": None, "tokens_per_s": None}
        return {**means, "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed}


class FiniteWatch:
    """Whether each step's metrics (loss included) and gradient norms were finite on this rank.

    Kept as device tensors, so watching costs no sync per step; `first_bad_step` all-reduces them
    at log and checkpoint steps, so every rank stops at the same step and nothing non-finite is saved.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.bad: list[torch.Tensor] = []
        self._current: Optional[torch.Tensor] = None

    def add(self, values: Iterable[Any]) -> None:
        for value in values:
            if value is None:
                continue
            tensor = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
            if not tensor.is_floating_point():
                continue
            bad = ~torch.isfinite(tensor).all()
            self._current = bad if self._current is None else self._current | bad.to(self._current.device)

    def end_step(self, step: int, device: torch.device) -> None:
        self.steps.append(step)
        self.bad.append(torch.zeros((), dtype=torch.bool, device=device) if self._current is None
                        else self._current.to(device))
        self._current = None

    def first_bad_step(self, device: torch.device) -> Optional[int]:
        """The first watched step whose values were not finite on any rank (every rank calls it)."""
        if not self.steps:
            return None
        flags = torch.stack(self.bad).float().to(device)
        all_reduce_sum(flags)
        bad = torch.nonzero(flags > 0).flatten().tolist()
        first = self.steps[bad[0]] if bad else None
        self.steps, self.bad = [], []
        return first


def noise_terms(engine: Engine, trainer: Any) -> dict[str, float]:
    """This step's estimates of |G|^2 and tr(Sigma) from this rank's gradient and the all-reduced one."""
    local, reduced = engine.gradient_sq_norms
    per_rank = trainer.micro_batch_size * trainer.gradient_accumulation_steps
    return step_terms(local, reduced, per_rank, trainer.global_batch_size)


@dataclass
class Schedule:
    """Which steps log, evaluate and checkpoint. `stop` is the session's last step; a stop rule may
    bring it forward, and that step then logs, evaluates and checkpoints as the last one does, except
    that a stop on request evaluates only where the checkpoint needs its score (a preemption's grace
    period is for the checkpoint)."""

    stop: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    # Checkpoints kept by a metric are scored, so each one is evaluated.
    scored_checkpoints: bool
    evaluate_at_stop: bool = True

    @classmethod
    def of(cls, trainer: Any, score_key: Optional[str]) -> Schedule:
        return cls(trainer.stop_at_step or trainer.max_steps, trainer.log_every, trainer.eval_every,
                   trainer.checkpoint_every, score_key is not None)

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.stop

    def checkpoints(self, step: int) -> bool:
        return bool(self.checkpoint_every and step % self.checkpoint_every == 0) or step == self.stop

    def evaluates(self, step: int) -> bool:
        return (bool(self.eval_every and step % self.eval_every == 0) or (step == self.stop and self.evaluate_at_stop)
                or (self.scored_checkpoints and self.checkpoints(step)))


@dataclass
class StopRules:
    """Why a session ends before its last step, decided alike on every rank: a target loss reached,
    a stop request (SIGTERM or SIGUSR1 to the driver; rank 0 watches for it), or a value that was not finite."""

    target_loss: Optional[float]
    stop_requested: Callable[[], bool]  # rank 0's answer; the others' is False
    at_loss: Optional[int] = None
    on_request: Optional[int] = None
    non_finite: Optional[int] = None
    _asked: Optional[DeferredAnyRank] = None

    def after_step(self, step: int, schedule: Schedule, rank: int, device: torch.device) -> None:
        """At every step, once its work is queued: a stop request rank 0 had seen by the previous step
        makes this step the last (it then logs and checkpoints). The question is all-reduced a step
        behind, so that no step waits for the answer."""
        if step >= schedule.stop:  # the last step checkpoints and completes anyway
            return
        if self._asked is not None and self._asked.result():
            self.on_request = schedule.stop = step
            schedule.evaluate_at_stop = False
            return
        self._asked = DeferredAnyRank(rank == 0 and self.stop_requested(), device)

    def after_log(self, step: int, metrics: dict[str, float], schedule: Schedule) -> None:
        """At a log step: a reached target loss makes this step the last."""
        # The window's loss is all-reduced, so every rank decides alike.
        if self.target_loss is not None and metrics.get("loss", float("inf")) <= self.target_loss:
            self.at_loss = schedule.stop = step
            schedule.evaluate_at_stop = True  # a completed run evaluates, whatever else asked it to stop

    def diverged(self, watch: FiniteWatch, device: torch.device) -> bool:
        """Whether any rank saw a non-finite value since the last check (a collective)."""
        self.non_finite = watch.first_bad_step(device)
        return self.non_finite is not None

    def summary(self) -> dict[str, Optional[int]]:
        return {"stopped_at_loss_step": self.at_loss, "stopped_on_request_step": self.on_request,
                "non_finite_step": self.non_finite}


def train_step(config: Config, workload: Workload, engines: EngineSet, batches: Iterator[dict], window: Window,
               watch: FiniteWatch, step: int) -> None:
    """One optimizer step: the accumulation steps' micro-batches through the workload, each watched
    and counted in the log window, then the step's gradient norms and noise-scale terms."""
    trainer = config.trainer
    first = process_rank() * trainer.gradient_accumulation_steps
    for accumulation_step in range(trainer.gradient_accumulation_steps):
        seed = micro_batch_seed(config.run.seed, step, first + accumulation_step)
        torch.manual_seed(seed)
        batch = engines.prepare_batch(next(batches))
        step_metrics = micro_batch_step(config, workload, engines, batch, seed)
        watch.add(step_metrics.values())
        window.add(step_metrics, workload.batch_size(batch))
    # fp16's dynamic loss scale overflows by design; DeepSpeed skips those steps itself.
    if config.engine.precision != "fp16":
        watch.add(engines.grad_norms())
    watch.end_step(step, engines.device)
    if trainer.noise_scale:
        window.add_step(noise_terms(engines.primary, trainer))


def micro_batch_step(config: Config, workload: Workload, engines: EngineSet, batch: dict[str, torch.Tensor],
                     seed: int) -> dict[str, torch.Tensor]:
    """One micro-batch's forward, backward and step: the workload's own, or around it SAM's or minibatch
    noise's (which the config allows only for single-model workloads without their own train_step)."""
    noise = config.optimizer.noise
    if noise is not None and noise.kind == "minibatch":
        trainer = config.trainer
        scale = minibatch_noise_scale(trainer.global_batch_size, trainer.micro_batch_size, noise.batch_size)
        # Its own generator (seeded apart from the micro-batch's dropout and masks), so resumes redraw it.
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, 1)).generate_state(1)[0]))
        return minibatch_noise_step(workload, engines.primary, batch, scale, generator)
    if config.optimizer.sam is not None:
        return sharpness_aware_step(workload, engines.primary, batch)
    return workload.train_step(engines.for_workload(), batch)


def minibatch_noise_step(workload: Workload, engine: Engine, batch: dict[str, torch.Tensor], scale: float,
                         generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The micro-batch's per-example losses reweighted (optim.minibatch_noise_weights), so that its
    gradient carries noise shaped like small-batch gradient noise; `loss` stays the plain mean."""
    losses, metrics = workload.example_losses(engine, batch)
    weights = minibatch_noise_weights(len(losses), scale, generator).to(losses.device)
    engine.backward((weights * losses).sum())
    engine.step()
    return {**metrics, "loss": losses.detach().mean()}


def sharpness_aware_step(workload: Workload, engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM: the engine's ascent on the workload's loss, then the workload's own step at the moved
    weights. `loss` is the loss at the weights themselves, as without SAM; `sam_loss` the moved one's."""
    loss = engine.ascend(lambda: workload.loss(engine, batch)[0])
    metrics = workload.train_step(engine, batch)
    return {**metrics, "loss": loss, "sam_loss": metrics["loss"]}


def counted_step(config: Config, workload: Workload, engines: EngineSet, batches: Iterator[dict], window: Window,
                 watch: FiniteWatch, step: int) -> ModelFlops:
    """The run's first step, with its model FLOPs counted (eagerly: torch.compile steps aside while
    the counter runs); what turns later windows' throughput into MFU (a collective)."""
    with counted_flops() as count:
        train_step(config, workload, engines, batches, window, watch, step)
    return ModelFlops.of(count, window.tokens, engines.device)


def session_peak(config: Config, engines: EngineSet, rank: int) -> WorldPeak:
    """This session's devices' peak (a collective); rank 0 warns when it is unknown."""
    peak = device_peak(engines.device, config.engine.precision, config.engine.tf32, config.trainer.peak_tflops)
    world_peak = WorldPeak.of(peak, engines.device)
    if rank == 0 and world_peak.tflops is None:
        warnings.warn(f"MFU is logged as unknown (null): {peak.source}")
    return world_peak


# Where torch.compile's own code lives: an error raised there is the compiler failing, not the model.
_COMPILER_PACKAGES = ("torch/_dynamo/", "torch/_inductor/", "torch/_functorch/")


def compile_failure(error: BaseException) -> Optional[str]:
    """The reason, when `error` is torch.compile failing to trace or compile (else None): a dynamo
    or Inductor exception, or any error raised inside the compiler's own code (dynamo raises some
    as plain AssertionErrors)."""
    from torch._dynamo.exc import TorchDynamoException

    frames = traceback.extract_tb(error.__traceback__)
    raised_in_compiler = bool(frames) and any(package in frames[-1].filename.replace("\\", "/")
                                               for package in _COMPILER_PACKAGES)
    out_of_memory = isinstance(error, (MemoryError, torch.OutOfMemoryError))
    if out_of_memory or not (isinstance(error, TorchDynamoException) or raised_in_compiler):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


@contextmanager
def compile_failures_named(config: Config) -> Iterator[None]:
    """With trainer.compile, torch.compile failing (at the first compiled step, a recompilation, or
    evaluation's graph) ends the run with the reason and the way out."""
    if not config.trainer.compile:
        yield
        return
    try:
        yield
    except Exception as error:
        reason = compile_failure(error)
        if reason is None:
            raise
        # The compiler's own traceback, for a bug report; the error itself may hold what cannot be
        # pickled back to the driver, so the run ends with the reason alone.
        traceback.print_exception(error)
        raise ConfigError(f"trainer.compile=true: torch.compile could not compile the {config.workload} model "
                          f"({reason}); set trainer.compile=false to train it uncompiled") from None


def run_steps(config: Config, workload: Workload, engines: EngineSet, tracker: Optional[Tracker],
              start_step: int, rank: int, model_flops: Optional[ModelFlops] = None,
              report_evaluations: bool = False, previous_checkpoint: Optional[str] = None,
              stop_requested: Callable[[], bool] = lambda: False, signal_seconds: Optional[int] = None) -> None:
    """Train from `start_step` to the schedule's stop, logging, evaluating and checkpointing on its
    steps, until a stop rule ends the session; then write the summary. With `report_evaluations`
    (a run inside a Tune trial), an evaluation without a checkpoint is reported to Ray Train too,
    so that Tune's scheduler sees every one. `previous_checkpoint`: the run's own checkpoint it resumed
    from (not another run's that it started from). `stop_requested`: whether the run was asked to stop
    (rank 0's watch); `signal_seconds`: how long before its time limit Slurm warns the job, if it does."""
    session_started, session_clock = time.perf_counter(), config.run_storage.clock()
    score_key = workload.checkpoint_metric(config.sections)
    schedule = Schedule.of(config.trainer, score_key)
    storage = config.run_storage
    rules = StopRules(config.trainer.stop_at_loss, stop_requested)
    margin = SignalMarginCheck(signal_seconds, storage)
    batches = workload.train_batches(start=start_step * config.trainer.gradient_accumulation_steps)
    peak = session_peak(config, engines, rank)  # before the first window's clock starts
    window, watch, logged = Window(), FiniteWatch(), {}
    profiler = StepProfiler(config.trainer.profile_steps, rank, world_size(), config.run_dir, engines.device,
                            config.trainer.profile_memory, config.trainer.profile_stacks)
    # The model FLOPs are counted once per run, on its first step, and kept in its checkpoints: a
    # resumed compiled run then runs no eager step, whose dropout draws would differ from Inductor's.
    utilization = Utilization(model_flops, peak) if model_flops else None
    compile_s: Optional[float] = None
    engines.train(True)
    step = start_step
    for step in range(start_step + 1, schedule.stop + 1):
        profiler.begin(step)
        with compile_failures_named(config):
            if utilization is None:
                utilization = Utilization(counted_step(config, workload, engines, batches, window, watch, step), peak)
            elif config.trainer.compile and compile_s is None:
                # The first compiled step compiles: its time and samples stay out of the step rate.
                compile_s = window.left_out(lambda: train_step(config, workload, engines, batches, window, watch, step))
            else:
                train_step(config, workload, engines, batches, window, watch, step)
        profiler.end(step)
        if tracker:
            tracker.advance()
        rules.after_step(step, schedule, rank, engines.device)
        metrics: dict[str, Any] = {}
        log_step = schedule.logs(step)
        if log_step:
            throughput = window.reduce(engines.device)
            metrics = {**with_noise_scale(throughput), **utilization.window(throughput["tokens_per_s"], window.elapsed),
                       **engines.log_metrics()}
            if compile_s is not None and "compile_s" not in logged:
                metrics["compile_s"] = compile_s
            rules.after_log(step, metrics, schedule)
        checkpoint_step = schedule.checkpoints(step)
        # Before evaluating and saving: a diverged model is never saved over the last good checkpoint.
        if (log_step or checkpoint_step) and rules.diverged(watch, engines.device):
            if metrics and tracker:
                tracker.log(step, metrics)
            break
        evaluate = schedule.evaluates(step)
        if evaluate or checkpoint_step:
            engines.average_buffers()
        if evaluate:
            with compile_failures_named(config):  # evaluation compiles its own graph
                metrics.update(workload.evaluate(engines.for_workload(), step))
        if metrics and tracker:
            tracker.log(step, metrics)
        logged.update(metrics)
        if checkpoint_step:
            reported = {**metrics, CHECKPOINT_SCORE: metrics[score_key]} if score_key else metrics
            saving = time.perf_counter()
            save_and_report(engines, workload, storage, rank, step, reported, previous_checkpoint,
                            utilization.model_flops)
            if rank == 0:
                margin.after_save(time.perf_counter() - saving, logged.get("samples_per_s"),
                                  config.trainer.global_batch_size)
            previous_checkpoint = checkpoint_name(step)
        elif evaluate and report_evaluations:
            import ray.train

            ray.train.report(numeric_metrics(step, metrics))  # every rank, as Ray Train wants
        if log_step:
            window = Window()  # after eval and checkpoint, so throughput counts training time only
        if step == schedule.stop:
            break
    profiler.close()
    usage = {**utilization.summary(), "compile_s": compile_s} if utilization else {}
    summary = run_summary(config, workload, engines, step, rules.summary(), logged,
                          time.perf_counter() - session_started, usage)
    if tracker:
        tracker.finish(summary)
        storage.push_written_since(session_clock)  # metrics, summary, W&B's offline run, samples, traces
    else:
        storage.push_files(profiler.written)


def run_summary(config: Config, workload: Workload, engines: EngineSet, step: int, stops: dict[str, Optional[int]],
                final: dict[str, Any], wall_time_s: float, utilization: dict[str, Any]) -> RunSummary:
    """summary.json: where the session ended and why, what each rank holds, the final metrics (every rank calls it)."""
    trainer = config.trainer
    completed = stops["non_finite_step"] is None and (step >= trainer.max_steps or stops["stopped_at_loss_step"] is not None)
    return {
        "steps": step,
        "max_steps": trainer.max_steps,
        "completed": completed,
        **stops,
        "world_size": world_size(),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "global_batch_size": trainer.global_batch_size,
        "session_wall_time_s": wall_time_s,
        "parameter_checksums": gather_objects(engines.parameter_checksum()),
        "ray_node_ids": gather_objects(ray_node_id()),
        "memory_per_rank": gather_objects(engines.memory_report()),
        "optimizers": engines.optimizers(),
        "trainable_parameters": engines.trainable_parameters(),
        "final": final,
        "utilization": utilization,
        **workload.summary(),
    }


def save_and_report(engines: EngineSet, workload: Workload, storage: RunStorage, rank: int, step: int,
                    metrics: dict[str, Any], previous: Optional[str], model_flops: ModelFlops) -> None:
    """Every rank writes its shards into a local temporary directory; Ray Train copies them into one
    checkpoint in storage and records it as the latest only once every rank's copy is complete, so a
    crash or a full disk mid-save leaves the previous checkpoint the one a rerun resumes from.

    Rank 0 first copies Ray Train's record of the `previous` checkpoint: the controller rewrites it in
    place, and a full disk would otherwise leave no record of any complete checkpoint. On object
    storage it pushes the metrics so far with the checkpoint (a resume keeps those up to it)."""
    import ray.train

    name = checkpoint_name(step)
    try:
        if rank == 0 and previous is not None:
            back_up_snapshot(storage, previous)
        if rank == 0:
            storage.push(METRICS_FILE, WANDB_ID_FILE)
        with tempfile.TemporaryDirectory(prefix="distdl-ckpt-") as directory:
            engines.save(directory, client_state={"step": step, "workload": workload.state_dict(),
                                                  "model_flops": dataclasses.asdict(model_flops)})
            save_rng_state(directory, rank, engines.device)
            write_manifest(directory, rank, world_size())
            ray.train.report(numeric_metrics(step, metrics), checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=name)
    except OSError as err:
        raise CheckpointError(f"could not write the checkpoint of step {step} to {storage.location(name)} ({err}); "
                              "the run's previous checkpoint is kept and a rerun resumes from it") from err


def numeric_metrics(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a step reports to Ray Train (and through it to Tune): the step and the numbers."""
    return {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def ray_node_id() -> Optional[str]:
    """This worker's Ray node (None in Ray Train's local mode, where no Ray runs)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
