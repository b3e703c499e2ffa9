"""The sharpness study's report from measurements of known value, without training: the variant arms'
gaps to the small batch, and the Langevin temperature matched to the small batch's gradient noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distdl.studies.base import read_study_file
from distdl.studies.sharpness import SharpnessStudy

REPO = Path(__file__).resolve().parents[2]
VARIANTS = REPO / "configs/studies/sharpness_variants.yaml"
# Made-up measurements: test accuracy, top eigenvalue and adaptive sharpness per (batch, variant, seed).
MEASURED = {(32, "none"): (0.95, 10.0, 0.2), (1000, "none"): (0.93, 40.0, 0.5),
            (1000, "sam"): (0.945, 20.0, 0.3), (1000, "minibatch_noise"): (0.94, 25.0, 0.35)}
TRACE, PARAMETERS = 12.0, 1_000_000


def _fake_run(run_dir: Path, batch: int, variant: str, seed: int) -> None:
    accuracy, eigenvalue, adaptive = MEASURED[batch, variant]
    run_dir.mkdir(parents=True)
    (run_dir / "measurements.json").write_text(json.dumps({
        "train_loss": 0.01, "train_accuracy": 1.0, "test_accuracy": accuracy + 0.001 * seed,
        "sharpness_eps1e-3": 2 * eigenvalue, "adaptive_sharpness_eps1e-3": adaptive,
        "hessian_top_eigenvalue": eigenvalue, "hessian_trace": 10 * eigenvalue, "parameter_count": PARAMETERS}))
    # The loop's noise-scale terms: tr(Sigma) over training, the second half averaged.
    lines = [{"step": step, "noise_trace": TRACE if step > 2 else 1e6, "noise_gradient_sq": 1.0} for step in (1, 2, 3, 4)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_report_gives_each_arms_gap_to_the_small_batch_and_the_matched_temperature(tmp_path):
    from PIL import Image

    study_file = read_study_file(VARIANTS, [f"run.storage_path={tmp_path}"])
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
    assert report.results["matched_temperature"] == pytest.approx(expected)
    assert f"= {expected:.3g}" in report.markdown and "## Closing the gap" in report.markdown
    assert Image.open(report.plots["variants"]).size[0] > 300
    # The plain large-over-small ratios leave the arms out.
    assert report.results["ratios"]["equal_epochs/seed0"]["hessian_top_eigenvalue_ratio"] == pytest.approx(4.0)
