"""The sharpness study's report from measurements of known value, without training: the variant arms'
gaps to the small batch, the Langevin temperature matched to the small batch's gradient noise (and
the isotropic arms trained at it after the others), and equal_loss's steps to the target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distdl.studies.base import read_study_file
from distdl.studies.sharpness import SharpnessStudy
from tests.helpers.shared import REPO

VARIANTS = REPO / "configs/studies/sharpness_variants.yaml"
# The variants study as Adam at equal epochs, batch 32 against 1000, on which the arithmetic below is done.
ADAM = ["study.batch_sizes=[32,1000]", "study.seeds=[0,1]", "study.protocols=[equal_epochs]",
        "study.variants=[sam,minibatch_noise]", "study.noise_temperature=null", "trainer.epochs=10",
        "optimizer.name=adam", "optimizer.lr=1.0e-3"]
# Made-up measurements: test accuracy, top eigenvalue and adaptive sharpness per (batch, variant, seed).
MEASURED = {(32, "none"): (0.95, 10.0, 0.2), (1000, "none"): (0.93, 40.0, 0.5),
            (1000, "sam"): (0.945, 20.0, 0.3), (1000, "minibatch_noise"): (0.94, 25.0, 0.35)}
TRACE, PARAMETERS = 12.0, 1_000_000


def _fake_run(run_dir: Path, batch: int, variant: str, seed: int, losses: tuple[float, ...] = (1.0,) * 4) -> None:
    accuracy, eigenvalue, adaptive = MEASURED[batch, variant]
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"trainable_parameters": {"model": PARAMETERS}}))
    (run_dir / "measurements.json").write_text(json.dumps({
        "train_loss": 0.01, "train_accuracy": 1.0, "test_accuracy": accuracy + 0.001 * seed,
        "sharpness_eps1e-3": 2 * eigenvalue, "adaptive_sharpness_eps1e-3": adaptive,
        "hessian_top_eigenvalue": eigenvalue, "hessian_trace": 10 * eigenvalue, "parameter_count": PARAMETERS}))
    # The loop's noise-scale terms: tr(Sigma) over training, the second half averaged.
    lines = [{"step": step, "loss": loss, "noise_trace": TRACE if step > 2 else 1e6, "noise_gradient_sq": 1.0}
             for step, loss in zip((10, 20, 30, 40), losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_report_gives_each_arms_gap_to_the_small_batch_and_the_matched_temperature(tmp_path):
    from PIL import Image

    study_file = read_study_file(VARIANTS, [*ADAM, f"run.storage_path={tmp_path}"])
    study = SharpnessStudy(SharpnessStudy.parse_section(study_file.study), study_file.training, tmp_path / "study")
    trials = study.trials(4000)
    for trial in trials:
        _fake_run(study.trial_config(trial).run_dir, trial.tags["batch_size"], trial.tags.get("variant", "none"),
                  trial.tags["seed"])
    for seed in (0, 1):
        curve = {"alphas": [0.0, 1.0], "rows": [{"alpha": a, "train_loss": 0.1, "test_loss": 0.2, "train_accuracy": 1.0,
                                                "test_accuracy": 0.9} for a in (0.0, 1.0)]}
        (study.study_dir / "interpolation").mkdir(parents=True, exist_ok=True)
        (study.study_dir / "interpolation" / f"equal_epochs-seed{seed}.json").write_text(json.dumps(curve))
    report = study.write_report(trials)
    arms = {(row["arm"], row["seed"]): row for row in report.results["variants"]}
    assert {arm for arm, _ in arms} == {"batch 1000", "batch 1000 + sam", "batch 1000 + minibatch noise"}
    for (arm, seed), row in arms.items():
        variant = {"batch 1000": "none", "batch 1000 + sam": "sam", "batch 1000 + minibatch noise": "minibatch_noise"}[arm]
        accuracy, eigenvalue, adaptive = MEASURED[1000, variant]
        assert row["test_accuracy_gap"] == pytest.approx(accuracy - MEASURED[32, "none"][0])
        assert row["hessian_top_eigenvalue_ratio"] == pytest.approx(eigenvalue / 10.0)
        assert row["adaptive_sharpness_eps1e-3_ratio"] == pytest.approx(adaptive / 0.2)
    # T = lr tr(Sigma) (1/b - 1/B) / (2 d), with Adam's lr 1e-3 from the config (no batch scaling).
    expected = 1e-3 * TRACE * (1 / 32 - 1 / 1000) / (2 * PARAMETERS)
    assert report.results["matched_temperature"] == {"equal_epochs": pytest.approx(expected)}
    assert f"= {expected:.3g}" in report.markdown and "## Closing the gap" in report.markdown
    assert Image.open(report.plots["variants"]).size[0] > 300
    # The plain large-over-small ratios leave the arms out.
    assert report.results["ratios"]["equal_epochs/seed0"]["hessian_top_eigenvalue_ratio"] == pytest.approx(4.0)


def test_equal_loss_trains_to_the_target_and_the_matched_isotropic_arms_train_after_the_rest(tmp_path):
    """With noise_temperature=matched the isotropic arms are not among the first trials: their
    temperature comes from the small batch's trained runs, one per protocol. Under equal_loss every
    trial has the same step budget and stops at the target; the report gives the steps it took and
    names a trial that never got there."""
    study_file = read_study_file(VARIANTS, [
        *ADAM, f"run.storage_path={tmp_path}", "study.protocols=[equal_epochs,equal_loss]", "study.target_loss=0.05",
        "study.max_steps=300", "study.variants=[isotropic_noise,sam]", "study.noise_temperature=matched"])
    study = SharpnessStudy(SharpnessStudy.parse_section(study_file.study), study_file.training, tmp_path / "study")
    trials = study.trials(4000)
    assert sorted(t.name for t in trials) == sorted([
        "batch32-seed0-steps1250", "batch32-seed1-steps1250", "batch1000-seed0-steps40", "batch1000-seed1-steps40",
        "batch1000-sam-seed0-steps40", "batch1000-sam-seed1-steps40",
        "batch32-seed0-loss0.05", "batch32-seed1-loss0.05", "batch1000-seed0-loss0.05", "batch1000-seed1-loss0.05",
        "batch1000-sam-seed0-loss0.05", "batch1000-sam-seed1-loss0.05"])
    trainer = study.trial_config(next(t for t in trials if t.name == "batch1000-seed0-loss0.05")).trainer
    assert (trainer.max_steps, trainer.stop_at_loss, trainer.epochs) == (300, 0.05, None)
    assert study.trial_config(trials[0]).trainer.stop_at_loss is None
    # The window-mean loss crosses 0.05 at step 30, except for batch 1000's seed 1 under equal_loss.
    for trial in trials:
        never = trial.name == "batch1000-seed1-loss0.05"
        _fake_run(study.trial_config(trial).run_dir, trial.tags["batch_size"], trial.tags.get("variant", "none"),
                  trial.tags["seed"], (0.5, 0.2, 0.1 if never else 0.04, 0.06))
    later = study.later_trials(trials)
    expected = 1e-3 * TRACE * (1 / 32 - 1 / 1000) / (2 * PARAMETERS)
    assert sorted(t.name for t in later) == sorted(f"batch1000-isotropic_noise-seed{s}-{b}" for s in (0, 1)
                                                   for b in ("steps40", "loss0.05"))
    for trial in later:
        noise = study.trial_config(trial).optimizer.noise
        assert (noise.kind, noise.temperature) == ("isotropic", pytest.approx(expected))
        _fake_run(study.trial_config(trial).run_dir, 1000, "sam", trial.tags["seed"], (0.5, 0.2, 0.04, 0.06))
    for seed in (0, 1):
        (study.study_dir / "interpolation").mkdir(parents=True, exist_ok=True)
        for protocol in ("equal_epochs", "equal_loss"):
            curve = {"alphas": [0.0], "rows": [{"alpha": 0.0, "train_loss": 0.1, "test_loss": 0.2,
                                                "train_accuracy": 1.0, "test_accuracy": 0.9}]}
            (study.study_dir / "interpolation" / f"{protocol}-seed{seed}.json").write_text(json.dumps(curve))
    report = study.write_report(trials + later)
    steps = {(row["trial"], row["protocol"]): (row["steps"], row.get("reached_target")) for row in report.results["entries"]}
    assert steps["batch32-seed0-loss0.05", "equal_loss"] == (30, True)
    assert steps["batch1000-seed1-loss0.05", "equal_loss"] == (300, False)
    assert steps["batch32-seed0-steps1250", "equal_epochs"] == (1250, None)
    assert report.results["matched_temperature"] == {"equal_epochs": pytest.approx(expected),
                                                     "equal_loss": pytest.approx(expected)}
    assert "**Not at the target loss** (study.max_steps ran out first, so they are not at the same fit as the " \
           "others): batch1000-seed1-loss0.05.\n" in report.markdown
    arms = {(row["protocol"], row["arm"]) for row in report.results["variants"]}
    assert ("equal_loss", "batch 1000 + isotropic noise") in arms and ("equal_epochs", "batch 1000 + sam") in arms


def test_a_matched_temperature_needs_the_small_batchs_noise_terms(tmp_path):
    from distdl.errors import ConfigError

    study_file = read_study_file(VARIANTS, [*ADAM, f"run.storage_path={tmp_path}", "study.variants=[isotropic_noise]",
                                            "study.noise_temperature=matched"])
    study = SharpnessStudy(SharpnessStudy.parse_section(study_file.study), study_file.training, tmp_path / "study")
    trials = study.trials(4000)
    for trial in trials:
        study.trial_config(trial).run_dir.mkdir(parents=True)  # trained, but without noise-scale terms
    with pytest.raises(ConfigError, match="study.noise_temperature=matched: the smallest batch's runs under "
                                          "equal_epochs logged no gradient-noise terms"):
        study.later_trials(trials)
