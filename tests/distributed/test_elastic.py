"""Elastic resume on real Ray Train with real DeepSpeed: a run checkpointed by N workers resumes on M,
keeps its global batch through gradient accumulation, continues the sample sequence where it stopped,
and ends with the weights of a run that never stopped. And a run checkpointed by an earlier distdl
(tests/fixtures/previous_layout, written at commit 61bd0de, before checkpoints moved into
distdl/engine/; tests/helpers/previous_layout.py says how) still reads, exports and resumes: its
weights are those that distdl exported then, to the bit, and the resumed run ends where that run ends
when it never stops."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distdl.cli import main
from distdl.cluster.connect import connect_ray
from distdl.config import load_config
from distdl.driver import train
from distdl.engine.checkpoints import (
    latest_checkpoint,
    reshard_checkpoint,
    saved_partitions,
    trained_state,
    verify_checkpoint,
)
from distdl.errors import CheckpointError
from distdl.models.classifiers import load_exported
from distdl.rundir import CONFIG_FILE, read_metrics
from tests.helpers.previous_layout import FIXTURE, copy_run
from tests.helpers.shared import QUIET, REPO

pytestmark = pytest.mark.distributed


def mlp_config(storage: Path, mnist_root: Path, name: str, workers: int, *overrides: str):
    """A small MLP on real digits with SGD and momentum (the state a reshard must carry, in slots
    DeepSpeed's converter has for Adam's moments; Adam's own is the Slurm test's, on BERT): 8 steps of a
    global batch of 32, checkpointed at step 4. Unaugmented, so only the summation order differs."""
    config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
        f"data.path={mnist_root}", f"run.storage_path={storage}", f"run.name={name}",
        f"scaling.num_workers={workers}", "model.name=mlp", "model.hidden_sizes=[64, 64]", "model.batch_norm=false",
        "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", "scheduler.name=linear",
        "trainer.epochs=null", "trainer.max_steps=8", "trainer.micro_batch_size=16", "trainer.global_batch_size=32",
        "trainer.log_every=2", "trainer.eval_every=8", "trainer.checkpoint_every=4", *QUIET, *overrides])
    return config


def mlp_run(storage: Path, mnist_root: Path, name: str, workers: int, *overrides: str):
    config = mlp_config(storage, mnist_root, name, workers, *overrides)
    return config, train(config, connect_ray)


@pytest.fixture(scope="module")
def straight(local_workers, tmp_path_factory, mnist_root):
    """The run that never stopped: 2 workers, no accumulation, ZeRO-0 (the same loop without Ray: it
    need not resume)."""
    # One checkpoint, at the end: the harness keeps no Ray Train record for a second save to back up.
    config = mlp_config(tmp_path_factory.mktemp("straight"), mnist_root, "straight", 2, "engine.zero_stage=0",
                        "trainer.checkpoint_every=8")
    local_workers.train(config, keep_checkpoints=True)
    return config


@pytest.mark.parametrize("stage, workers, on_s3", [(2, (2, 1, 2), True), (0, (1, 2, 1), False)],
                         ids=["zero2-2to1to2-on-s3", "zero0-1to2to1"])
def test_a_run_resumes_on_other_worker_counts_and_ends_as_if_it_never_stopped(ray_local, straight, tmp_path, s3_server,
                                                                                mnist_root, capsys, stage, workers, on_s3):
    """Three sessions on changing worker counts, stopped at steps 2 and 6: each resume reshards (ZeRO-2:
    2 partitions to 1, then 1 to 2) or loads whole (ZeRO-0), and keeps the global batch of 32.

    The ZeRO-2 run lives on the local S3 server (s3://): its checkpoints, resharding, metrics and
    summary go through object storage, and its export reads from there."""
    zero = f"engine.zero_stage={stage}"
    stops = ("trainer.stop_at_step=2", "trainer.stop_at_step=6", "trainer.stop_at_step=null")
    if on_s3:
        s3_server.create_bucket(Bucket="elastic")
    storage = "s3://elastic/runs" if on_s3 else tmp_path
    for session, (count, stop) in enumerate(zip(workers, stops)):
        config, summary = mlp_run(storage, mnist_root, "elastic", count, zero, stop)
        assert summary["steps"] == (2, 6, 8)[session] and summary["world_size"] == count
        assert summary["global_batch_size"] == 32 and config.trainer.gradient_accumulation_steps == 2 // count
        said = capsys.readouterr().out
        if session:
            saved_at = (2, 6)[session - 1]
            assert f"checkpoint_{saved_at:08d} was saved by {workers[session - 1]} workers; resuming on {count}" in said
            # ZeRO-2's state is partitioned: resharded through DeepSpeed's universal checkpoint, beside the original.
            assert ("universal checkpoint" in said) == (stage > 0)
    assert summary["completed"]
    expected = trained_state(straight.run_dir / "checkpoint_00000008").weights()
    resumed = trained_state(config.run_storage.uri).weights()
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # Every loss logged after the first stop is the uninterrupted run's: the sample sequence continued.
    losses = {m["step"]: m["loss"] for m in read_metrics(straight.run_dir) if "loss" in m}
    after = {m["step"]: m["loss"] for m in read_metrics(config.run_dir) if "loss" in m and m["step"] > 2}
    assert sorted(after) == [4, 6, 8]
    assert after == pytest.approx({step: losses[step] for step in after}, rel=1e-5)
    if on_s3:
        run_lived_on_object_storage(config, s3_server, tmp_path, capsys, resumed)


def run_lived_on_object_storage(config, s3, tmp_path: Path, capsys, weights: dict) -> None:
    """Everything of the run is in the bucket, the export reads it from there, a next run can start from
    it (model.init_from=s3://...), the local disk holds only copies in the cache, and the credentials
    were never printed."""
    from distdl.workloads.warm_start import locate
    from tests.conftest import S3_CREDENTIALS

    keys = {item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="elastic")
            for item in page.get("Contents", [])}
    top = {key.removeprefix("runs/elastic/").split("/")[0] for key in keys}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint_00000008",
            "checkpoint_manager_snapshot.json"} <= top, top
    # The resume on 2 workers resharded checkpoint 6 (saved by 1) in the working copy and pushed the result.
    assert any(key.startswith("runs/elastic/checkpoint_00000006/global_step6_universal/") for key in keys)
    summary = json.loads(s3.get_object(Bucket="elastic", Key="runs/elastic/summary.json")["Body"].read())
    assert summary["steps"] == 8 and summary["completed"]
    assert main(["export", "s3://elastic/runs/elastic", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
    source = locate("s3://elastic/runs/elastic", "latest")
    assert source.is_run and source.checkpoint.name == "checkpoint_00000008"
    started_from = source.trained.weights()
    assert all(torch.equal(started_from[name], weights[name]) for name in weights)
    assert locate("s3://elastic/runs/elastic/checkpoint_00000006", "latest").checkpoint.name == "checkpoint_00000006"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no run directory was made locally
    assert Path(os.environ["DISTDL_CACHE"]) in config.run_dir.parents
    said = capsys.readouterr()
    assert not any(secret in said.out + said.err for secret in S3_CREDENTIALS.values())


def test_state_the_universal_checkpoint_cannot_carry_is_refused_naming_why(local_workers, tmp_path, mnist_root):
    """At ZeRO-3 DeepSpeed's converter reads Adam's moments only: SGD's momentum there is refused before
    anything is written, naming what the optimizer keeps and what to do."""
    config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [
        f"data.path={mnist_root}", f"run.storage_path={tmp_path}", "model.name=mlp", "model.hidden_sizes=[16]",
        "engine.zero_stage=3", "trainer.epochs=null", "trainer.max_steps=2", "trainer.checkpoint_every=2",
        *QUIET])
    local_workers.train(config, keep_checkpoints=True)
    checkpoint = config.run_dir / "checkpoint_00000002"
    assert saved_partitions(checkpoint) == 2 and not reshard_checkpoint(checkpoint, 2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=r"from 2 workers to 1: at ZeRO-3 .* Adam-style moments only .* "
                                              r"keeps momentum_buffer\. Resume on the worker count that saved it"):
        reshard_checkpoint(checkpoint, 1)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------------------- a checkpoint of an earlier distdl

@pytest.fixture()
def old_run(tmp_path) -> Path:
    return copy_run(tmp_path / "runs")


def assert_equal_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], **tolerance) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=lambda message, name=name: f"{name}: {message}",
                                   **(tolerance or {"rtol": 0, "atol": 0}))


def test_a_checkpoint_of_the_previous_layout_reads_and_exports_as_it_did(old_run, tmp_path):
    checkpoint = latest_checkpoint(old_run)
    assert checkpoint.name == "checkpoint_00000004"
    verify_checkpoint(checkpoint)
    then = load_file(FIXTURE / "step4.safetensors")
    assert_equal_weights(trained_state(old_run).weights(), then)
    assert main(["export", str(old_run), str(tmp_path / "export")]) == 0
    assert_equal_weights(load_file(tmp_path / "export" / "model.safetensors"), then)
    assert load_exported(tmp_path / "export")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_a_run_of_the_previous_layout_resumes_and_ends_as_if_it_never_stopped(ray_local, old_run):
    logged_before = read_metrics(old_run)
    config = load_config(old_run / CONFIG_FILE, ["trainer.stop_at_step=null"])
    summary = train(config, connect_ray)
    assert summary["steps"] == 6 and summary["completed"] and summary["world_size"] == 2
    # It went on from step 4 (optimizer moments, schedule and data order as saved), not from the start.
    assert [m["step"] for m in read_metrics(old_run)[len(logged_before):] if "loss" in m] == [5, 6]
    final = trained_state(old_run).weights()
    # Only the summation order of a machine's kernels may differ from the run that wrote the fixture.
    assert_equal_weights(final, load_file(FIXTURE / "step6_uninterrupted.safetensors"), rtol=1e-5, atol=1e-6)
    step4 = load_file(FIXTURE / "step4.safetensors")
    assert max((final[name] - step4[name]).abs().max() for name in final) > 1e-3, "the resumed run did not train"
