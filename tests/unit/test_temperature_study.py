"""The temperature study without training: its exponent fit against known answers, its grid of
trials, its report from measurements of known form, and the inputs it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distdl import cli
from distdl.studies.base import read_study_file
from distdl.studies.temperature import TemperatureStudy, temperature_exponent
from tests.helpers.shared import REPO

TEMPERATURE = REPO / "configs/studies/temperature.yaml"
RATES, BATCHES = [0.01, 0.03, 0.1, 0.3], [16, 64, 256]


def _grid(seeds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    lr, batch = np.meshgrid(RATES, BATCHES, indexing="ij")
    return np.tile(lr.ravel(), seeds), np.tile(batch.ravel(), seeds)


@pytest.mark.parametrize("k", [0.0, 0.5, 1.0])
def test_the_exponent_fit_recovers_the_k_the_measure_was_made_with(k):
    lr, batch = _grid()
    u = np.log(lr) - k * np.log(batch)
    noise = np.random.default_rng(0).normal(0, 0.005, len(u))
    accuracy = 0.9 - 0.02 * (u + 5) ** 2 + noise  # a peak in lr / B^k, as test accuracy has
    fit = temperature_exponent(lr, batch, accuracy)
    assert fit["exponent"] == pytest.approx(k, abs=0.1)
    assert fit["interval"][0] <= k <= fit["interval"][1] and fit["interval"][1] - fit["interval"][0] < 0.5
    assert fit["r2"] > 0.9 and fit["follows_lr_over_b"] is (k == 1.0)
    # A curvature measure, fitted on its logarithm.
    eigenvalue = np.exp(2.0 - 0.5 * u + noise)
    assert temperature_exponent(lr, batch, eigenvalue, log=True)["exponent"] == pytest.approx(k, abs=0.1)


def test_a_measure_of_lr_alone_is_refused_lr_over_b():
    lr, batch = _grid()
    fit = temperature_exponent(lr, batch, 0.5 + 0.1 * np.log(lr) + np.random.default_rng(1).normal(0, 0.002, len(lr)))
    assert fit["exponent"] == pytest.approx(0.0, abs=0.05) and not fit["follows_lr_over_b"]


def _study(tmp_path: Path, *overrides: str) -> TemperatureStudy:
    study_file = read_study_file(TEMPERATURE, [f"run.storage_path={tmp_path}", *overrides])
    return TemperatureStudy(TemperatureStudy.parse_section(study_file.study), study_file.training, tmp_path / "study")


def test_the_grid_trains_every_cell_at_its_own_rate_for_the_same_epochs(tmp_path):
    study = _study(tmp_path)
    trials = study.trials(4000)
    assert len(trials) == 9
    cells = {(t.tags["lr"], t.tags["batch_size"]): t for t in trials}
    assert set(cells) == {(lr, b) for lr in (0.02, 0.06, 0.2) for b in (32, 128, 512)}
    # 5 epochs of 4,000 digits, 2,000 per worker in whole steps: 125, 31 and 7 steps an epoch.
    assert {b: cells[0.02, b].tags["steps"] for b in (32, 128, 512)} == {32: 625, 128: 155, 512: 35}
    config = study.trial_config(cells[0.2, 128])
    assert (config.optimizer.lr, config.optimizer.reference_batch_size) == (0.2, None)
    assert (config.trainer.global_batch_size, config.trainer.micro_batch_size) == (128, 64)


def test_the_report_fits_each_measure_and_draws_its_heat_map(tmp_path):
    """Measurements that are functions of lr/B: the report finds k = 1 for each."""
    from PIL import Image

    study = _study(tmp_path, "study.learning_rates=[0.01,0.03,0.1,0.3]", "study.batch_sizes=[16,64,256]",
                   "study.seeds=[0,1]")
    rng = np.random.default_rng(2)
    trials = study.trials(4000)
    for trial in trials:
        u = np.log(trial.tags["lr"] / trial.tags["batch_size"])
        measured = {"test_accuracy": 0.9 - 0.02 * (u + 6) ** 2 + rng.normal(0, 0.003),
                    "train_loss": 0.1, "hessian_top_eigenvalue": float(np.exp(1 - 0.7 * u + rng.normal(0, 0.02))),
                    "adaptive_sharpness_eps1e-3": float(np.exp(-3 - 0.5 * u + rng.normal(0, 0.02))),
                    "sharpness_eps1e-3": float(np.exp(-2 - 0.5 * u + rng.normal(0, 0.02))),
                    "hessian_trace": float(np.exp(3 - 0.4 * u + rng.normal(0, 0.02)))}
        run_dir = study.trial_config(trial).run_dir
        run_dir.mkdir(parents=True)
        (run_dir / "measurements.json").write_text(json.dumps(measured))
    study.study_dir.mkdir(parents=True, exist_ok=True)
    report = study.write_report(trials)
    fits = report.results["fits"]
    assert set(fits) == {"test_accuracy", "hessian_top_eigenvalue", "adaptive_sharpness_eps1e-3",
                         "sharpness_eps1e-3", "hessian_trace"}
    for key, fit in fits.items():
        assert fit["exponent"] == pytest.approx(1.0, abs=0.1), key
        assert fit["follows_lr_over_b"] and fit["log"] == (key != "test_accuracy"), key
    assert len(report.results["entries"]) == 24
    assert "follows lr/B (k = 1 inside)" in report.markdown and "| yes" in report.markdown
    assert Image.open(report.plots["temperature_heatmaps"]).size[0] > 1000


def test_equal_loss_trains_every_cell_to_the_target_and_fits_only_the_cells_that_reached_it(tmp_path):
    """At equal epochs lr/B also fixes steps x lr; under equal_loss every cell stops at the same
    training loss, and a cell that never reached it is left out of the fits."""
    study = _study(tmp_path, "study.protocol=equal_loss", "study.target_loss=0.1", "study.max_steps=2000")
    trials = study.trials(4000)
    config = study.trial_config(trials[0])
    assert trials[0].name == "lr0.02-batch32-seed0-loss0.1"
    assert (config.trainer.stop_at_loss, config.trainer.max_steps) == (0.1, 2000)
    for trial in trials:
        run_dir = study.trial_config(trial).run_dir
        run_dir.mkdir(parents=True)
        u = np.log(trial.tags["lr"] / trial.tags["batch_size"])
        (run_dir / "measurements.json").write_text(json.dumps({"test_accuracy": 0.9 + 0.01 * u, "train_loss": 0.1}))
        # The coldest cell (lr 0.02, batch 512) never gets there.
        final = 0.5 if (trial.tags["lr"], trial.tags["batch_size"]) == (0.02, 512) else 0.09
        lines = [{"step": 10, "loss": 0.8}, {"step": 20 * trial.tags["batch_size"], "loss": final}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    study.study_dir.mkdir(parents=True, exist_ok=True)
    report = study.write_report(trials)
    cells = {(e["lr"], e["batch_size"]): e for e in report.results["entries"]}
    assert cells[0.2, 128]["steps"] == 20 * 128 and cells[0.2, 128]["reached_target"]
    assert not cells[0.02, 512]["reached_target"] and cells[0.02, 512]["steps"] == 2000
    assert report.results["fits"]["test_accuracy"]["points"] == 8
    assert "trains until its training loss reaches 0.1" in report.markdown
    assert "study.protocol=equal_loss trains every cell to the same training loss: set study.target_loss" in \
        _refused(tmp_path, "study.protocol=equal_loss")


def _refused(tmp_path: Path, *overrides: str) -> str:
    from distdl.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        _study(tmp_path, *overrides)
    return str(error.value)


@pytest.mark.parametrize("override, expected", [
    ("study.learning_rates=[0.1]", "study.learning_rates=[0.1] must hold two values or more"),
    ("study.batch_sizes=[64]", "study.batch_sizes=[64] must hold two values or more"),
    ("study.learning_rates=[0.1,0.1]", "must hold two values or more"),
    ("study.learning_rates=[0.1,-0.1]", "study.learning_rates[1]=-0.1 must be a finite positive number"),
    ("study.batch_sizes=[32,33]", "33 does not split evenly over scaling.num_workers=2"),
])
def test_bad_grids_are_refused_before_any_training(override, expected, tmp_path, capsys):
    assert cli.main(["study", "temperature", str(TEMPERATURE), f"run.storage_path={tmp_path}", override]) == 2
    assert expected in capsys.readouterr().err
    assert not any(tmp_path.glob("*/trials/*")), "nothing was trained"
