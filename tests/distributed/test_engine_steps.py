"""The engine's update against a plain torch loop on the same global batch: alone (where distdl skips
DeepSpeed's gradient all-reduce, which would only reduce each gradient with itself) and on 2 gloo
ranks (where the all-reduce averages the ranks' gradients), with accumulation and clipping."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ACCUMULATION, MICRO_BATCH, STEPS = 2, 4, 3


def _train(rank: int, world: int, port: int, out: dict) -> None:
    import os

    import torch.distributed as dist

    from distdl.config import load_config
    from distdl.engine import Engine, build_deepspeed_config
    from distdl.optim import optimizer_factory, param_groups

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        global_batch = MICRO_BATCH * ACCUMULATION * world
        config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
            f"trainer.micro_batch_size={MICRO_BATCH}", f"trainer.global_batch_size={global_batch}",
            f"scaling.num_workers={world}", "optimizer.name=adamw", "optimizer.lr=0.01",
            "optimizer.weight_decay=0.1", "engine.gradient_clipping=0.05"])
        ds_config = build_deepspeed_config(config.engine, config.trainer, world, False)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        reference = copy.deepcopy(model)
        make_optimizer = optimizer_factory(config.optimizer, global_batch)
        engine = Engine(model, param_groups(model, 0.1), make_optimizer, None, ds_config)
        reference_optimizer = make_optimizer(param_groups(reference, 0.1))
        data = torch.Generator().manual_seed(100)  # every rank draws every rank's batches, keeps its own

        def loss_of(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return ((net(x).squeeze(-1) - x.sum(-1).sin()) ** 2).mean()

        for _ in range(STEPS):
            for _ in range(ACCUMULATION):
                batches = [torch.randn(MICRO_BATCH, 6, generator=data) for _ in range(world)]
                engine.backward(loss_of(engine, batches[rank]))
                engine.step()
                # The plain loop: the mean loss over the whole global batch.
                (sum(loss_of(reference, x) for x in batches) / (world * ACCUMULATION)).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
            reference_optimizer.step()
            reference_optimizer.zero_grad()
        out[rank] = {"engine": [p.detach().clone() for p in model.parameters()],
                     "plain": [p.detach().clone() for p in reference.parameters()],
                     "grad_norm": engine.grad_norm()}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_the_engines_update_is_a_plain_loops_on_the_global_batch(world):
    from tests.helpers.gloo import spawn_gloo

    ranks = spawn_gloo(_train, world)
    for rank in range(world):
        for ours, plain in zip(ranks[rank]["engine"], ranks[rank]["plain"]):
            torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-7)
        # The clipping threshold is below the gradient norm, so clipping took part in every step.
        assert ranks[rank]["grad_norm"] > 0.05
    for ours, theirs in zip(ranks[0]["engine"], ranks[world - 1]["engine"]):
        assert torch.equal(ours, theirs), "every rank ends with the same weights"
