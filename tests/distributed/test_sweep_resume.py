"""A sweep whose driver is killed mid-trial resumes with the same command (Tune's experiment restore):
the finished trial is kept, the interrupted one resumes from its last recorded checkpoint, and no
step is trained twice in any trial's record. The driver runs as a user's would: its own process, its
own embedded Ray (so this module holds no Ray of its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distdl.engine.checkpoints import latest_checkpoint
from distdl.errors import ConfigError
from distdl.rundir import read_metrics, read_summary
from tests.helpers.shared import QUIET, REPO, wait_for

pytestmark = pytest.mark.distributed




def recorded(run_dir: Path) -> bool:
    try:
        latest_checkpoint(run_dir)
        return True
    except ConfigError:
        return False


def test_a_killed_slice_of_the_glue_search_resumes_and_report_glue_picks_its_best(tmp_path, glue_dir, tiny_bert):
    """Two of the GLUE search's 24 trials (the task config and configs/glue/search.yaml as shipped, its
    scheduler off so that both run to their end) on a fixture task, with a 2-layer BERT."""
    command = [sys.executable, "-m", "distdl.cli", "sweep", str(REPO / "configs/glue/rte.yaml"),
               "--sweep", str(REPO / "configs/glue/search.yaml"), "sweep.scheduler=none",
               "sweep.space.trainer.global_batch_size={grid: [16]}", "sweep.space.trainer.epochs={grid: [2, 6]}",
               "sweep.space.optimizer.lr={grid: [5.0e-4]}", "trainer.micro_batch_size=8",
               f"model.name_or_path={tiny_bert}", f"data.path={glue_dir}", "data.max_seq_length=32",
               "trainer.log_every=5", "trainer.eval_every=5", "trainer.checkpoint_every=5",
               f"run.storage_path={tmp_path}", *QUIET]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    sweep_dir = tmp_path / "glue-rte-sweep"
    first = sweep_dir / "trials" / "trial00000-global_batch_size16-epochs2-lr0.0005"
    # The second trial is the longer: killed at its first recorded checkpoint, it is far from its end.
    second = sweep_dir / "trials" / "trial00001-global_batch_size16-epochs6-lr0.0005"
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            # Killed once the first trial has finished and the second has a checkpoint Ray Train recorded.
            wait_for(lambda: driver.poll() is not None or (read_summary(first).get("completed") and recorded(second)),
                     400, "the second trial's first recorded checkpoint")
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(30)
    assert not read_summary(second), "killed before the second trial's end"
    kept = (first / "metrics.jsonl").stat().st_mtime_ns
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming the sweep's trials" in output and f"resuming run {second}" in output, output[-3000:]
    assert (first / "metrics.jsonl").stat().st_mtime_ns == kept, "the finished trial is not trained again"
    assert read_summary(second)["completed"] and read_summary(second)["steps"] == 60
    steps = [m["step"] for m in read_metrics(second) if "loss" in m]
    assert steps == list(range(5, 61, 5)), steps
    # The GLUE table over the sweep's trials shows the one the sweep ranks first.
    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["summary"]["metric"] == "eval_accuracy" and len(results["trials"]) == 2
    table = subprocess.run([sys.executable, "-m", "distdl.cli", "report", "glue", str(first), str(second)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert f"| {results['summary']['best_trial']} |" in table.stdout, table.stdout + table.stderr
