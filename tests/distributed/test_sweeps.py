"""`distdl sweep` end to end on Ray Tune, 2 trials at a time, each a 2-worker Ray Train job with real
DeepSpeed: ASHA stops trials mid-run on real digits. A slice of the GLUE search, killed and resumed:
tests/distributed/test_sweep_resume.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from distdl import cli
from distdl.rundir import read_metrics, read_summary
from tests.helpers.shared import QUIET, REPO, git_head

pytestmark = pytest.mark.distributed
LAPTOP = REPO / "configs/resnet/mnist_laptop.yaml"
# Real 8x8 digits and a small MLP: 40 steps, evaluated every 10. SGD learns them at lr 0.3 and
# barely moves at 0.001. Optuna (TPE, seeded by run.seed) proposes the rates; seeded 6, it draws
# the good rates first, so ASHA has results to cut the poor ones against.
OPTUNA_DRAWS = [0.3, 0.1, 0.001, 0.001]
DIGITS_SWEEP = [
    "sweep.space={optimizer.lr: {choice: [0.3, 0.1, 0.003, 0.001]}}", "sweep.search=optuna", "sweep.samples=4",
    "run.seed=6", "sweep.metric=eval_top1", "sweep.mode=max",
    "sweep.scheduler=asha", "sweep.reduction_factor=2", "data.dataset=digits", "model.name=mlp",
    "model.hidden_sizes=[32]", "trainer.epochs=null", "trainer.max_steps=40", "trainer.eval_every=10",
    "trainer.checkpoint_every=20", "trainer.log_every=10", "scheduler.name=constant", "scheduler.warmup_ratio=0",
    *QUIET]


def test_optuna_proposes_asha_stops_the_poor_trials_mid_run_and_the_best_trial_exports(tmp_path):
    """Run as a user runs it: `distdl sweep` in its own process, with its own embedded Ray (4 logical
    CPUs: two 2-worker trials at once; with the dashboard, whose State API Ray Train's placement-group
    cleaner needs to give a stopped trial's CPUs back). Tune stays out of the test process."""
    command = [sys.executable, "-m", "distdl.cli", "sweep", str(LAPTOP), *DIGITS_SWEEP, "ray.num_cpus=4",
               f"run.storage_path={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = tmp_path / "resnet20-mnist-sweep"
    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["provenance"]["software"]["distdl"]["commit"] == git_head()
    rows = {row["trial"]: row for row in results["trials"]}
    # Optuna's trials are named by their random trial ids.
    assert len(rows) == 4 and all(re.fullmatch(r"trial[0-9a-f]{8}-lr[0-9.]+", name) for name in rows), rows
    assert sorted(row["optimizer.lr"] for row in rows.values()) == sorted(OPTUNA_DRAWS)
    # Each trial is an ordinary run with its own learning rate; its evaluations are the sweep's record.
    for name, row in rows.items():
        config = (sweep_dir / "trials" / name / "config.yaml").read_text()
        assert f"lr: {row['optimizer.lr']}" in config
        scores = [m["eval_top1"] for m in read_metrics(sweep_dir / "trials" / name) if "eval_top1" in m]
        # A stopped trial is ranked by the evaluations Tune heard before it stopped it (its workers may
        # log one more before they are killed).
        assert row["best"] in scores and row["steps"] <= 40
        if row["status"] == "finished":
            assert row["best"] == max(scores)
    # Tune's stop reaches a trial a few steps after its evaluation: one may even get to its last step,
    # but a stopped trial never finishes its session (no summary.json).
    stopped = [row for row in rows.values() if row["status"] == "stopped early"]
    assert any(row["steps"] < row["max_steps"] == 40 for row in stopped), rows
    assert all(read_summary(sweep_dir / "trials" / row["trial"]) == {} for row in stopped)
    finished = [row for row in rows.values() if row["status"] == "finished"]
    assert finished and all(row["steps"] == 40 for row in finished)
    best = max(rows.values(), key=lambda row: row["best"])
    summary = results["summary"]
    assert (summary["best_trial"], summary["best"]) == (best["trial"], best["best"]) and best["optimizer.lr"] >= 0.1
    # What exports is the best trial whose checkpoint Ray Train recorded (a stopped one may have none).
    exportable = max((row for row in rows.values() if row["checkpoint"]), key=lambda row: row["best"])
    best_run = sweep_dir / "trials" / exportable["trial"]
    assert f"to export: {best_run}" in done.stdout and finished[0]["checkpoint"]
    assert summary["trial_steps"] == sum(row["steps"] for row in rows.values()) < summary["trial_steps_without_stopping"]
    markdown = (sweep_dir / "report.md").read_text()
    assert f"**Best:** `{best['trial']}`" in markdown and f"distdl export {best_run} OUT_DIR" in markdown and "![metric_vs_values](metric_vs_values.png)" in markdown
    assert (sweep_dir / "metric_vs_values.png").stat().st_size > 10_000
    # The best trial's checkpoint exports.
    assert cli.main(["export", str(best_run), str(tmp_path / "exported")]) == 0
    assert any((tmp_path / "exported").iterdir())


def test_pbt_continues_the_poor_trial_from_the_good_ones_checkpoint_under_its_own_learning_rate(tmp_path):
    """Synchronous PBT over two digits trials, lr 0.3 and 0.001, 15 steps, checkpointed and evaluated
    every 5, perturbed at step 10: ranked together there, the poor trial continues from the good
    one's step-10 checkpoint as a new run, with the good one's rate perturbed to a neighbouring
    listed value, which the run's optimizer then uses. One worker per trial: PBT's decisions do not
    depend on it, and the two trials then share the 2 cores without a second process each."""
    pbt = [arg for arg in DIGITS_SWEEP if not arg.startswith(("sweep.", "run.seed", "trainer."))] + [
        "sweep.space={optimizer.lr: {grid: [0.3, 0.001]}}", "sweep.scheduler=pbt", "sweep.synchronous=true",
        "sweep.perturbation_steps=10", "sweep.quantile_fraction=0.5", "sweep.resample_probability=0",
        "sweep.metric=eval_top1", "sweep.mode=max", "trainer.max_steps=15", "trainer.eval_every=5",
        "trainer.checkpoint_every=5", "trainer.log_every=5", "scaling.num_workers=1", "ray.num_cpus=2",
        f"run.storage_path={tmp_path}"]
    done = subprocess.run([sys.executable, "-m", "distdl.cli", "sweep", str(LAPTOP), *pbt], capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = tmp_path / "resnet20-mnist-sweep"
    results = json.loads((sweep_dir / "results.json").read_text())
    rows = {row["trial"]: row for row in results["trials"]}
    good, poor = (next(name for name in rows if name.endswith(f"-lr{lr}")) for lr in (0.3, 0.001))
    assert (results["summary"]["trials"], results["summary"]["continued_from_another"]) == (2, 1), rows
    clone = next(row for row in rows.values() if row["from"] == f"{good} at step 10" and row["index"] != rows[good]["index"])
    assert clone["index"] == rows[poor]["index"] and clone["trial"] == f"{poor.split('-')[0]}-lr{clone['optimizer.lr']}-from10"
    assert rows[poor]["status"] == "replaced" and clone["status"] == "finished" and clone["optimizer.lr"] in (0.3, 0.001)
    # The new run starts at the good trial's step 10, with its weights: its evaluation at step 15 is
    # near the good trial's at 10, far above the poor trial's own.
    scores = {name: {m["step"]: m for m in read_metrics(sweep_dir / "trials" / name)} for name in (good, poor)}
    cloned = {m["step"]: m for m in read_metrics(sweep_dir / "trials" / clone["trial"])}
    assert min(cloned) > 10 and max(cloned) == 15 and read_summary(sweep_dir / "trials" / clone["trial"])["completed"]
    assert cloned[15]["eval_top1"] > scores[poor][10]["eval_top1"] + 0.3, (cloned[15], scores[poor][10])
    # It trains at its own rate (a constant schedule), not the checkpoint's.
    assert cloned[15]["lr"] == pytest.approx(clone["optimizer.lr"], rel=1e-9)
    lineage = json.loads((sweep_dir / "lineage" / f"{clone['trial']}.json").read_text())
    assert lineage == {"run": good, "step": 10, "values": {"optimizer.lr": clone["optimizer.lr"]}}
    assert "1 times a trial continued from another's checkpoint" in (sweep_dir / "report.md").read_text()
    assert results["summary"]["best_trial"] in {row["trial"] for row in rows.values() if row["status"] == "finished"}
