"""The large-batch recipes' schedules against their formulas, and the optimizers the config names."""

from __future__ import annotations

import pytest
import torch

from distdl.config import load_config
from distdl.errors import ConfigError
from distdl.optim import optimizer_factory, scheduler_factory
from distdl.optim.layerwise import Lamb, Lars
from tests.helpers.shared import REPO

LR, STEPS, WARMUP = 0.4, 20, 4


def config(*overrides: str):
    return load_config(REPO / "configs/resnet/mnist_laptop.yaml", [f"optimizer.lr={LR}", *overrides])


def lrs(*overrides: str) -> list[float]:
    """The learning rate of each optimizer step 1..STEPS."""
    section = config(*overrides, f"scheduler.warmup_steps={WARMUP}").scheduler
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = scheduler_factory(section, STEPS)(optimizer)
    seen = []
    for _ in range(STEPS):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


@pytest.mark.parametrize("power, lr_end", [(0.5, 0.0), (2.0, 1e-3)])
def test_polynomial_decay_follows_its_formula(power, lr_end):
    seen = lrs("scheduler.name=polynomial", f"scheduler.power={power}", f"scheduler.lr_end={lr_end}")
    for step, lr in enumerate(seen):
        if step < WARMUP:
            expected = LR * step / WARMUP
        else:
            expected = lr_end + (LR - lr_end) * (1 - (step - WARMUP) / (STEPS - WARMUP)) ** power
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize("name", ["polynomial", "linear", "cosine", "step"])
def test_a_warmup_as_long_as_the_run_steps_to_its_end(name):
    """transformers' polynomial decay alone divided by zero at the last step here."""
    section = config(f"scheduler.name={name}", f"scheduler.warmup_steps={WARMUP}").scheduler
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = scheduler_factory(section, WARMUP)(optimizer)
    seen = []
    for _ in range(WARMUP + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen[:WARMUP] == pytest.approx([LR * step / WARMUP for step in range(WARMUP)], rel=1e-12)


def test_step_decay_multiplies_by_gamma_at_each_milestone():
    seen = lrs("scheduler.name=step", "scheduler.milestones=[0.5,0.75]", "scheduler.gamma=0.1")
    assert seen[:WARMUP] == pytest.approx([LR * s / WARMUP for s in range(WARMUP)])
    assert seen[WARMUP:10] == pytest.approx([LR] * (10 - WARMUP))  # until 0.5 x 20 steps
    assert seen[10:15] == pytest.approx([LR * 0.1] * 5)
    assert seen[15:] == pytest.approx([LR * 0.01] * 5)


@pytest.mark.parametrize("overrides, message", [
    (("scheduler.name=polynomial", "scheduler.lr_end=0.5"), "scheduler.lr_end=0.5 must be below optimizer.lr=0.4"),
    (("scheduler.name=step", "scheduler.milestones=[0.7,0.3]"), "scheduler.milestones=[0.7, 0.3] must be increasing"),
])
def test_schedules_that_cannot_run_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config(*overrides)


@pytest.mark.parametrize("name, cls, setting", [("lamb", Lamb, ("eps", 1e-6)), ("lars", Lars, ("trust_coefficient", 0.02))])
def test_the_config_builds_lamb_and_lars_with_its_settings(name, cls, setting):
    key, value = setting
    section = config(f"optimizer.name={name}", f"optimizer.{key}={value}", "optimizer.weight_decay=0.05").optimizer
    optimizer = optimizer_factory(section, 64)([{"params": [torch.nn.Parameter(torch.zeros(2, 2))]}])
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group[key]) == (LR, 0.05, value)
