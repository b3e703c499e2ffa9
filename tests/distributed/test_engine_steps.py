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

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ACCUMULATION, MICRO_BATCH, STEPS = 2, 4, 3
LR = {"adamw": 0.01, "lamb": 0.01, "lars": 0.5}
# (optimizer, ZeRO stage, precision); fp32 cases are checked update by update, the others' layouts.
# fp32-offload: optimizer states in CPU memory (ZeRO's offload), where the optimizer steps host tensors.
# fp32-resume: saved after step 2 and loaded into an engine built from other weights, then step 3.
# fp32-warm: the same, but as a second phase (model.init_optimizer): an engine with half the lr
# takes the saved weights and optimizer state and keeps its own lr.
UPDATE_CASES = [("adamw", 0, "fp32")] + [(name, stage, "fp32") for name in ("lamb", "lars") for stage in range(4)] + [
    ("lamb", 2, "fp32-offload"), ("lars", 3, "fp32-offload"), ("lamb", 2, "fp32-resume"), ("lars", 3, "fp32-resume"),
    ("lamb", 2, "fp32-warm"), ("adamw", 1, "fp32-warm")]
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
    from distdl.engine import Engine, build_deepspeed_config
    from distdl.optim import optimizer_factory, param_groups

    global_batch = MICRO_BATCH * ACCUMULATION * world
    config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
        f"trainer.micro_batch_size={MICRO_BATCH}", f"trainer.global_batch_size={global_batch}",
        f"scaling.num_workers={world}", f"optimizer.name={name}", f"optimizer.lr={LR[name] * lr_scale}",
        "optimizer.weight_decay=0.1", "engine.gradient_clipping=0.05", f"engine.zero_stage={stage}",
        f"engine.precision={precision.split('-')[0]}", "engine.bucket_elements=16",
        f"engine.offload_optimizer={precision.endswith('offload')}"])
    ds_config = build_deepspeed_config(config.engine, config.trainer, world, False)
    if precision == "bf16-fp32acc":
        ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
    make_optimizer = optimizer_factory(config.optimizer, global_batch)
    return Engine(model, param_groups(model, 0.1), make_optimizer, None, ds_config), make_optimizer


def _loss(net, x: torch.Tensor) -> torch.Tensor:
    return ((net(x).squeeze(-1).float() - x.sum(-1).sin()) ** 2).mean()


def _updates(rank: int, world: int, name: str, stage: int, precision: str, checkpoints: Path) -> dict:
    from distdl.optim import param_groups

    model = _model()
    reference = copy.deepcopy(model)
    engine, make_optimizer = _engine(name, stage, precision, world, model)
    reference_optimizer = make_optimizer(param_groups(reference, 0.1))
    data = torch.Generator().manual_seed(100)  # every rank draws every rank's batches, keeps its own
    for step in range(STEPS):
        if precision.endswith(("resume", "warm")) and step == RESUME_AT:
            folder = checkpoints / f"{name}-{stage}-{precision}"
            engine.save(folder, {})
            warm = precision.endswith("warm")
            # The load must bring the weights.
            engine, _ = _engine(name, stage, precision, world, _model(seed=1), lr_scale=0.5 if warm else 1.0)
            if warm:
                engine.warm_start_optimizer(folder)
                assert engine.global_steps == 0, "a second phase counts its own steps"
                for group in reference_optimizer.param_groups:
                    group["lr"] *= 0.5
            else:
                engine.load(folder)
        for _ in range(ACCUMULATION):
            batches = [torch.randn(MICRO_BATCH, 6, generator=data) for _ in range(world)]
            engine.backward(_loss(engine, batches[rank]))
            engine.step()
            # The plain loop: the mean loss over the whole global batch.
            (sum(_loss(reference, x) for x in batches) / (world * ACCUMULATION)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
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
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = {case: _updates(rank, world, *case, Path(checkpoints)) if case[2].startswith("fp32")
                     else _layout(world, *case) for case in cases}
    finally:
        dist.destroy_process_group()


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
