"""The only module that imports deepspeed.

Builds the DeepSpeed config from the engine section, wraps a model in a
DeepSpeed engine, saves and loads checkpoints, and consolidates fp32 weights
for export. Everything else in distdl talks to `Engine`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from distdl.collectives import all_reduce_sum, distributed, world_size
from distdl.config import EngineSection, OptimizerSection, SharpnessAwareSection, TrainerSection
from distdl.errors import CheckpointError, ConfigError
from distdl.optim import LangevinNoise
from distdl.optim.layerwise import FragmentLayout, LayerwiseOptimizer
from distdl.rundir import read_json_object

# DeepSpeed prints a config dump every `steps_per_print` steps; distdl logs itself.
_QUIET_STEPS = 2**31 - 1


def build_deepspeed_config(
    engine: EngineSection, trainer: TrainerSection, num_workers: int, use_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed JSON derived from distdl's engine and trainer sections (plus any raw JSON)."""
    derived: dict[str, Any] = {
        "train_batch_size": trainer.micro_batch_size * trainer.gradient_accumulation_steps * num_workers,
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.gradient_accumulation_steps,
        "gradient_clipping": engine.gradient_clipping,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        # distdl hands DeepSpeed torch optimizers; these let ZeRO (and offload) take them
        # instead of JIT-compiling DeepSpeed's own fused optimizers.
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": engine.zero_stage},
    }
    if engine.zero_stage > 0:
        overlap = use_gpu if engine.overlap_comm is None else engine.overlap_comm
        derived["zero_optimization"].update(overlap_comm=overlap, reduce_bucket_size=engine.bucket_elements,
                                            allgather_bucket_size=engine.bucket_elements)
    if engine.offload_optimizer:
        derived["zero_force_ds_cpu_optimizer"] = False
        derived["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if engine.precision == "bf16":
        derived["bf16"] = {"enabled": True}
    elif engine.precision == "fp16":
        derived["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if engine.deepspeed_config:
        user = read_deepspeed_json(engine.deepspeed_config)
        check_owned_keys(user, derived)
        derived = merge_deepspeed_config(derived, user)
    return derived


def read_deepspeed_json(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"engine.deepspeed_config: {file} does not exist")
    return read_json_object(file, "engine.deepspeed_config")


# Keys only distdl's engine section sets: a raw JSON that sets them would silently contradict it.
_DISTDL_OWNED = {"fp16": "engine.precision", "bf16": "engine.precision", "zero_optimization.stage": "engine.zero_stage",
                 "zero_optimization.offload_optimizer": "engine.offload_optimizer"}


# Blocks distdl never hands DeepSpeed: it passes its own optimizer and schedule objects, which win
# over a JSON's without a word, so a JSON that names one is refused.
_DISTDL_BUILT = {"optimizer": "optimizer.name (adamw, adam, sgd, lamb, lars) and its optimizer.* keys",
                 "scheduler": "scheduler.name and its scheduler.* keys"}


def check_owned_keys(user: dict[str, Any], derived: dict[str, Any]) -> None:
    """A raw JSON may repeat what distdl derived, but not add a precision or ZeRO setting of its own,
    nor an optimizer or LR schedule."""
    for block, distdl_keys in _DISTDL_BUILT.items():
        if block in user:
            raise ConfigError(f"engine.deepspeed_config has a {block!r} block ({json.dumps(user[block])[:80]}), which "
                              f"DeepSpeed would ignore for distdl's own; set {distdl_keys} instead")
    for dotted, distdl_key in _DISTDL_OWNED.items():
        theirs, ours = _lookup(user, dotted), _lookup(derived, dotted)
        if theirs is not None and ours is None and theirs != {"enabled": False}:
            raise ConfigError(f"engine.deepspeed_config sets {dotted}={theirs!r}, which distdl's config leaves "
                              f"unset; set {distdl_key} instead")


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# Where the derived DeepSpeed keys come from in distdl's config, for conflict messages.
_DERIVED_FROM = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "gradient_clipping": "engine.gradient_clipping",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.overlap_comm": "engine.overlap_comm",
    "zero_optimization.reduce_bucket_size": "engine.bucket_elements",
    "zero_optimization.allgather_bucket_size": "engine.bucket_elements",
}


def merge_deepspeed_config(derived: dict[str, Any], user: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Add the user's keys to the derived config; a key set to a different value in both is an error."""
    merged = copy.deepcopy(derived)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in merged:
            merged[key] = copy.deepcopy(value)
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = merge_deepspeed_config(merged[key], value, dotted + ".")
        elif merged[key] != value:
            source = _DERIVED_FROM.get(dotted, "the distdl key")
            raise ConfigError(
                f"engine.deepspeed_config sets {dotted}={value!r} but distdl's config gives "
                f"{merged[key]!r}; set it through {source} instead, or make them agree"
            )
    return merged


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
        self._engine.save_checkpoint(str(directory), tag=f"global_step{self.global_steps}", client_state=client_state)

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
            path, client_state = self._engine.load_checkpoint(str(directory), **options)
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


# Where torch.compile's own code lives: an error raised there is the compiler failing, not the model.
_COMPILER_PACKAGES = ("torch/_dynamo/", "torch/_inductor/", "torch/_functorch/")


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


def fragment_layouts(wrapper: Any) -> dict[torch.Tensor, FragmentLayout]:
    """Where each layer's fragments lie in the flat fp32 tensors that DeepSpeed's ZeRO and
    mixed-precision optimizers hand their inner optimizer, for LAMB's and LARS's per-layer norms
    (distdl.optim.layerwise). Layers are numbered by their place in their group, the same on every
    rank. Empty for fp32 at ZeRO-0, where the inner optimizer steps the model's own parameters."""
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        # ZeRO-3: per sub-group, this rank's 1/N slice of each parameter (ds_tensor), one after another.
        reduce, rank = _summed_over(wrapper.dp_process_group), dist.get_rank(wrapper.dp_process_group)
        return {flat: _slices(params, rank, flat.numel(), reduce)
                for flat, params in zip(wrapper.fp32_partitioned_groups_flat, wrapper.fp16_groups)}
    if hasattr(wrapper, "single_partition_of_fp32_groups"):  # ZeRO-1 and 2
        return {flat: _mapped(params, flat.numel(), _summed_over(group)) for flat, params, group in
                zip(wrapper.single_partition_of_fp32_groups, wrapper.bit16_groups, wrapper.real_dp_process_group)}
    if hasattr(wrapper, "fp32_groups_flat_partition"):  # bf16 at ZeRO-0 partitions its fp32 copy as ZeRO-1 does
        return {flat: _mapped(params, flat.numel(), _summed_over(group)) for flat, params, group in
                zip(wrapper.fp32_groups_flat_partition, wrapper.bf16_groups, wrapper.real_dp_process_group)}
    # bf16 at ZeRO-0, and fp16 with a torch optimizer, keep one fp32 copy per parameter (DeepSpeed's
    # FP16_UnfusedOptimizer); fp32 at ZeRO-0 steps the model's own parameters: whole layers both.
    return {}


def _slices(params: list[torch.nn.Parameter], rank: int, total: int, reduce: Any) -> FragmentLayout:
    """ZeRO-3's partitions: each parameter's slice of ds_tensor.ds_numel elements, the last rank's
    padded past the parameter's end. The padding is left out of the norms (its memory is not
    initialized, and a stray NaN there would poison a whole layer's ratio)."""
    lengths, layers = [], []
    for layer, param in enumerate(params):
        size = param.ds_tensor.ds_numel
        real = min(size, max(0, param.ds_numel - rank * size))
        lengths += [real, size - real]
        layers += [layer, -1]
    lengths.append(total - sum(lengths))
    layers.append(-1)
    return FragmentLayout(tuple(lengths), tuple(layers), len(params), reduce)


def _mapped(params: list[torch.nn.Parameter], total: int, reduce: Any) -> FragmentLayout:
    """From DeepSpeed's low-to-high precision links (`_hp_mapping`, set for each parameter with a
    fragment in this rank's partition): the fragments in partition order, gaps as padding."""
    fragments = sorted((p._hp_mapping.hp_fragment_address.start, p._hp_mapping.hp_fragment_address.numel, layer)
                       for layer, p in enumerate(params) if getattr(p, "_hp_mapping", None) is not None)
    lengths, layers, offset = [], [], 0
    for start, numel, layer in fragments:
        if start > offset:
            lengths.append(start - offset)
            layers.append(-1)
        lengths.append(numel)
        layers.append(layer)
        offset = start + numel
    if total > offset:
        lengths.append(total - offset)
        layers.append(-1)
    return FragmentLayout(tuple(lengths), tuple(layers), len(params), reduce)


def _summed_over(group: Any) -> Optional[Callable[[torch.Tensor], None]]:
    """An in-place all-reduce (sum) over a data-parallel group, as DeepSpeed's own gradient-norm
    reduction inside its step; None for a lone rank. Where the backend (NCCL) cannot reduce host
    tensors, as with optimizer states offloaded to CPU memory, the sums travel through the GPU."""
    if dist.get_world_size(group) == 1:
        return None

    def reduce(sums: torch.Tensor) -> None:
        if dist.get_backend(group) == "nccl" and sums.device.type != "cuda":
            on_device = sums.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_device, group=group)
            sums.copy_(on_device)
        else:
            dist.all_reduce(sums, group=group)

    return reduce


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


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (Ampere and later GPUs; no effect elsewhere).

    PyTorch recommends it for training, but its default keeps matmuls in full fp32 (while cuDNN's
    convolutions already use TF32). Measurements that need full precision (a study's Hessian) turn
    it off for both.
    """
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # PyTorch 2.9 and later
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


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
        return Path(directory) if self.single else Path(directory) / name

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


def _tagged_model_states(checkpoint_dir: Path) -> tuple[Path, list[Path]]:
    """The tag folder `latest` points at and its model-state files; an error names what is missing."""
    tag_file = checkpoint_dir / "latest"
    if not tag_file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint_dir} is corrupted or not a DeepSpeed checkpoint: "
                              "it has no 'latest' file")
    tag_dir = checkpoint_dir / tag_file.read_text().strip()
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not model_files:
        raise CheckpointError(f"checkpoint {checkpoint_dir} is corrupted: {tag_dir.name}/ has no model states")
    return tag_dir, model_files


def verify_checkpoint(checkpoint_dir: str | Path) -> None:
    """Cheap integrity check before workers start: the tag exists and every torch file is a whole archive.

    torch.save writes zip archives whose index sits at the end, so a truncated file fails to open.
    """
    checkpoint_dir = Path(checkpoint_dir)
    engine_dirs = _engine_folders(checkpoint_dir)
    if engine_dirs and engine_dirs != [checkpoint_dir]:
        # Several engines (a GAN): each saved into its own sub-folder.
        for engine_dir in engine_dirs:
            verify_checkpoint(engine_dir)
        _check_archives(sorted(checkpoint_dir.glob("*.pt")), checkpoint_dir)
        return
    tag_dir, _ = _tagged_model_states(checkpoint_dir)
    _check_archives(sorted(tag_dir.glob("*.pt")) + sorted(checkpoint_dir.glob("*.pt")), checkpoint_dir)


def _check_archives(files: list[Path], checkpoint_dir: Path) -> None:
    import zipfile

    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"checkpoint file {file} is corrupted ({err}); the run cannot resume from "
                                  f"{checkpoint_dir.name}") from err


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights gathered from a DeepSpeed checkpoint of any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    tag_dir, model_files = _tagged_model_states(checkpoint_dir)
    try:
        model_states = torch.load(model_files[0], map_location="cpu", weights_only=False)
        stage = int(model_states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
        # ZeRO 1-3 (and bf16 at stage 0, whose optimizer keeps the fp32 master weights) need the
        # optimizer shards; plain stage 0 keeps full fp32 weights in the model states.
        if stage > 0 or any(tag_dir.glob("bf16_zero_pp_rank_*")):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
        else:
            state = model_states["module"]
    except Exception as err:
        raise CheckpointError(f"checkpoint {tag_dir} could not be read: {err}") from err
    return {name: tensor.float() for name, tensor in state.items()}


# ----------------------------------------------------------------------------- elastic resume

# DeepSpeed's universal-checkpoint converter reads Adam's two moments (and the step count) from every ZeRO
# partition. Other optimizers' state (SGD's and LARS's momentum) rides in those two slots and is named
# back afterwards; at ZeRO-3, whose shards the converter reads differently, only Adam-style state goes.
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
UNIVERSAL_LATEST = "latest_universal"
_SHARD_RANK = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_partitions(checkpoint_dir: str | Path) -> Optional[int]:
    """Over how many data-parallel ranks a checkpoint's optimizer state is partitioned; None when it is
    not partitioned (plain ZeRO-0), so that any number of workers loads it as saved."""
    tag_dir, _ = _tagged_model_states(Path(checkpoint_dir))
    ranks = {int(match.group(1)) for file in tag_dir.iterdir() if (match := _SHARD_RANK.match(file.name))}
    return len(ranks) or None


def reshard_checkpoint(checkpoint_dir: str | Path, world_size: int) -> bool:
    """Make a checkpoint whose ZeRO partitions were saved by another number of workers loadable by
    `world_size` workers; whether the workers must then load it as DeepSpeed's universal checkpoint.

    DeepSpeed's own converter (`ds_to_universal`) gathers every partition's fp32 weights and optimizer
    state into one file per parameter and state; a loading engine slices its own partition out of them,
    on any number of ranks. It writes beside the saved tag (`<tag>_universal/`, `latest_universal`),
    which stays as it was. A converted checkpoint is reused on the next resume.
    """
    checkpoint_dir = Path(checkpoint_dir)
    partitioned = {folder: saved for folder in _engine_folders(checkpoint_dir)
                   if (saved := saved_partitions(folder)) is not None}
    if not partitioned or all(saved == world_size for saved in partitioned.values()):
        return False
    for folder, saved in partitioned.items():
        _convert_to_universal(folder, f"{saved} workers to {world_size}")
    return True


def _engine_folders(checkpoint_dir: Path) -> list[Path]:
    """The folders one engine each saved into: the checkpoint itself, or one per engine (a GAN)."""
    if (checkpoint_dir / "latest").is_file():
        return [checkpoint_dir]
    return sorted(d for d in checkpoint_dir.glob("*") if (d / "latest").is_file())


def _convert_to_universal(engine_dir: Path, what: str) -> None:
    """DeepSpeed's `ds_to_universal` on the tag `latest` names, written whole before it is named."""
    import shutil

    tag = (engine_dir / "latest").read_text().strip()
    target = engine_dir / f"{tag}_universal"
    pointer = engine_dir / UNIVERSAL_LATEST
    if target.is_dir() and pointer.is_file() and pointer.read_text().strip() == target.name:
        return
    partial, view = engine_dir / f"{target.name}.partial", engine_dir / f"{tag}.adam-view"
    for leftover in (partial, view):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        carried = _adam_view(engine_dir / tag, view, what)
        _run_converter(engine_dir / tag if carried is None else view, partial, engine_dir / tag)
        _name_state_back(partial, carried or {})
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        pointer.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(view, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    pointer_partial = engine_dir / f"{UNIVERSAL_LATEST}.partial"
    pointer_partial.write_text(target.name)
    pointer_partial.replace(pointer)


def _adam_view(tag_dir: Path, view: Path, what: str) -> Optional[dict[str, str]]:
    """When the saved optimizer state is not Adam's: a copy of the tag whose ZeRO shards hold it in
    Adam's two moment slots, for DeepSpeed's converter, and which slot holds which state. None when the
    state is Adam's and the converter reads the tag as saved."""
    shards = sorted(file for file in tag_dir.iterdir() if _SHARD_RANK.match(file.name))
    first_saved = torch.load(shards[0], map_location="cpu", weights_only=False)
    first = first_saved["optimizer_state_dict"]
    if "base_optimizer_state" not in first:  # ZeRO-3's layout, which the converter reads as Adam's only
        keys = {key for state in first["optimizer_state_dict"]["state"].values() for key in state}
        if not set(ADAM_MOMENTS) <= keys:
            raise CheckpointError(
                f"checkpoint {tag_dir.parent} cannot be resharded from {what}: at ZeRO-3 DeepSpeed's universal "
                f"checkpoint carries Adam-style moments only (adam, adamw, lamb), and this optimizer keeps "
                f"{', '.join(sorted(keys)) or 'no state'}. Resume on the worker count that saved it")
        return None
    keys = sorted({key for state in first["base_optimizer_state"]["state"].values() for key in state} - {"step"})
    if set(keys) == set(ADAM_MOMENTS):
        return None
    if len(keys) > len(ADAM_MOMENTS):
        raise CheckpointError(f"checkpoint {tag_dir.parent} cannot be resharded from {what}: its optimizer keeps "
                              f"{len(keys)} tensors per parameter ({', '.join(keys)}); DeepSpeed's universal "
                              "checkpoint carries two. Resume on the worker count that saved it")
    carried = dict(zip(ADAM_MOMENTS, keys))
    view.mkdir()
    loaded = {shards[0]: first_saved}  # read above already; each shard can be gigabytes
    for file in tag_dir.iterdir():
        if not _SHARD_RANK.match(file.name):
            _link_or_copy(file, view / file.name)  # the model states, unchanged and often large
            continue
        saved = loaded.pop(file, None) or torch.load(file, map_location="cpu", weights_only=False)
        optimizer = saved["optimizer_state_dict"]
        states = optimizer["base_optimizer_state"]["state"]
        for group, partition in enumerate(optimizer["single_partition_of_fp32_groups"]):
            state = states.setdefault(group, {})
            # The saved state may keep the partition's padding, which the fp32 copy drops.
            like = next((state[key] for key in keys if key in state), partition)
            for slot in ADAM_MOMENTS:
                state[slot] = state.pop(carried[slot]) if slot in carried else torch.zeros_like(like)
        torch.save(saved, view / file.name)
    return carried


def _link_or_copy(source: Path, target: Path) -> None:
    import shutil

    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _run_converter(source: Path, output: Path, tag_dir: Path) -> None:
    import subprocess
    import sys

    # A process of its own: the converter fans out over process pools and prints its progress.
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(output), "--inject_missing_state", "--num_extract_workers", "2",
               "--num_merge_workers", "2"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise CheckpointError(f"could not convert checkpoint {tag_dir} to DeepSpeed's universal checkpoint for "
                              f"another worker count: {lines[-1] if lines else done.returncode}")


def _name_state_back(universal: Path, carried: dict[str, str]) -> None:
    """Each parameter's state files under their own names again; the unused moment slots removed."""
    if not carried:
        return
    for parameter in (universal / "zero").iterdir():
        if not parameter.is_dir():
            continue
        for slot in ADAM_MOMENTS:
            file = parameter / f"{slot}.pt"
            if slot in carried:
                file.rename(parameter / f"{carried[slot]}.pt")
            else:
                file.unlink(missing_ok=True)
