"""Run directories on object storage, against a local S3-compatible server (moto's, standing in for S3):
the run directory's operations mean the same on a folder and in a bucket, Ray Train's checkpoint record is
backed up and restored there, and a bucket that is missing, unreachable or refuses the credentials stops
`distdl train` before anything starts, naming the URI. (A whole run, resumed and exported on s3://, is
tests/distributed/test_elastic.py's ZeRO-2 case.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from distdl.cli import main
from distdl.rundir import RAY_SNAPSHOT, SNAPSHOT_BACKUP, RunStorage, back_up_snapshot, restore_snapshot
from tests.conftest import S3_CREDENTIALS
from tests.helpers.shared import QUIET, REPO


@pytest.fixture(params=["folder", "s3"])
def storage(request, tmp_path):
    """The same run directory on a local folder and in a bucket."""
    if request.param == "folder":
        return RunStorage(tmp_path / "runs" / "run")
    bucket = f"alike-{uuid.uuid4().hex[:12]}"
    request.getfixturevalue("s3_server").create_bucket(Bucket=bucket)
    return RunStorage(f"s3://{bucket}/runs/run")


def test_a_run_directory_reads_and_writes_alike_in_a_folder_and_a_bucket(storage):
    assert not storage.exists() and storage.entries() == [] and storage.read_text("config.yaml") is None
    storage.write_text("config.yaml", "workload: resnet\n")
    storage.write_text(RAY_SNAPSHOT, "{}")
    storage.local.mkdir(parents=True, exist_ok=True)
    (storage.local / "tokenizer").mkdir()
    (storage.local / "tokenizer" / "vocab.txt").write_text("[PAD]\n")
    (storage.local / "checkpoint_00000002" / "global_step2").mkdir(parents=True)
    (storage.local / "checkpoint_00000002" / "global_step2" / "model.pt").write_bytes(b"weights")
    if storage.remote:  # what Ray Train would upload, and the tokenizer the driver pushes
        storage.push_written_since(0, folder="checkpoint_00000002")
        storage.push_files([storage.local / "tokenizer" / "vocab.txt"])
    assert storage.read_text("config.yaml") == "workload: resnet\n" and storage.exists("config.yaml")
    assert storage.entries() == ["checkpoint_00000002", RAY_SNAPSHOT, "config.yaml", "tokenizer"]
    # Ray Train's own record is named like a checkpoint but is not one.
    assert storage.checkpoints() == ["checkpoint_00000002"]
    assert storage.file_names("checkpoint_00000002") == ["global_step2/model.pt"]
    storage.delete("config.yaml")
    assert not storage.exists("config.yaml") and storage.read_text("config.yaml") is None


def test_a_pull_brings_everything_but_checkpoints_and_a_push_only_what_was_written_since(s3_server, tmp_path):
    s3_server.create_bucket(Bucket="pull")
    storage = RunStorage("s3://pull/runs/run")
    for key, body in {"config.yaml": b"a: 1\n", "tokenizer/vocab.txt": b"[PAD]\n", RAY_SNAPSHOT: b"{}",
                      "checkpoint_00000004/latest": b"global_step4"}.items():
        s3_server.put_object(Bucket="pull", Key=f"runs/run/{key}", Body=body)
    storage.local.mkdir(parents=True)
    (storage.local / "left-by-a-deleted-run.txt").write_text("stale")
    (storage.local / "slurm").mkdir()
    (storage.local / "slurm" / "slurm-7.out").write_text("the job's own log, being written\n")
    (storage.local / "tokenizer").mkdir()
    (storage.local / "tokenizer" / ".vocab.txt.4242.partial").write_text("another process's download")
    storage.pull()
    pulled = sorted(p.relative_to(storage.local).as_posix() for p in storage.local.rglob("*") if p.is_file())
    assert pulled == [RAY_SNAPSHOT, "config.yaml", "slurm/slurm-7.out", "tokenizer/.vocab.txt.4242.partial",
                      "tokenizer/vocab.txt"]
    assert (storage.local / "tokenizer" / "vocab.txt").read_text() == "[PAD]\n"
    assert storage.pull_checkpoint("checkpoint_00000004").joinpath("latest").read_text() == "global_step4"
    storage.pull()  # a checkpoint once pulled is kept; it is checked against the store when used again
    assert (storage.local / "checkpoint_00000004" / "latest").is_file()
    s3_server.put_object(Bucket="pull", Key="runs/run/checkpoint_00000004/latest", Body=b"global_step4b")
    assert storage.pull_checkpoint("checkpoint_00000004").joinpath("latest").read_text() == "global_step4b"

    since = storage.clock()
    (storage.local / "metrics.jsonl").write_text('{"step": 1}\n')
    os.utime(storage.local / "config.yaml", (since - 60, since - 60))  # pulled before: not pushed back
    storage.write_text("config.yaml", "a: 2\n")  # ... but written straight to the bucket
    storage.push_written_since(since)
    assert storage.read_text("metrics.jsonl") == '{"step": 1}\n' and storage.read_text("config.yaml") == "a: 2\n"


def test_ray_trains_record_is_backed_up_and_restored_in_a_bucket(s3_server):
    """The controller rewrites its record in place; distdl's copy of it restores one cut short."""
    s3_server.create_bucket(Bucket="record")
    storage = RunStorage("s3://record/runs/run")
    record = json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000002"}})
    storage.write_text(RAY_SNAPSHOT, record)
    assert not back_up_snapshot(storage, "checkpoint_00000004", timeout_s=0.2)  # not recorded yet
    assert back_up_snapshot(storage, "checkpoint_00000002") and storage.read_text(SNAPSHOT_BACKUP) == record
    assert restore_snapshot(storage) is None  # a whole record is left alone
    storage.write_text(RAY_SNAPSHOT, record[:17])
    assert "s3://record/runs/run/checkpoint_manager_snapshot.json was cut short" in restore_snapshot(storage)
    assert storage.read_text(RAY_SNAPSHOT) == record and not storage.exists(SNAPSHOT_BACKUP)


@pytest.fixture()
def refusing_server():
    """A second S3 server that checks credentials: it knows none of ours."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.1)
    yield endpoint
    server.kill()
    server.wait()


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint", "refused credentials"])
def test_a_bucket_that_cannot_be_used_stops_train_naming_the_uri(s3_server, case, request, tmp_path, monkeypatch,
                                                                   capsys):
    bucket = {"missing bucket": "no-such-bucket"}.get(case, "runs")
    if case == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    elif case == "refused credentials":
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("refusing_server"))
    monkeypatch.chdir(tmp_path)
    status = main(["train", str(REPO / "configs/resnet/mnist_laptop.yaml"), f"run.storage_path=s3://{bucket}/team",
                   "run.name=bad", "data.dataset=mnist5k", *QUIET])
    said = capsys.readouterr()
    assert status == 2
    reason = {"missing bucket": "NO_SUCH_BUCKET", "unreachable endpoint": "Could not connect",
              "refused credentials": "ACCESS_DENIED"}[case]
    assert "run.storage_path: cannot " in said.err and f"s3://{bucket}/team/bad (" in said.err, said.err
    assert reason in said.err and "AWS_ENDPOINT_URL" in said.err, said.err
    assert not any(secret in said.out + said.err for secret in S3_CREDENTIALS.values())
    assert list(tmp_path.iterdir()) == []  # nothing was written locally


def test_a_uri_with_credentials_or_options_is_refused_without_printing_them():
    from distdl.errors import ConfigError

    for uri in ("s3://AKIAEXAMPLE:hunter2@bucket/runs", "s3://bucket/runs?endpoint_override=localhost:9000"):
        with pytest.raises(ConfigError, match=r"data.prepared_path: give the URI as scheme://bucket/path") as refused:
            RunStorage(uri, key="data.prepared_path")
        assert "hunter2" not in str(refused.value) and "localhost" not in str(refused.value)


def test_a_study_on_object_storage_is_refused(s3_server):
    from distdl.errors import ConfigError
    from distdl.studies.runner import read_study

    study = REPO / "configs/studies/sharpness.yaml"
    with pytest.raises(ConfigError, match=r"run.storage_path=s3://b/x: a study keeps its directory on a local"):
        read_study("sharpness", study, ["run.storage_path=s3://b/x"])


def test_shards_on_object_storage_are_fetched_once_per_node_checked_and_refused_when_damaged(
        s3_server, digits_folder, tmp_path, monkeypatch):
    """What `distdl prepare` leaves in a bucket (shards uploaded, then their records, no local copy) is
    fetched into a node's cache whole, once; a shard altered or missing in the bucket is named."""
    from distdl.data import packed_images, prepared
    from distdl.errors import ConfigError

    s3_server.create_bucket(Bucket="shards")
    monkeypatch.setenv("DISTDL_CACHE", str(tmp_path / "preparing-node"))
    writer = prepared.storage_at("s3://shards/digits")
    _, samples = packed_images.listing(digits_folder, "train")
    records = [packed_images.make_image_shard(writer.local, "train", index, first, str(digits_folder / "train"),
                                              samples[first : first + 600])
               for index, first in enumerate(range(0, len(samples), 600))]
    for record in records:
        prepared.publish(writer, record)
    prepared.write_manifest(writer.local, {"shards": records}, "images")
    writer.push(prepared.MANIFEST)
    assert not list(writer.local.rglob("*.arrow")), "published shards leave no local copy"

    monkeypatch.setenv("DISTDL_CACHE", str(tmp_path / "training-node"))
    reader = prepared.storage_at("s3://shards/digits")
    manifest = prepared.read_manifest(prepared.pull_records(reader), "images")
    prepared.check_shards(reader.local, manifest["shards"], storage=reader)
    downloads = []
    monkeypatch.setattr(type(reader), "download", _counting(type(reader).download, downloads))
    prepared.fetch_shards(reader, manifest["shards"], threads=2)
    prepared.fetch_shards(reader, manifest["shards"], threads=2)  # a second worker of the node: nothing to do
    assert len(downloads) == len(records) == 3
    for record in records:
        assert prepared.file_digest(reader.local / record["file"]) == record["sha256"]
    images = packed_images.PackedImages(reader.local, manifest["shards"], transform=lambda image: image.size)
    assert len(images) == len(samples) and images[len(samples) - 1] == (((8, 8)), samples[-1][1])

    damaged = dict(Bucket="shards", Key="digits/shards/train-00001.arrow")
    body = bytearray(s3_server.get_object(**damaged)["Body"].read())
    body[-100] ^= 0xFF  # same size: only the digest tells
    s3_server.put_object(**damaged, Body=bytes(body))
    monkeypatch.setenv("DISTDL_CACHE", str(tmp_path / "another-node"))
    other = prepared.storage_at("s3://shards/digits")
    prepared.pull_records(other)
    with pytest.raises(ConfigError, match=r"shard s3://shards/digits/shards/train-00001.arrow is corrupt: its sha256"):
        prepared.fetch_shards(other, manifest["shards"])
    assert not (other.local / "shards" / "train-00001.arrow").exists()
    assert not list((other.local / "shards").glob(".*partial*"))
    s3_server.delete_object(Bucket="shards", Key="digits/shards/train-00002.arrow")
    with pytest.raises(ConfigError, match=r"shard s3://shards/digits/shards/train-00002.arrow is missing"):
        prepared.check_shards(other.local, manifest["shards"], storage=other)


def _counting(method, calls: list):
    def counted(self, *args, **kwargs):
        calls.append(args)
        return method(self, *args, **kwargs)

    return counted
