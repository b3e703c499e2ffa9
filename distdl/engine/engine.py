"""`Engine`: a model with its optimizer and LR schedule inside a DeepSpeed engine, and `EngineSet`, a
workload's engines (one, or a GAN's two). Everything above the engine talks to these; only the
`distdl.engine` package imports deepspeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from distdl.collectives import all_reduce_sum, distributed, world_size
from distdl.config import OptimizerSection, SharpnessAwareSection
from distdl.engine.checkpoints import deepspeed_tag, engine_folder
from distdl.engine.safe_loading import tensors_only
from distdl.engine.zero_fragments import fragment_layouts
from distdl.errors import CheckpointError
from distdl.optim import LangevinNoise
from distdl.optim.layerwise import LayerwiseOptimizer


def offload_adam_factory(section: OptimizerSection, lr: float) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    """DeepSpeed's vectorized CPU Adam/AdamW, for optimizer states offloaded to CPU memory (as Accelerate
    uses it): torch's AdamW steps CPU tensors one parameter at a time. Its C++ op is compiled on first
    use, once per machine (cached in ~/.cache/torch_extensions; launch/install.sh builds it)."""

    def make(params: Iterable[Any]) -> torch.optim.Optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if not _cpu_adam_built():
            print("distdl: compiling DeepSpeed's CPU Adam op for the offloaded optimizer (once per machine, "
                  "a minute or more)", flush=True)
        return DeepSpeedCPUAdam(params, lr=lr, betas=tuple(section.betas), eps=section.eps,
                                weight_decay=section.weight_decay, adamw_mode=section.name == "adamw")

    return make


def _cpu_adam_built() -> bool:
    """Whether DeepSpeed's CPU Adam op is already compiled here (prebuilt, or in torch's JIT cache)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    try:
        import importlib

        importlib.import_module(builder.absolute_name())  # built with DS_BUILD_CPU_ADAM=1
        return True
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so").is_file()
    except Exception:  # a private torch helper: if it moves, only the notice is lost
        return False


class Engine:
    """A model (with its optimizer and LR schedule) inside a DeepSpeed engine."""

    def __init__(
        self,
        model: torch.nn.Module,
        parameters: list[dict[str, Any]],
        make_optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        make_scheduler: Optional[Callable[[torch.optim.Optimizer], Any]],
        ds_config: dict[str, Any],
        measure_noise: bool = False,
        compile: bool = False,
        sharpness_aware: Optional[SharpnessAwareSection] = None,
    ) -> None:
        import deepspeed

        self.ds_config = ds_config
        self.measure_noise = measure_noise
        self.sharpness_aware = sharpness_aware
        # While SAM's perturbed pass runs: each weight and batch-norm buffer with its value before it.
        self._unperturbed: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ascending = False
        self.compute_dtype = compute_dtype(ds_config)
        # DeepSpeed casts parameters to bf16/fp16 but not buffers; batch norm then meets fp32 running
        # statistics with bf16 inputs and weights and refuses. The buffers go to the compute dtype too,
        # as model.to(dtype) would do.
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(self.compute_dtype)
        # (this rank's |g|^2, the all-reduced |g|^2) of the last optimizer step, when measure_noise.
        self.gradient_sq_norms: Optional[tuple[float, float]] = None
        self._engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=parameters,
            optimizer=make_optimizer,
            lr_scheduler=make_scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        undo_initial_step(self._engine.optimizer)
        if isinstance(self.inner_optimizer, LayerwiseOptimizer):
            self.inner_optimizer.set_layouts(fragment_layouts(self._engine.optimizer))
        if isinstance(self.inner_optimizer, LangevinNoise) and fragment_layouts(self._engine.optimizer):
            # Each rank steps its own partition of the weights: its own noise for it.
            self.inner_optimizer.noise_stream = dist.get_rank() if distributed() else 0
        if compile:
            # DeepSpeed's engine.compile() compiles the module in place (nn.Module.compile), so its
            # parameter names, checkpoints and exports are those of the uncompiled model, and ZeRO-3's
            # hooks stay outside the compiled graph. Compilation happens at the first forward.
            self._engine.compile()
        if world_size() == 1 and self._engine.zero_optimization_stage() == 0:
            # Alone, DeepSpeed would still flatten every gradient into buckets, "all-reduce" each with
            # itself and copy it back: 8% of a BERT fine-tuning step on CPU, for no change.
            self._engine.enable_backward_allreduce = False
        # DeepSpeed reports the global gradient norm from its ZeRO and mixed-precision optimizers only;
        # at ZeRO-0 in fp32 it clips without keeping the norm, so distdl measures it itself.
        self._measures_grad_norm = self._engine.zero_optimization_stage() == 0 and self.compute_dtype == torch.float32
        self._grad_norm: Optional[torch.Tensor] = None

    # -- training
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward, with floating-point inputs in the dtype it computes in."""
        # SAM's first pass goes around DeepSpeed's forward, whose outputs carry hooks that refuse any
        # backward but the engine's (it takes autograd.grad for one).
        forward = self._engine.module if self._ascending else self._engine
        return forward(*self.cast(args), **self.cast(kwargs))

    def cast(self, value: Any) -> Any:
        """Floating-point tensors (in dicts, lists and tuples too) in the engine's compute dtype, as HF
        Trainer prepares inputs for DeepSpeed: DeepSpeed casts the model for bf16 and fp16, not its
        inputs. Integer tensors (token ids, class labels) stay as they are."""
        return cast_floating(value, self.compute_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if not (self.measure_noise and self._engine.is_gradient_accumulation_boundary()):
            self._engine.backward(loss)
            return
        # Hold back DeepSpeed's all-reduce to see this rank's own gradient first, then reduce as it would.
        with self._engine.no_sync():
            self._engine.backward(loss)
        local = self._gradient_sq_norm()
        self._engine.allreduce_gradients()
        self.gradient_sq_norms = (local, self._gradient_sq_norm())

    def _gradient_sq_norm(self) -> float:
        grads = [p.grad for p in self._engine.module.parameters() if p.grad is not None]
        return float(sum(g.detach().float().pow(2).sum() for g in grads))

    def step(self) -> None:
        """Called after every micro-batch; DeepSpeed steps the optimizer at accumulation boundaries."""
        if self._measures_grad_norm and self._engine.is_gradient_accumulation_boundary():
            # The all-reduced gradients clipping is about to see; a device tensor (no sync).
            grads = [p.grad for p in self._engine.module.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self._restore_unperturbed()
        if isinstance(self.inner_optimizer, LangevinNoise):
            self.inner_optimizer.noise_step = self.global_steps
        self._engine.step()

    def ascend(self, loss_of: Callable[[], torch.Tensor]) -> torch.Tensor:
        """SAM's first pass (Foret et al. 2021, Algorithm 1) on this micro-batch: the gradient g of
        `loss_of()` at the weights w, then w + rho g / |g| (ASAM: w + rho T^2 g / |T g|, T = |w|).
        The workload's own forward and backward then run there, and `step` puts w back first, so the
        optimizer steps w with the gradient taken at w + e. Returns the loss at w.

        g is this rank's micro-batch gradient, not all-reduced: Foret et al. perturb each
        accelerator's weights by its own batch's gradient ("m-sharpness", m the per-device batch;
        smaller m generalized better in their section 4.1), which also costs no communication. Batch
        norm's running statistics keep this pass's update, not the perturbed pass's."""
        section = self.sharpness_aware
        assert section is not None, "the engine was built without optimizer.sam"
        params = [p for p in self._engine.module.parameters() if p.requires_grad]
        self._ascending = True
        try:
            loss = loss_of()
            # autograd.grad, not backward: DeepSpeed's gradient buffers and hooks stay untouched.
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            self._ascending = False
        moved = [(p, g) for p, g in zip(params, grads) if g is not None]
        with torch.no_grad():
            scales = [p.detach().float().abs() if section.adaptive else None for p, _ in moved]
            directions = [g.float() if t is None else t * g.float() for (_, g), t in zip(moved, scales)]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in directions]))
            factor = section.rho / (norm + 1e-12)
            kept = [p for p, _ in moved] + list(self._engine.module.buffers())
            self._unperturbed = [(t, t.detach().clone()) for t in kept]
            for (param, _), direction, scale in zip(moved, directions, scales):
                step = direction * factor if scale is None else direction * scale * factor
                param.add_(step.to(param.dtype))
        return loss.detach()

    def _restore_unperturbed(self) -> None:
        with torch.no_grad():
            for tensor, value in self._unperturbed:
                tensor.copy_(value)
        self._unperturbed = []

    def train(self, mode: bool = True) -> None:
        self._engine.train(mode)

    @property
    def module(self) -> torch.nn.Module:
        return self._engine.module

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @property
    def global_steps(self) -> int:
        return int(self._engine.global_steps)

    def lr(self) -> float:
        return float(self._engine.get_lr()[0])

    def grad_norm(self) -> Optional[float]:
        norm = self.raw_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def raw_grad_norm(self) -> Optional[torch.Tensor | float]:
        """The last optimizer step's global gradient norm as DeepSpeed keeps it (a tensor is not synced)."""
        return self._grad_norm if self._measures_grad_norm else self._engine.get_global_grad_norm()

    def full_parameters(self) -> list[torch.Tensor]:
        """Every weight in fp32 on the CPU (gathered under ZeRO-3, so a collective there)."""
        import deepspeed

        params = list(self._engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [param.detach().float().cpu().clone() for param in params]

    def trainable_parameters(self) -> int:
        """The model's trainable weights, counted whole under ZeRO-3 (ds_numel) as without it."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self._engine.module.parameters() if p.requires_grad)

    def parameter_checksum(self) -> str:
        """sha256 of this rank's full fp32 weights (gathered under ZeRO-3); equal on every rank."""
        import hashlib

        digest = hashlib.sha256()
        for param in self.full_parameters():
            digest.update(param.numpy().tobytes())
        return digest.hexdigest()

    def average_buffers(self) -> None:
        """Make floating-point buffers (batch-norm running statistics) the mean over ranks.

        Each rank updates them from its own batches; DeepSpeed neither syncs nor broadcasts them.
        Averaging before evaluation and checkpoints (as timm's distribute_bn does) makes every
        rank evaluate, save and resume the same model.
        """
        buffers = [b for b in self._engine.module.buffers() if b.is_floating_point()]
        if not buffers or not distributed():
            return
        flat = all_reduce_sum(torch.cat([b.detach().reshape(-1).float() for b in buffers])) / world_size()
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer distdl built, under ZeRO's or the mixed-precision wrapper."""
        optimizer = self._engine.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def memory_report(self) -> dict[str, float]:
        """What this rank holds, in MiB: parameters (its ZeRO-3 partition) and optimizer state
        (its ZeRO-1/2/3 partition), and the process's peak (GPU allocated, or CPU resident)."""
        import resource

        mib = 2**20
        parameters = sum(_partition(p).numel() * _partition(p).element_size() for p in self._engine.module.parameters())
        state = sum(t.numel() * t.element_size() for per_param in self.inner_optimizer.state.values()
                    for t in per_param.values() if torch.is_tensor(t))
        report = {"parameters_mib": parameters / mib, "optimizer_state_mib": state / mib}
        if self.device.type == "cuda":
            report["peak_gpu_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / mib
        else:
            report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return report

    # -- checkpoints
    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        """Every rank calls this; each writes its own shards into `directory`."""
        self._engine.save_checkpoint(str(directory), tag=deepspeed_tag(self.global_steps), client_state=client_state)

    def load(self, directory: str | Path, own_hyperparameters: bool = False) -> dict[str, Any]:
        """Restore weights, optimizer, LR schedule and step; return the saved client state.

        With `own_hyperparameters` (another run's checkpoint, as population-based training clones
        one), this run's optimizer settings (lr, weight decay, momentum, betas, ...) replace the
        saved ones, and its LR schedule goes on from the saved step with this run's peak rate."""
        if not own_hyperparameters:
            return self._load_checkpoint(Path(directory), f"checkpoint {directory}")
        settings = [{key: value for key, value in group.items() if key != "params"}
                    for group in self.inner_optimizer.param_groups]
        scheduler = self._engine.lr_scheduler
        base_lrs = list(scheduler.base_lrs) if scheduler is not None else None
        client_state = self._load_checkpoint(Path(directory), f"checkpoint {directory}")
        groups = self.inner_optimizer.param_groups  # torch's load_state_dict made new ones
        for group, own in zip(groups, settings):
            group.update(own)
        if scheduler is not None:
            # torch's LambdaLR (every distdl schedule) brought the other run's base rates along.
            scheduler.base_lrs = base_lrs
            factors = [factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
            scheduler._last_lr = [base * factor for base, factor in zip(base_lrs, factors)]
            for group, lr in zip(groups, scheduler._last_lr):
                group["lr"] = lr
        return client_state

    def _load_checkpoint(self, directory: Path, what: str, **options: Any) -> dict[str, Any]:
        """DeepSpeed's load_checkpoint with `options`; the saved client state. Errors name `what`."""
        try:
            with tensors_only(directory):
                path, client_state = self._engine.load_checkpoint(str(directory), **options)
        except CheckpointError:
            raise
        except Exception as err:  # DeepSpeed raises many types for damaged or foreign files
            raise CheckpointError(f"{what} could not be loaded: {err}") from err
        if path is None:
            raise CheckpointError(f"checkpoint {directory} is missing DeepSpeed files (no 'latest' tag or shards)")
        return client_state or {}

    def warm_start_optimizer(self, directory: str | Path) -> None:
        """Another run's optimizer state (its moments and their step counts) under this run's
        hyperparameters and LR schedule; DeepSpeed loads the weights saved with it as well.

        The step counts come along with the moments they describe: Adam's bias correction for a
        restarted count would scale carried moments up (10x for the first moment at step 1)."""
        inner = self.inner_optimizer
        settings = [{key: value for key, value in group.items() if key != "params"} for group in inner.param_groups]
        self._load_checkpoint(Path(directory), f"the optimizer state of {directory}", load_optimizer_states=True,
                              load_lr_scheduler_states=False)
        # torch's load_state_dict brought the other run's lr, decay and betas along: this run's come back.
        for group, own in zip(inner.param_groups, settings):
            group.update(own)
        self._engine.global_steps = self._engine.global_samples = self._engine.skipped_steps = 0



def undo_initial_step(wrapper: Any) -> None:
    """DeepSpeed's unfused mixed-precision optimizer (bf16 at ZeRO-0, and fp16 with a torch optimizer)
    steps its inner optimizer once with zero gradients when it is built, to create the optimizer's
    state (DeepSpeed #5151; its ZeRO optimizers stopped doing so, #5104). That step is not inert:
    AdamW's decoupled decay shrinks the fp32 master weights by lr x weight_decay, Adam's step count
    starts at 1 (so the first real update, bias-corrected as step 2, is about half of Adam's), and
    LAMB's trust ratio shrinks every matrix by lr. The masters are restored from the model's weights,
    which that step did not touch, and the state is dropped: the optimizer creates it again at its
    first real step, as it would outside DeepSpeed."""
    if type(wrapper).__name__ != "FP16_UnfusedOptimizer":
        return
    with torch.no_grad():
        for masters, params in zip(wrapper.fp32_groups, wrapper.fp16_groups):
            for master, param in zip(masters, params):
                master.copy_(param)
    wrapper.optimizer.state.clear()



def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed casts the model to under this config."""
    if (ds_config.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds_config.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, dict):
        return {key: cast_floating(item, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(item, dtype) for item in value)
    return value


class EngineSet:
    """A workload's engines: one for most workloads, several for a GAN (generator and discriminator).

    With one engine everything is as for that engine (a checkpoint holds its files directly);
    with several, each saves into its own sub-folder of the checkpoint, named after it.
    """

    def __init__(self, engines: dict[str, Engine]) -> None:
        self.engines = engines
        self.primary = next(iter(engines.values()))

    @property
    def single(self) -> bool:
        return len(self.engines) == 1

    def for_workload(self) -> Any:
        """What the workload's train_step and evaluate receive: the engine, or the dict of engines."""
        return self.primary if self.single else self.engines

    @property
    def device(self) -> torch.device:
        return self.primary.device

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch on the workers' device, its floating-point tensors in the compute dtype."""
        return self.primary.cast({key: value.to(self.device) for key, value in batch.items()})

    def train(self, mode: bool = True) -> None:
        for engine in self.engines.values():
            engine.train(mode)

    def average_buffers(self) -> None:
        for engine in self.engines.values():
            engine.average_buffers()

    def log_metrics(self) -> dict[str, Any]:
        if self.single:
            return {"lr": self.primary.lr(), "grad_norm": self.primary.grad_norm()}
        out: dict[str, Any] = {}
        for name, engine in self.engines.items():
            out[f"lr_{name}"] = engine.lr()
            if (norm := engine.grad_norm()) is not None:  # none before the engine's first step (a WGAN's generator)
                out[f"grad_norm_{name}"] = norm
        return out

    def grad_norms(self) -> list[Optional[torch.Tensor | float]]:
        return [engine.raw_grad_norm() for engine in self.engines.values()]

    def parameter_checksum(self) -> str:
        if self.single:
            return self.primary.parameter_checksum()
        import hashlib

        joined = ",".join(f"{name}:{engine.parameter_checksum()}" for name, engine in self.engines.items())
        return hashlib.sha256(joined.encode()).hexdigest()

    def memory_report(self) -> dict[str, Any]:
        if self.single:
            return self.primary.memory_report()
        return {name: engine.memory_report() for name, engine in self.engines.items()}

    def trainable_parameters(self) -> dict[str, int]:
        return {name: engine.trainable_parameters() for name, engine in self.engines.items()}

    def optimizers(self) -> dict[str, str]:
        """Each engine's optimizer class, under DeepSpeed's ZeRO or mixed-precision wrapper."""
        return {name: type(engine.inner_optimizer).__name__ for name, engine in self.engines.items()}

    def _folder(self, directory: str | Path, name: str) -> Path:
        return engine_folder(directory, name, len(self.engines))

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        for name, engine in self.engines.items():
            engine.save(self._folder(directory, name), client_state)

    def load(self, directory: str | Path, own_hyperparameters: bool = False) -> dict[str, Any]:
        states = [engine.load(self._folder(directory, name), own_hyperparameters)
                  for name, engine in self.engines.items()]
        return states[0]

    def warm_start_optimizers(self, directory: str | Path) -> None:
        for name, engine in self.engines.items():
            engine.warm_start_optimizer(self._folder(directory, name))


def _partition(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank stores: its ZeRO-3 shard, else the whole tensor."""
    return getattr(param, "ds_tensor", param)

