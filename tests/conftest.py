"""Shared fixtures. Distributed tests share one local Ray instance per module (ray.init costs ~8 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path("/usr/share/common-licenses")

# Set before anything imports distdl's registry; Ray workers inherit it and load the test plugins too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ["DISTDL_PLUGINS"] = "tests.plugins.crash_once"


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Tests never touch the user's HF cache or W&B settings."""
    cache = tmp_path_factory.mktemp("hf-cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_MODE", None)
    yield


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # 4 logical CPUs: two 1-CPU workers plus Ray Train's controller, on a 2-core machine.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture()
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    return CORPUS
