"""The engine's update against a plain torch loop on the same global batch: alone (where distdl skips
DeepSpeed's gradient all-reduce, which would only reduce each gradient with itself) and on 2 gloo
ranks (where the all-reduce averages the ranks' gradients), with accumulation and clipping.

LAMB and LARS take each layer's norm, and under ZeRO a layer is cut into fragments across the ranks'
flat partitions: their update must still be the plain loop's at every ZeRO stage, and the layer
norms they see under the mixed-precision optimizers (which flatten or partition the fp32 copy too)
must be the whole layers'."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import pytest
import torch

from distdl.config import SchedulerSection
from tests.helpers.shared import REPO

ACCUMULATION, MICRO_BATCH, STEPS = 2, 4, 3
LR = {"adamw": 0.01, "lamb": 0.01, "lars": 0.5}
# (optimizer, ZeRO stage, precision); fp32 cases are checked update by update, the others' layouts.
# fp32-offload: optimizer states in CPU memory (ZeRO's offload), where the optimizer steps host tensors.
# fp32-resume: saved after step 2 and loaded into an engine built from other weights, then step 3.
# fp32-warm: the same, but as a second phase (model.init_optimizer): an engine with half the lr
# takes the saved weights and optimizer state and keeps its own lr.
# fp32-pbt: under a linear LR schedule, loaded as population-based training continues another
# trial's checkpoint: an engine with half the peak lr takes the weights, optimizer state and step,
# and goes on along its own schedule (a plain loop whose peak lr is halved at that step).
UPDATE_CASES = [("adamw", 0, "fp32")] + [(name, stage, "fp32") for name in ("lamb", "lars") for stage in range(4)] + [
    ("lamb", 2, "fp32-offload"), ("lars", 3, "fp32-offload"), ("lamb", 2, "fp32-resume"), ("lars", 3, "fp32-resume"),
    ("lamb", 2, "fp32-warm"), ("adamw", 1, "fp32-warm"), ("adamw", 0, "fp32-pbt"), ("lars", 2, "fp32-pbt")]
RESUME_AT = 2
# bf16-fp32acc: bf16 with fp32 gradient accumulation (a raw DeepSpeed JSON's data_types), where
# DeepSpeed's BF16_Optimizer partitions the fp32 copy at ZeRO-1. DeepSpeed refuses fp16 on CPUs.
LAYOUT_CASES = [("lamb", 0, "bf16"), ("adamw", 0, "bf16"), ("lars", 1, "bf16"), ("lamb", 1, "bf16-fp32acc"),
                ("lamb", 2, "bf16"), ("lars", 3, "bf16")]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 7 parameters of uneven sizes, so ZeRO's partition boundaries fall inside layers.
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.LayerNorm(5),
                               torch.nn.Linear(5, 1, bias=False))


def _engine(name: str, stage: int, precision: str, world: int, model: torch.nn.Module, lr_scale: float = 1.0):
    from distdl.config import load_config
    from distdl.engine.deepspeed_config import build_deepspeed_config
    from distdl.engine.engine import Engine
    from distdl.optim import optimizer_factory, param_groups, scheduler_factory

    global_batch = MICRO_BATCH * ACCUMULATION * world
    config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
        f"trainer.micro_batch_size={MICRO_BATCH}", f"trainer.global_batch_size={global_batch}",
        f"scaling.num_workers={world}", f"optimizer.name={name}", f"optimizer.lr={LR[name] * lr_scale}",
        "optimizer.weight_decay=0.1", "engine.gradient_clipping=0.05", f"engine.zero_stage={stage}",
        f"engine.precision={precision.split('-')[0]}", "engine.bucket_elements=16",
        f"engine.offload_optimizer={precision.endswith('offload')}", "scheduler.name=linear",
        "scheduler.warmup_steps=0"])
    ds_config = build_deepspeed_config(config.engine, config.trainer, world, False)
    if precision == "bf16-fp32acc":
        ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
    make_optimizer = optimizer_factory(config.optimizer, global_batch)
    # A schedule that changes the lr every step, for the case that swaps the peak lr mid-run.
    make_scheduler = scheduler_factory(config.scheduler, STEPS + 2) if precision.endswith("pbt") else None
    return Engine(model, param_groups(model, 0.1), make_optimizer, make_scheduler, ds_config), make_optimizer


def _loss(net, x: torch.Tensor) -> torch.Tensor:
    return ((net(x).squeeze(-1).float() - x.sum(-1).sin()) ** 2).mean()


def _updates(rank: int, world: int, name: str, stage: int, precision: str, checkpoints: Path) -> dict:
    from distdl.optim import param_groups, scheduler_factory

    model = _model()
    reference = copy.deepcopy(model)
    engine, make_optimizer = _engine(name, stage, precision, world, model)
    reference_optimizer = make_optimizer(param_groups(reference, 0.1))
    pbt = precision.endswith("pbt")
    reference_schedule = scheduler_factory(SchedulerSection(name="linear"), STEPS + 2)(reference_optimizer) if pbt \
        else None
    data = torch.Generator().manual_seed(100)  # every rank draws every rank's batches, keeps its own
    for step in range(STEPS):
        if precision.endswith(("resume", "warm", "pbt")) and step == RESUME_AT:
            folder = checkpoints / f"{name}-{stage}-{precision}"
            engine.save(folder, {})
            warm = precision.endswith("warm")
            # The load must bring the weights.
            engine, _ = _engine(name, stage, precision, world, _model(seed=1), lr_scale=0.5 if warm or pbt else 1.0)
            if warm:
                engine.warm_start_optimizer(folder)
                assert engine.global_steps == 0, "a second phase counts its own steps"
                for group in reference_optimizer.param_groups:
                    group["lr"] *= 0.5
            else:
                engine.load(folder, own_hyperparameters=pbt)
            if pbt:
                assert engine.global_steps == RESUME_AT, "it goes on from the saved step"
                reference_schedule.base_lrs = [lr * 0.5 for lr in reference_schedule.base_lrs]
                for group, lr in zip(reference_optimizer.param_groups, reference_schedule.get_lr()):
                    group["lr"] = lr
                assert [group["lr"] for group in engine.inner_optimizer.param_groups] == pytest.approx(
                    [group["lr"] for group in reference_optimizer.param_groups], rel=1e-12), (
                    [group["lr"] for group in engine.inner_optimizer.param_groups], reference_schedule.last_epoch,
                    [group["lr"] for group in reference_optimizer.param_groups])
        for _ in range(ACCUMULATION):
            batches = [torch.randn(MICRO_BATCH, 6, generator=data) for _ in range(world)]
            engine.backward(_loss(engine, batches[rank]))
            engine.step()
            # The plain loop: the mean loss over the whole global batch.
            (sum(_loss(reference, x) for x in batches) / (world * ACCUMULATION)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        if reference_schedule is not None:
            reference_schedule.step()
    return {"engine": engine.full_parameters(), "plain": [p.detach().clone() for p in reference.parameters()],
            "grad_norm": engine.grad_norm()}


def _layout(world: int, name: str, stage: int, precision: str) -> dict:
    from distdl.optim import param_groups

    model = _model()
    dtype = torch.bfloat16
    # The fp32 copy the optimizer steps starts as the low-precision weights, widened.
    expected = [torch.stack([p.detach().to(dtype).float().norm() for p in group["params"]])
                for group in param_groups(model, 0.1)]
    engine, _ = _engine(name, stage, precision, world, model)
    optimizer = engine.inner_optimizer
    # The norms LAMB and LARS see; for any optimizer, the fp32 copy it steps (the last group's, at
    # ZeRO-0 one tensor per parameter) is still the model's weights, without a state from a step.
    seen = optimizer.layer_weight_norms() if name != "adamw" else [
        torch.stack([p.detach().norm() for p in group["params"]]) for group in optimizer.param_groups]
    return {"seen": seen, "expected": expected, "state_entries": len(optimizer.state)}


def _train(rank: int, world: int, port: int, cases: list, checkpoints: str, out: dict) -> None:
    from tests.helpers.gloo import torchrun_group

    with torchrun_group(rank, world, port):
        out[rank] = {case: _updates(rank, world, *case, Path(checkpoints)) if case[2].startswith("fp32")
                     else _layout(world, *case) for case in cases}


def _load_planted(rank: int, world: int, port: int, folder: str, kind: str, sentinel: str, out: dict) -> None:
    import torch.distributed as dist

    from distdl.errors import CheckpointError
    from tests.helpers.gloo import torchrun_group
    from tests.helpers.payloads import plant_kind

    with torchrun_group(rank, world, port):
        engine, _ = _engine("adamw", 2, "fp32", world, _model())
        engine.save(folder, {})
        dist.barrier()
        if rank == 0:
            plant_kind(Path(folder), kind, Path(sentinel))
        dist.barrier()
        fresh, _ = _engine("adamw", 2, "fp32", world, _model(seed=1))
        try:
            fresh.load(folder)
            out[rank] = "loaded"
        except CheckpointError as err:
            out[rank] = str(err)


@pytest.mark.parametrize("kind", ["model states", "optimizer states"])
def test_deepspeeds_own_loader_refuses_a_planted_payload_naming_the_file(tmp_path, kind):
    """DeepSpeed's load_checkpoint asks torch to unpickle in full; inside the engine it unpickles tensors and
    DeepSpeed's few types only, on every rank, and the payload never runs."""
    from tests.helpers.gloo import spawn_gloo

    ranks = spawn_gloo(_load_planted, 2, str(tmp_path / "saved"), kind, str(tmp_path / "ran"))
    for rank in range(2):
        assert "asks for posix.system" in ranks[rank] and str(tmp_path / "saved" / "global_step0") in ranks[rank], \
            ranks[rank]
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("world, cases", [(1, UPDATE_CASES[:1]), (2, UPDATE_CASES + LAYOUT_CASES)])
def test_the_engines_update_is_a_plain_loops_on_the_global_batch(world, cases, tmp_path):
    from tests.helpers.gloo import spawn_gloo

    ranks = spawn_gloo(_train, world, cases, str(tmp_path))
    for case in cases:
        for rank in range(world):
            result = ranks[rank][case]
            if not case[2].startswith("fp32"):
                for seen, expected in zip(result["seen"], result["expected"]):
                    torch.testing.assert_close(seen, expected, rtol=1e-5, atol=0, msg=lambda m: f"{case}: {m}")
                assert result["state_entries"] == 0, f"{case}: the optimizer was stepped before training"
                continue
            for ours, plain in zip(result["engine"], result["plain"]):
                torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-7, msg=lambda m: f"{case}: {m}")
            # The clipping threshold is below the gradient norm, so clipping took part in every step.
            assert result["grad_norm"] > 0.05, case
        if case[2].startswith("fp32"):
            for ours, theirs in zip(ranks[0][case]["engine"], ranks[world - 1][case]["engine"]):
                assert torch.equal(ours, theirs), f"{case}: every rank ends with the same weights"


# ----------------------------------------------------------------------------- SAM

SAM_LR = 0.3
# rho: ASAM's neighbourhood scales with |w| (here about 0.3), so it takes a larger rho (Kwon et al.: 0.5-2).
SAM_RHO = {False: 0.2, True: 1.0}
# (ZeRO stage, precision, adaptive): against the hand-computed update in fp32; bf16 within its precision.
SAM_CASES = [(0, "fp32", False), (1, "fp32", True), (2, "fp32", False), (0, "bf16", False), (2, "bf16", True)]


def _sam_engine(stage: int, precision: str, adaptive: bool, world: int, model: torch.nn.Module):
    from distdl.config import load_config
    from distdl.engine.deepspeed_config import build_deepspeed_config
    from distdl.engine.engine import Engine
    from distdl.optim import optimizer_factory, param_groups

    config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
        f"trainer.micro_batch_size={MICRO_BATCH}", f"trainer.global_batch_size={MICRO_BATCH * ACCUMULATION * world}",
        f"scaling.num_workers={world}", "optimizer.name=sgd", f"optimizer.lr={SAM_LR}", "optimizer.momentum=0",
        "optimizer.weight_decay=0", "engine.gradient_clipping=0", f"engine.zero_stage={stage}",
        f"engine.precision={precision}", "engine.bucket_elements=16", f"optimizer.sam.rho={SAM_RHO[adaptive]}",
        f"optimizer.sam.adaptive={str(adaptive).lower()}"])
    ds_config = build_deepspeed_config(config.engine, config.trainer, world, False)
    make_optimizer = optimizer_factory(config.optimizer, config.trainer.global_batch_size)
    return Engine(model, param_groups(model, 0.0), make_optimizer, None, ds_config,
                  sharpness_aware=config.optimizer.sam)


def _quadratic(net, batch) -> torch.Tensor:
    x, y = batch
    return ((net(x).squeeze(-1).float() - y) ** 2).mean()


def _sam_by_hand(weights: torch.Tensor, steps: list[list[tuple[torch.Tensor, torch.Tensor]]],
                 adaptive: bool, rho: Optional[float] = None) -> torch.Tensor:
    """Foret et al.'s Algorithm 1 on L_b(w) = mean (x.w - y)^2, written out: for each micro-batch b of
    a step (every rank's, every accumulation's), g_b = grad L_b(w) and e_b = rho T^2 g_b / |T g_b|
    (T = |w|, or 1 without `adaptive`); then w - lr mean_b grad L_b(w + e_b)."""
    w = weights.double()
    rho = SAM_RHO[adaptive] if rho is None else rho
    for micro_batches in steps:
        total = torch.zeros_like(w)
        for x, y in micro_batches:
            x, y = x.double(), y.double()

            def gradient(at: torch.Tensor) -> torch.Tensor:
                return 2 * x.T @ (x @ at - y) / len(y)

            t = w.abs() if adaptive else torch.ones_like(w)
            g = gradient(w)
            total += gradient(w + rho * t * t * g / (t * g).norm())
        w = w - SAM_LR * total / len(micro_batches)
    return w


def _sam_run(rank: int, world: int, stage: int, precision: str, adaptive: bool) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1, bias=False)
    start = model.weight.detach().clone().reshape(-1)
    engine = _sam_engine(stage, precision, adaptive, world, model)
    data = torch.Generator().manual_seed(7)  # every rank draws every rank's batches, keeps its own
    steps, first_loss = [], None
    for _ in range(STEPS):
        micro = [[(torch.randn(MICRO_BATCH, 6, generator=data), torch.randn(MICRO_BATCH, generator=data))
                  for _ in range(world)] for _ in range(ACCUMULATION)]
        steps.append([pair for accumulation in micro for pair in accumulation])
        for accumulation in micro:
            batch = engine.cast(accumulation[rank])
            loss = float(engine.ascend(lambda: _quadratic(engine, batch)))
            first_loss = loss if first_loss is None else first_loss
            engine.backward(_quadratic(engine, batch))
            engine.step()
    x, y = steps[0][rank]
    return {"engine": engine.full_parameters()[0].reshape(-1), "by_hand": _sam_by_hand(start, steps, adaptive),
            "start": start, "steps": steps,
            "first_loss": first_loss, "first_loss_by_hand": float(((x @ start - y) ** 2).mean())}


def _sam_batch_norm_statistics(world: int) -> dict:
    """Running statistics after a SAM step, and after one plain forward at the weights themselves."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    plain = copy.deepcopy(model)
    engine = _sam_engine(0, "fp32", False, world, model)
    x, y = torch.randn(MICRO_BATCH, 6), torch.randn(MICRO_BATCH)
    engine.ascend(lambda: _quadratic(engine, (x, y)))
    moved = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(_quadratic(engine, (x, y)))
    engine.step()
    plain(x)
    return {"sam": [b.clone() for b in engine.module[1].buffers()], "plain": [b.clone() for b in plain[1].buffers()],
            "moved": any(not torch.equal(a, b) for a, b in zip(moved, plain.parameters()))}


def _sam_ranks(rank: int, world: int, port: int, out: dict) -> None:
    from tests.helpers.gloo import torchrun_group

    with torchrun_group(rank, world, port):
        out[rank] = {case: _sam_run(rank, world, *case) for case in (SAM_CASES if world > 1 else SAM_CASES[:1])}
        if world == 1:
            out["batch_norm"] = _sam_batch_norm_statistics(world)


@pytest.mark.parametrize("world", [1, 2])
def test_sam_is_foret_et_als_two_step_update(world):
    """Each rank's micro-batch moves the weights along its own gradient; the step is the mean of the
    gradients taken there, applied to the weights themselves. Every rank ends the same."""
    from tests.helpers.gloo import spawn_gloo

    ranks = spawn_gloo(_sam_ranks, world)
    if world == 1:
        statistics = ranks.pop("batch_norm")
        assert statistics["moved"], "the second pass ran at moved weights"
        for sam, plain in zip(statistics["sam"], statistics["plain"]):
            assert torch.equal(sam, plain), "batch norm keeps the first pass's running statistics"
    for case, result in ranks[0].items():
        low = case[1] == "bf16"
        torch.testing.assert_close(result["engine"].double(), result["by_hand"],
                                   rtol=3e-2 if low else 1e-5, atol=3e-2 if low else 1e-6, msg=lambda m: f"{case}: {m}")
        assert result["first_loss"] == pytest.approx(result["first_loss_by_hand"], rel=2e-2 if low else 1e-6), \
            "the loss reported is the one at the weights themselves"
        assert torch.equal(result["engine"], ranks[world - 1][case]["engine"]), f"{case}: ranks differ"
        plain_sgd = _sam_by_hand(result["start"], result["steps"], case[2], rho=0.0)
        assert (result["engine"].double() - plain_sgd).abs().max() > 0.1, f"{case}: SAM makes too small a difference"


# ----------------------------------------------------------------------------- Langevin noise

NOISE_LR, NOISE_TEMPERATURE, NOISE_STEPS = 0.01, 0.5, 40
# ZeRO-3 steps the optimizer once per sub-group (here per parameter group): each call draws anew.
NOISE_CASES = [(0, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16")]


def _noise_engine(stage: int, precision: str, world: int, model: torch.nn.Module, temperature: float):
    from distdl.config import load_config
    from distdl.engine.deepspeed_config import build_deepspeed_config
    from distdl.engine.engine import Engine
    from distdl.optim import optimizer_factory, param_groups

    config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
        f"trainer.micro_batch_size={MICRO_BATCH}", f"trainer.global_batch_size={MICRO_BATCH * world}",
        f"scaling.num_workers={world}", "optimizer.name=sgd", f"optimizer.lr={NOISE_LR}", "optimizer.momentum=0",
        "optimizer.weight_decay=0", "engine.gradient_clipping=0", f"engine.zero_stage={stage}",
        f"engine.precision={precision}", "engine.bucket_elements=64", "run.seed=5",
        f"optimizer.noise={{kind: isotropic, temperature: {temperature}}}"])
    ds_config = build_deepspeed_config(config.engine, config.trainer, world, False)
    if stage == 3:
        ds_config["zero_optimization"]["sub_group_size"] = NOISE_SUB_GROUP
    make_optimizer = optimizer_factory(config.optimizer, config.trainer.global_batch_size, config.run.seed)
    return Engine(model, param_groups(model, 0.0), make_optimizer, None, ds_config)


def _noise_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 2,040 weights: ZeRO's partitions split a layer, and at ZeRO-3 each rank's two equal matrix
    # partitions are two sub-groups (NOISE_SUB_GROUP), which must not draw the same noise.
    return torch.nn.Sequential(torch.nn.Linear(40, 25, bias=False), torch.nn.Linear(25, 40))


NOISE_SUB_GROUP = 500


def _flat(engine) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in engine.full_parameters()])


def _noise_walk(stage: int, precision: str, world: int) -> torch.Tensor:
    """The weights after each of NOISE_STEPS steps of a zero loss: a pure random walk."""
    engine = _noise_engine(stage, precision, world, _noise_model(), NOISE_TEMPERATURE)
    walk = [_flat(engine)]
    for _ in range(NOISE_STEPS):
        engine.backward((engine(torch.randn(MICRO_BATCH, 40)) * 0).sum())
        engine.step()
        walk.append(_flat(engine))
    return torch.stack(walk)


def _noisy_sgd(rank: int, world: int, temperature: float, resume_dir: Optional[Path] = None) -> torch.Tensor:
    """4 SGD steps on a real loss at ZeRO-2; with `resume_dir`, saved after 2 and resumed into an
    engine built from other weights."""
    engine = _noise_engine(2, "fp32", world, _noise_model(), temperature)
    data = torch.Generator().manual_seed(3)
    for step in range(4):
        if resume_dir is not None and step == 2:
            engine.save(resume_dir, {})
            engine = _noise_engine(2, "fp32", world, _noise_model(seed=1), temperature)
            engine.load(resume_dir)
        x = [torch.randn(MICRO_BATCH, 40, generator=data) for _ in range(world)][rank]
        engine.backward((engine(x) ** 2).mean())
        engine.step()
    return _flat(engine)


def _noise_ranks(rank: int, world: int, port: int, checkpoints: str, out: dict) -> None:
    from tests.helpers.gloo import torchrun_group

    with torchrun_group(rank, world, port):
        result = {case: _noise_walk(*case, world) for case in NOISE_CASES}
        result["plain"] = _noisy_sgd(rank, world, 0.0)
        result["noisy"] = _noisy_sgd(rank, world, NOISE_TEMPERATURE)
        result["resumed"] = _noisy_sgd(rank, world, NOISE_TEMPERATURE, Path(checkpoints))
        for key, temperature in (("optimizer_class", 0.0), ("noisy_optimizer_class", NOISE_TEMPERATURE)):
            result[key] = type(_noise_engine(2, "fp32", world, _noise_model(), temperature).inner_optimizer).__name__
        out[rank] = result


def test_langevin_noise_has_its_stated_variance_and_resumes_exactly(tmp_path):
    """Each step adds N(0, 2 lr T) to every weight, independently across ZeRO's partitions, the same
    on every rank; at temperature 0 the optimizer is plain SGD, and a resumed run draws the same noise."""
    from tests.helpers.gloo import spawn_gloo

    ranks = spawn_gloo(_noise_ranks, 2, str(tmp_path))
    variance = 2 * NOISE_LR * NOISE_TEMPERATURE
    for case in NOISE_CASES:
        walk = ranks[0][case]
        assert torch.equal(walk, ranks[1][case]), f"{case}: the ranks' weights differ"
        steps = (walk[1:] - walk[:-1]).double()
        # 40 x 2,040 draws: the sample variance's relative standard error is 0.5%.
        tolerance = 0.05 if case[1] == "bf16" else 0.03
        assert steps.var().item() == pytest.approx(variance, rel=tolerance), case
        assert abs(steps.mean().item()) < 4 * (variance / steps.numel()) ** 0.5, case
        # Partitions drawn from one stream would repeat each other's noise.
        half = steps.shape[1] // 2
        first, second = steps[:, :half].reshape(-1), steps[:, half:2 * half].reshape(-1)
        assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.05, case
        assert len({tuple(column) for column in steps.T.tolist()}) == steps.shape[1], f"{case}: repeated draws"
    result = ranks[0]
    assert result["optimizer_class"] == "SGD" and result["noisy_optimizer_class"] == "LangevinSGD"
    assert not torch.equal(result["plain"], result["noisy"])
    assert torch.equal(result["resumed"], result["noisy"]), "a resumed run draws the same noise"
