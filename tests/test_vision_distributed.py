"""ResNets on 2 Ray Train workers with real DeepSpeed, on real MNIST digits."""

from __future__ import annotations

from pathlib import Path

import pytest

from distdl.config import load_config
from distdl.driver import train
from distdl.tracking import read_metrics

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    from tests.vision_fixtures import write_mnist

    return write_mnist(tmp_path_factory.mktemp("mnist"))  # 4,000 train and 1,000 test digits


def test_resnet_learns_real_digits_with_zero1(ray_local, tmp_path, mnist_root):
    config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
        f"data.path={mnist_root}", f"run.storage_path={tmp_path}", "trainer.epochs=2", "trainer.log_every=5",
        "engine.zero_stage=1", "tracking.wandb_mode=disabled", "tracking.progress_bar=false",
    ])
    summary = train(config)
    losses = [m["loss"] for m in read_metrics(config.run_dir) if "loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses
    final = summary["final"]
    assert final["eval_top1"] > 0.6 and final["eval_top5"] >= final["eval_top1"], final  # chance: 0.1 and 0.5
    assert final["eval_images"] == 1000, "every test digit counted once across the two ranks"
    assert summary["parameter_checksums"][0] == summary["parameter_checksums"][1]
    # ZeRO-1 splits SGD's momentum between the two ranks: each holds about half of the parameters' size.
    for memory in summary["memory_per_rank"]:
        assert memory["optimizer_state_mib"] == pytest.approx(0.5 * memory["parameters_mib"], rel=0.05), memory
        assert memory["peak_rss_mib"] > memory["parameters_mib"]
