"""A run checkpointed by an earlier distdl (tests/fixtures/previous_layout, written at commit 61bd0de,
before checkpoints moved into distdl/engine/; tests/helpers/previous_layout.py says how) still reads,
exports and resumes: its weights are those that distdl exported then, to the bit, and the resumed run
ends where that run ends when it never stops."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distdl.cli import main
from distdl.cluster.connect import connect_ray
from distdl.config import load_config
from distdl.driver import train
from distdl.engine.checkpoints import latest_checkpoint, trained_state, verify_checkpoint
from distdl.models.classifiers import load_exported
from distdl.rundir import CONFIG_FILE, read_metrics
from tests.helpers.previous_layout import RUN_NAME
from tests.helpers.shared import REPO

pytestmark = pytest.mark.distributed
FIXTURE = REPO / "tests" / "fixtures" / "previous_layout"


@pytest.fixture()
def old_run(tmp_path) -> Path:
    """The fixture's run directory, copied where this test keeps its runs: its config names where the
    run lives, which is the one thing a moved run changes."""
    run_dir = tmp_path / "runs" / RUN_NAME
    shutil.copytree(FIXTURE / RUN_NAME, run_dir)
    saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    saved["run"]["storage_path"] = str(run_dir.parent)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    return run_dir


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
