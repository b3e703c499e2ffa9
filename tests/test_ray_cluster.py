"""`ray.address` joins a real Ray cluster started with `ray start --head` (token auth on, as Ray 2.60 does)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path):
    port = free_port()
    start = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
             "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, timeout=120)
    yield f"127.0.0.1:{port}"
    # `ray stop` ends this machine's Ray processes; tests never leave another Ray running.
    subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)


def test_train_joins_an_existing_cluster(ray_head, tmp_path, corpus):
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / "configs/bert/pretrain_tiny.yaml"),
               f"ray.address={ray_head}", f"run.storage_path={tmp_path}", f"data.path={corpus}",
               "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
               "tokenizer.vocab_size=1000", "data.max_seq_length=32", "tracking.wandb_mode=disabled",
               "tracking.progress_bar=false"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" not in done.stderr + done.stdout
    assert "step 4/4 done" in done.stdout
    summary = json.loads((tmp_path / "bert-tiny" / "summary.json").read_text())
    assert summary["completed"] and len(summary["ray_node_ids"]) == 2
    # The head is still up and answers a client holding its token.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    status = subprocess.run([str(RAY), "status", f"--address={ray_head}"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
