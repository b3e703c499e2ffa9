"""The gradient noise scale measured inside DeepSpeed's step, on 2 gloo processes with real engines."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.shared import REPO


def _train(rank: int, world: int, port: int, measure: bool, out: dict) -> None:
    from distdl.config import load_config
    from distdl.engine.deepspeed_config import build_deepspeed_config
    from distdl.engine.engine import Engine
    from distdl.optim import optimizer_factory, param_groups
    from tests.helpers.gloo import torchrun_group

    with torchrun_group(rank, world, port):
        config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
            "trainer.max_steps=3", "trainer.micro_batch_size=4", "trainer.global_batch_size=16",
            "optimizer.name=sgd", "optimizer.lr=0.1", f"trainer.noise_scale={str(measure).lower()}"])
        ds_config = build_deepspeed_config(config.engine, config.trainer, world, False)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        engine = Engine(model, param_groups(model, 0.0), optimizer_factory(config.optimizer, 16), None, ds_config,
                        measure_noise=measure)
        data = torch.Generator().manual_seed(100 + rank)
        norms = []
        for _ in range(3):
            for _ in range(2):  # accumulation: 2 micro-batches of 4 per rank
                x = torch.randn(4, 6, generator=data)
                loss = ((engine(x).squeeze(-1) - x.sum(-1)) ** 2).mean()
                engine.backward(loss)
                if measure and engine._engine.is_gradient_accumulation_boundary():
                    norms.append(engine.gradient_sq_norms)
                engine.step()
        out[(rank, measure)] = {"weights": [p.detach().clone() for p in model.parameters()], "norms": norms}


def test_measuring_the_noise_scale_leaves_training_unchanged_and_sees_each_ranks_gradient():
    from tests.helpers.gloo import spawn_gloo

    plain, measured = spawn_gloo(_train, 2, False), spawn_gloo(_train, 2, True)
    for rank in (0, 1):
        for a, b in zip(plain[(rank, False)]["weights"], measured[(rank, True)]["weights"]):
            assert torch.equal(a, b), "holding back DeepSpeed's all-reduce must not change the update"
    norms = [measured[(rank, True)]["norms"] for rank in (0, 1)]
    assert len(norms[0]) == 3
    for (local_0, reduced_0), (local_1, reduced_1) in zip(*norms):
        assert reduced_0 == pytest.approx(reduced_1, rel=1e-6), "every rank sees the same reduced gradient"
        assert local_0 != pytest.approx(local_1), "each rank sees its own gradient"
        # |mean of two vectors|^2 <= mean of their |.|^2, with equality only for equal gradients.
        assert reduced_0 < (local_0 + local_1) / 2


def test_noise_scale_needs_two_workers_zero_0_and_fp32():
    from distdl.config import load_config
    from distdl.errors import ConfigError

    for override in ("scaling.num_workers=1", "engine.zero_stage=1", "engine.precision=bf16"):
        with pytest.raises(ConfigError, match="trainer.noise_scale=true compares"):
            load_config(REPO / "configs/resnet/mnist_laptop.yaml", ["trainer.noise_scale=true", override,
                                                                      "trainer.global_batch_size=64"])
