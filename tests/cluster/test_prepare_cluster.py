"""`distdl prepare` on a real 2-node Ray cluster (two `ray start` nodes on this host, on their own
ports, started as the Slurm job starts them): both nodes write shards, the manifest says which, an
interrupted preparation goes on where it stopped, and training from the shards is training from the
raw corpus."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from distdl.config import load_config
from distdl.data import prepared, text
from distdl.preparation import MAX_CHUNK_BYTES
from distdl.rundir import read_metrics
from tests.cluster.test_ray_cluster import free_port
from tests.helpers.shared import CORPUS, QUIET, REPO

pytestmark = pytest.mark.distributed
TINY = REPO / "configs/bert/pretrain_tiny.yaml"
RESNET = REPO / "configs/resnet/mnist_laptop.yaml"
PACKED = "s3://packed/digits"


def port_block() -> int:
    """The first of 100 free ports (ray_node pins every port of a node to its block)."""
    while True:
        base = free_port() // 100 * 100
        if 20000 <= base <= 60000 and all(_free(base + offset) for offset in (0, 1, 2, 3, 10)):
            return base


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_server):
    """A head and a worker node of one CPU each, with a token of their own (and the S3 server's address)."""
    home = tmp_path_factory.mktemp("cluster-home")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    nodes, temp_dirs, head_base = [], [], port_block()
    address = f"127.0.0.1:{head_base}"
    try:
        for role, base in ((["--head"], head_base), ([f"--address={address}"], port_block() + 100)):
            temp_dir = tempfile.mkdtemp(prefix="distdl-prep-", dir="/tmp")  # short: Unix socket paths
            temp_dirs.append(temp_dir)
            command = [sys.executable, "-m", "distdl.cluster.ray_node", "start", *role, f"--port-base={base}",
                       "--num-cpus=1", f"--temp-dir={temp_dir}"]
            nodes.append(subprocess.Popen(command, env=env, cwd=home, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            wait = [sys.executable, "-m", "distdl.cluster.ray_node", "wait", f"--address={address}",
                    f"--nodes={len(nodes)}", "--timeout=180"]
            subprocess.run(wait, env=env, check=True, capture_output=True, timeout=240)
        yield {"address": address, "env": env}
    finally:
        for node in reversed(nodes):  # ray_node takes its node's whole process tree down on SIGTERM
            node.terminate()
            node.wait(timeout=60)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def distdl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "distdl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def preparations(two_nodes, tmp_path_factory, digits_folder, s3_server):
    """A text corpus (into a shared folder) and an image folder (into a bucket of the local S3 server)
    prepared on the cluster at once: they share its two CPUs, and their drivers' start-ups overlap.
    Each: its location, its command line and what it printed."""
    if not CORPUS.is_dir():
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    tmp = tmp_path_factory.mktemp("preparations")
    text.train_tokenizer(text.corpus_line_batches(text.TextDataSection(path=str(CORPUS))),
                         text.TokenizerSection(vocab_size=1000), tmp / "tokenizer")
    cluster = f"ray.address={two_nodes['address']}"
    s3_server.create_bucket(Bucket="packed")
    commands = {
        "text": ["prepare", str(TINY), *text_settings(tmp), f"data.prepared_path={tmp / 'prepared'}",
                 "data.lines_per_shard=1000", cluster],
        "images": ["prepare", str(RESNET), *image_settings(digits_folder), f"data.prepared_path={PACKED}",
                   "data.images_per_shard=500", cluster],
    }
    running = {name: subprocess.Popen([sys.executable, "-m", "distdl.cli", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=two_nodes["env"], cwd=REPO)
               for name, args in commands.items()}
    done = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
        done[name] = {"root": tmp / "prepared" if name == "text" else PACKED, "args": commands[name],
                      "stdout": stdout, "tmp": tmp}
    return done


def text_settings(tmp: Path) -> list[str]:
    return [f"data.path={CORPUS}", f"tokenizer.name_or_path={tmp / 'tokenizer'}", "data.max_seq_length=32"]


def image_settings(folder: Path) -> list[str]:
    return [f"data.path={folder}", "data.dataset=imagefolder", "data.image_size=32"]


def test_prepare_spreads_over_both_nodes_and_training_from_shards_equals_training_from_text(
        two_nodes, preparations, tmp_path, local_workers):
    root, prepare, stdout = (preparations["text"][key] for key in ("root", "args", "stdout"))
    settings = text_settings(preparations["text"]["tmp"])
    manifest = prepared.read_manifest(root)
    assert len(manifest["nodes"]) == 2, manifest["nodes"]  # SPREAD: every node wrote shards
    assert {r["node_id"] for r in manifest["shards"]} == set(manifest["nodes"])
    assert manifest["counts"]["shards"] == len(manifest["shards"]) == 3
    assert manifest["counts"]["lines"] == sum(len(b) for b in text.corpus_line_batches(text.TextDataSection(path=str(CORPUS))))
    assert f"in 3 shards from 2 node(s) at {root}" in stdout
    assert stdout.count("distdl: prepare: shards/shard-") == 3  # a plain line per shard in a log

    # Interrupted after two shards: the rerun makes the third only, and the same manifest.
    (root / prepared.MANIFEST).unlink()
    (root / prepared.shard_name(2)).with_suffix(".json").unlink()
    (root / prepared.IN_PROGRESS).write_text(json.dumps({**{k: manifest[k] for k in ("source", "settings")},
                                                         "layout": {"lines_per_shard": 1000,
                                                                    "max_chunk_bytes": MAX_CHUNK_BYTES}}))
    rerun = distdl(*prepare, env=two_nodes["env"])
    assert rerun.stdout.count("made earlier") == 2 and "shard-00002.arrow on " in rerun.stdout
    again = prepared.read_manifest(root)
    assert [r["sha256"] for r in again["shards"]] == [r["sha256"] for r in manifest["shards"]]
    assert not (root / prepared.IN_PROGRESS).exists()

    # Training: from the shards (no data.path: the manifest is the source) and from the raw corpus.
    runs = {"shards": ["data.path=null", f"data.prepared_path={root}"], "text": []}
    losses = {name: three_steps(local_workers, TINY, tmp_path, name, *settings, *data, "trainer.micro_batch_size=8",
                                "trainer.global_batch_size=16") for name, data in runs.items()}
    assert len(losses["shards"]) == 4 and losses["shards"] == losses["text"]


def three_steps(local_workers, config_file: Path, storage: Path, name: str, *overrides: str) -> list[float]:
    """A 3-step run on the local workers: its logged losses and its final eval loss."""
    config = load_config(config_file, [*overrides, f"run.storage_path={storage}", f"run.name={name}",
                                       "trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=3",
                                       "trainer.checkpoint_every=0", *QUIET])
    summary = local_workers.train(config)
    return [row["loss"] for row in read_metrics(config.run_dir) if "loss" in row] + [summary["final"]["eval_loss"]]


def test_an_image_folder_packed_across_both_nodes_trains_as_the_folder_does(preparations, tmp_path, digits_folder,
                                                                          local_workers):
    """Packed into a bucket: both nodes uploaded their shards and kept none; each training worker then
    fetches them into its node's cache, checked against their sha256."""
    root, stdout = preparations["images"]["root"], preparations["images"]["stdout"]
    folder = image_settings(digits_folder)
    storage = prepared.storage_at(root)
    manifest = prepared.read_manifest(prepared.pull_records(storage), "images")
    assert sorted(storage.file_names("shards")) == sorted(
        name for r in manifest["shards"] for name in (r["file"][7:], r["file"][7:-6] + ".json"))
    cache = Path(os.environ["DISTDL_CACHE"])
    assert not list(cache.rglob("*.arrow")), "the nodes uploaded their shards and kept no copy"
    assert len(manifest["nodes"]) == 2 and manifest["counts"]["examples"] == 1797
    assert [r["file"] for r in manifest["shards"]] == [f"shards/train-0000{i}.arrow" for i in range(3)] + [
        "shards/val-00000.arrow"]
    assert "prepared 1,797 images" in stdout

    # A 20-layer ResNet from the folder and from the shards (no data.path), augmented, with a DataLoader worker.
    runs = {"folder": [], "shards": ["data.path=null", f"data.prepared_path={root}"]}
    losses = {name: three_steps(local_workers, RESNET, tmp_path, name, *folder,
                                *data, "data.loader_workers=1", "trainer.epochs=null", "trainer.micro_batch_size=16",
                                "trainer.global_batch_size=32") for name, data in runs.items()}
    assert len(losses["shards"]) == 4 and losses["shards"] == losses["folder"]
    fetched = sorted(p.relative_to(storage.local).as_posix() for p in storage.local.rglob("*.arrow"))
    assert fetched == [r["file"] for r in manifest["shards"]]
