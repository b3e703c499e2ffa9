"""Loading never executes code: a pickle payload planted in a checkpoint (tests/helpers/payloads.py) is
refused on every path that reads one, naming the file and the type it asked for, and never runs (its
sentinel file never appears). The runs are copies of tests/fixtures/previous_layout (an MLP saved by 2
workers at ZeRO-2 with AdamW), so each path reads the files of a real run.

Paths: a resume (checked on the driver, and by the workers' own loads), a resume on another worker
count (the universal checkpoint and DeepSpeed's converter), `distdl export`, `model.init_from` from a
folder and from a bucket, `eval.classifier_run`, and the trust opt-in for a user's own files. DeepSpeed's
loader inside an engine is checked in test_engine_steps.py, the Inception weights in test_gan_parts.py.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distdl.cli import main
from distdl.cluster.connect import connect_ray
from distdl.config import load_config
from distdl.driver import train
from distdl.engine import checkpoints
from distdl.engine.checkpoints import latest_checkpoint, reshard_checkpoint, restore_rng_state, trained_state
from distdl.engine.safe_loading import TRUST_VARIABLE
from distdl.errors import CheckpointError, TrainingFailed
from distdl.rundir import CONFIG_FILE
from tests.helpers.payloads import KINDS, plant_kind
from tests.helpers.previous_layout import FIXTURE, copy_run

pytestmark = pytest.mark.distributed

REFUSAL = r"asks for posix\.system, which a checkpoint of tensors never needs"


@pytest.fixture()
def run(tmp_path) -> Path:
    return copy_run(tmp_path / "runs")


@pytest.fixture()
def sentinel(tmp_path) -> Path:
    """The file a payload creates when it runs; no test may leave it behind."""
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a planted payload ran"


def plant_every_kind(run: Path, sentinel: Path) -> list[Path]:
    checkpoint = latest_checkpoint(run)
    return [file for kind in ("model states", "optimizer states", "random state")
            for file in plant_kind(checkpoint, kind, sentinel)]


def no_ray(config) -> None:
    raise AssertionError("refused before Ray starts: nothing connects")


def test_a_planted_payload_runs_when_unpickled_in_full(run, tmp_path):
    """What the other tests guard against is real: the planted file runs its payload when torch unpickles
    it in full, as DeepSpeed's loaders ask to."""
    ran = tmp_path / "ran"
    file = plant_kind(latest_checkpoint(run), "model states", ran)[0]
    torch.load(file, weights_only=False)
    assert ran.exists()


@pytest.mark.parametrize("kind", ["model states", "optimizer states", "random state"])
def test_each_kind_of_file_is_refused_by_its_reader_naming_it(run, sentinel, kind):
    checkpoint = latest_checkpoint(run)
    planted = plant_kind(checkpoint, kind, sentinel)
    with pytest.raises(CheckpointError, match=REFUSAL) as refused:
        if kind == "random state":
            restore_rng_state(checkpoint, 0, torch.device("cpu"))
        else:
            trained_state(run).weights()
    assert any(str(file) in str(refused.value) for file in planted), refused.value
    assert TRUST_VARIABLE in str(refused.value)


@pytest.mark.parametrize("kind", ["model states", "optimizer states", "random state"])
def test_a_resume_is_refused_before_any_worker_starts(run, sentinel, kind):
    planted = plant_kind(latest_checkpoint(run), kind, sentinel)
    with pytest.raises(CheckpointError, match=REFUSAL) as refused:
        train(load_config(run / CONFIG_FILE, ["trainer.stop_at_step=null"]), no_ray)
    assert str(planted[0]) in str(refused.value)


@pytest.mark.parametrize("kind, workers", [("optimizer states", 2), ("universal checkpoint", 1)],
                         ids=["as-saved", "resharded-to-1"])
def test_the_workers_own_loads_refuse_without_the_drivers_check(ray_local, run, sentinel, monkeypatch, kind,
                                                                 workers):
    """With the driver's check switched off, DeepSpeed's loader in each Ray Train worker refuses on its own:
    the run fails, naming the file, and the payload never runs."""
    checkpoint = latest_checkpoint(run)
    if kind == "universal checkpoint":
        assert reshard_checkpoint(checkpoint, workers)  # converted as a resume would; the resume reuses it
    planted = plant_kind(checkpoint, kind, sentinel)
    monkeypatch.setattr(checkpoints, "check_tensors_only", lambda folder: None)
    config = load_config(run / CONFIG_FILE, ["trainer.stop_at_step=null", f"scaling.num_workers={workers}",
                                             "trainer.gradient_accumulation_steps=null"])
    with pytest.raises(TrainingFailed) as failed:
        train(config, connect_ray)
    said = str(failed.value)
    assert "posix.system" in said and any(str(file) in said for file in planted), said


@pytest.mark.parametrize("kind", ["model states", "optimizer states"])
def test_resharding_for_another_worker_count_refuses(run, sentinel, kind):
    """distdl reads the optimizer shards first; DeepSpeed's converter, in a process of its own, reads the
    model states: the refusal reaches it too."""
    checkpoint = latest_checkpoint(run)
    planted = plant_kind(checkpoint, kind, sentinel)
    with pytest.raises(CheckpointError, match=REFUSAL) as refused:
        reshard_checkpoint(checkpoint, 1)
    assert any(str(file) in str(refused.value) for file in planted)


def test_export_refuses_and_writes_nothing(run, sentinel, tmp_path, capsys):
    plant_every_kind(run, sentinel)
    assert main(["export", str(run), str(tmp_path / "export")]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_init_from_a_folder_or_a_bucket_and_classifier_run_refuse(run, sentinel, s3_server):
    from distdl.workloads.classifier_run import trained_classifier
    from distdl.workloads.warm_start import locate

    plant_every_kind(run, sentinel)
    with pytest.raises(CheckpointError, match=REFUSAL):
        trained_classifier(run, key="eval.classifier_run")
    with pytest.raises(CheckpointError, match=REFUSAL):
        locate(str(latest_checkpoint(run)), "latest").trained.weights()
    s3_server.create_bucket(Bucket="planted")
    for file in run.rglob("*"):
        if file.is_file():
            s3_server.upload_file(str(file), "planted", f"runs/run/{file.relative_to(run)}")
    with pytest.raises(CheckpointError, match=REFUSAL):
        locate("s3://planted/runs/run", "latest").trained.weights()


def test_the_users_own_files_load_in_full_once_trusted_by_name(run, tmp_path, monkeypatch):
    """A run whose files hold a type outside the allowed few (here a Fraction) is refused, naming it, until
    the user names its folder in DISTDL_TRUSTED_CHECKPOINTS; then it exports as it did."""
    plant_file = next(latest_checkpoint(run).glob(KINDS["model states"]))
    saved = torch.load(plant_file, weights_only=False)
    saved["note"] = Fraction(1, 3)
    torch.save(saved, plant_file)
    with pytest.raises(CheckpointError, match=rf"{plant_file} asks for fractions\.Fraction"):
        trained_state(run).weights()
    monkeypatch.setenv(TRUST_VARIABLE, str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        trained_state(run).weights()
    monkeypatch.setenv(TRUST_VARIABLE, str(run))
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    then = load_file(FIXTURE / "step4.safetensors")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert all(torch.equal(exported[name], then[name]) for name in then)

