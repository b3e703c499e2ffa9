"""Studies end to end on 2 Ray Train workers with real DeepSpeed, at a tiny size on real digits."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distdl import cli
from distdl.cluster.connect import connect_ray
from distdl.rundir import read_metrics
from tests.helpers.shared import QUIET, REPO, git_head

SHARPNESS = REPO / "configs/studies/sharpness.yaml"
TARGET = 0.5
# scikit-learn's 8x8 digits, a small MLP: batch 16 and 96, each trained to the same training loss, and
# next to batch 96 an isotropic-noise arm at the temperature matched to batch 16's gradient noise
# (trained after the others); each measured on 300 training digits. Equal epochs and equal steps give
# trials that differ only in their step count (tests/unit/test_sharpness_report.py).
TINY = ["data.dataset=digits", "model.hidden_sizes=[32]", "trainer.epochs=1", "trainer.log_every=5", "optimizer.lr=0.01",
        "study.batch_sizes=[16,96]", "study.seeds=[0]", "study.protocols=[equal_loss]",
        f"study.target_loss={TARGET}", "study.max_steps=200", "study.variants=[isotropic_noise]",
        "study.noise_temperature=matched", "study.subspace_dimension=5", "study.measure_examples=300",
        "study.hessian_products=30", "study.trace_samples=4", "study.interpolation_points=5",
        "study.sharpness_iterations=3", "study.landscape_points=5", "study.landscape_grid=3",
        "tracking.wandb_mode=offline"]


@pytest.fixture(scope="module")
def sharpness_study(ray_local, tmp_path_factory):
    from distdl.studies.runner import run_study

    storage = tmp_path_factory.mktemp("studies")
    overrides = [*TINY, f"run.storage_path={storage}"]
    study_dir, report = run_study("sharpness", SHARPNESS, overrides, False, connect_ray)
    return study_dir, report, overrides


@pytest.mark.distributed
def test_sharpness_study_writes_its_report_results_and_plots(sharpness_study):
    from PIL import Image

    study_dir, report, _ = sharpness_study
    results = json.loads((study_dir / "results.json").read_text())["entries"]
    arms = {(r["protocol"], r["batch_size"], r["variant"]) for r in results}
    assert arms == {("equal_loss", 16, "none"), ("equal_loss", 96, "none"), ("equal_loss", 96, "isotropic_noise")}
    # Each stopped at its first logged window at or below the target, well within study.max_steps.
    for entry in results:
        losses = [(m["step"], m["loss"]) for m in read_metrics(study_dir / "trials" / entry["trial"]) if "loss" in m]
        assert entry["reached_target"] and losses[-1][0] == entry["steps"] < 200 and losses[-1][1] <= TARGET
        assert all(loss > TARGET for _, loss in losses[:-1]), losses
    # The isotropic arm ran at the temperature the report gives, from batch 16's noise terms.
    trial = next(r["trial"] for r in results if r["variant"] == "isotropic_noise")
    config = yaml.safe_load((study_dir / "trials" / trial / "config.yaml").read_text())
    assert config["optimizer"]["noise"]["temperature"] == report.results["matched_temperature"]["equal_loss"] > 0
    required = ("batch_size", "seed", "train_accuracy", "test_accuracy", "sharpness_eps1e-3", "sharpness_eps5e-4",
                "hessian_top_eigenvalue", "hessian_trace", "subspace_sharpness_eps1e-3", "adaptive_sharpness_eps1e-3")
    for entry in results:
        assert all(np.isfinite(entry[key]) for key in required), entry
        assert entry["train_accuracy"] > 0.5 and entry["test_accuracy"] > 0.5  # chance is 0.1
        assert entry["sharpness_eps1e-3"] > entry["sharpness_eps5e-4"] > 0  # a larger box holds a higher peak
        assert entry["hessian_top_eigenvalue"] > 0 and entry["noise_scale"] > 0
    markdown = (study_dir / "report.md").read_text()
    assert "## Large over small batch" in markdown and "## Closing the gap" in markdown
    for name in ("sharpness_vs_batch_size", "interpolation", "noise_scale", "landscape_1d", "landscape_2d"):
        assert f"]({name}.png)" in markdown and Image.open(study_dir / f"{name}.png").size[0] > 300
    for trial in {r["trial"] for r in results}:
        measured = json.loads((study_dir / "trials" / trial / "measurements.json").read_text())
        line, plane = measured["landscape_1d"], measured["landscape_2d"]
        assert line["coordinates"] == [-1.0, -0.5, 0.0, 0.5, 1.0] and np.shape(plane["loss"]) == (3, 3)
        # The middle point is the solution itself; the loss rises away from it.
        assert line["loss"][2] == pytest.approx(plane["loss"][1][1], rel=1e-12)
        assert min(line["loss"][0], line["loss"][4]) > line["loss"][2]
    curve = json.loads((study_dir / "interpolation" / "equal_loss-seed0.json").read_text())
    assert [r["alpha"] for r in curve["rows"]] == [-1.0, -0.25, 0.5, 1.25, 2.0]
    # The trials are W&B runs of the study's group, and the study logs its plots as images.
    trial_config = (study_dir / "trials" / "batch16-seed0-loss0.5" / "config.yaml").read_text()
    assert "wandb_group: sharpness-mnist5k" in trial_config
    images = {path.name.rsplit("_", 2)[0] for path in study_dir.glob("wandb/offline-run-*/files/media/images/*.png")}
    assert images == {"sharpness_vs_batch_size", "interpolation", "noise_scale", "landscape_1d", "landscape_2d",
                      "variants"}, images


def test_variants_add_large_batch_arms_with_their_own_optimizer_settings(tmp_path):
    """Each variant is a trial at the largest batch, under each protocol, whose config validates."""
    from distdl.studies.base import read_study_file
    from distdl.studies.sharpness import SharpnessStudy

    overrides = [*TINY, f"run.storage_path={tmp_path}", "study.variants=[sam,isotropic_noise,minibatch_noise]",
                 "study.protocols=[equal_epochs,equal_steps]",
                 "study.noise_temperature=1.0e-6", "study.sam_rho=0.1", "study.sam_adaptive=true"]
    study_file = read_study_file(SHARPNESS, overrides)
    study = SharpnessStudy(SharpnessStudy.parse_section(study_file.study), study_file.training, tmp_path)
    trials = {trial.name: trial for trial in study.trials(1437)}
    assert sorted(trials) == sorted([
        "batch16-seed0-steps89", "batch96-seed0-steps14", "batch96-seed0-steps89",
        *[f"batch96-{variant}-seed0-steps{steps}" for variant in ("sam", "isotropic_noise", "minibatch_noise")
          for steps in (14, 89)]])
    optimizers = {name: study.trial_config(trial).optimizer for name, trial in trials.items()}
    assert optimizers["batch96-sam-seed0-steps14"].sam.rho == 0.1 and optimizers["batch96-sam-seed0-steps14"].sam.adaptive
    assert optimizers["batch96-isotropic_noise-seed0-steps89"].noise.temperature == 1e-6
    minibatch = optimizers["batch96-minibatch_noise-seed0-steps14"].noise
    assert (minibatch.kind, minibatch.batch_size) == ("minibatch", 16)
    assert optimizers["batch96-seed0-steps14"].sam is None and optimizers["batch96-seed0-steps14"].noise is None
    assert trials["batch96-sam-seed0-steps89"].tags == {"batch_size": 96, "seed": 0, "steps": 89,
                                                         "protocols": ["equal_steps"], "variant": "sam"}


@pytest.mark.distributed
def test_the_data_parallel_measurement_equals_one_process(sharpness_study):
    """Rank 0 of 2 wrote measurements.json; the same measurement in this one process agrees."""
    from distdl.studies.base import read_study_file, trained_workload
    from distdl.studies.measures import LossOracle
    from distdl.studies.sharpness import SharpnessStudy
    from distdl.studies.solutions import measure_solution
    from distdl.workloads.base import WorkerContext

    study_dir, _, overrides = sharpness_study
    section = SharpnessStudy.parse_section(read_study_file(SHARPNESS, overrides).study)
    run_dir = study_dir / "trials" / "batch96-seed0-loss0.5"
    config = {**json.loads(json.dumps(yaml.safe_load((run_dir / "config.yaml").read_text())))}
    context = WorkerContext(rank=0, world_size=1, seed=0, micro_batch_size=48, run_dir=run_dir,
                            device=torch.device("cpu"))
    workload, model = trained_workload(config, context)
    model = model.double()
    oracles = [LossOracle(model, [(x.double(), y) for x, y in workload.measurement_batches(split, limit, 500)],
                          workload.loss_sum, context.device) for split, limit in (("train", 300), ("eval", None))]
    single = measure_solution(*oracles, section, seed=0)
    parallel = json.loads((run_dir / "measurements.json").read_text())
    for key in ("train_loss", "test_accuracy", "sharpness_eps1e-3", "subspace_sharpness_eps5e-4",
                "adaptive_sharpness_eps1e-3", "hessian_top_eigenvalue", "hessian_trace"):
        assert parallel[key] == pytest.approx(single[key], rel=1e-4), key  # sums over ranks in another order


@pytest.mark.distributed
def test_a_study_run_again_trains_and_measures_nothing_twice(sharpness_study):
    from distdl.studies.runner import run_study

    study_dir, _, overrides = sharpness_study
    watched = [*study_dir.glob("trials/*/metrics.jsonl"), *study_dir.glob("trials/*/measurements.json"),
               *study_dir.glob("interpolation/*.json")]
    before = {path: path.stat().st_mtime_ns for path in watched}
    assert len(before) == 3 + 3 + 1
    run_study("sharpness", SHARPNESS, overrides, False, connect_ray)
    assert {path: path.stat().st_mtime_ns for path in watched} == before
    assert (study_dir / "report.md").is_file()


@pytest.mark.parametrize("override, expected", [
    ("study.batch_sizes=[]", "must list batch sizes of at least 1"),
    ("study.epsilons=[1.0e-3,1.5]", "must lie in (0, 1)"),
    ("study.epsilons=[0]", "must lie in (0, 1)"),
    ("study.protocols=[equal_time]", "equal_epochs, equal_steps"),
    ("study.protocols=[]", "study.protocols=[] must not be empty"),
    ("study.subspace_dimension=-1", "study.subspace_dimension=-1 must be 0 (skip) or more"),
    ("study.trace_samples=0", "study.trace_samples=0 must be at least 1"),
    ("study.hessian_products=4", "study.hessian_products=4 must be 5 or more (LOBPCG's least)"),
    ("study.hessian_tolerance=0", "study.hessian_tolerance=0"),
    ("study.max_concurrent_trials=0", "study.max_concurrent_trials=0 must be at least 1 (or null: as many as"),
    ("study.seeds=[]", "at least one seed"),
    ("study.batch_sizes=[32,33]", "33 does not split evenly over scaling.num_workers=2"),
    ("trainer.max_steps=5", "set trainer.epochs"),
    ("study.variants=[isotropic_noise]", "study.variants has isotropic_noise: set study.noise_temperature"),
    ("study.variants=[sam,sam]", "lists a variant twice"),
    ("study.variants=[dropout]", "allowed: isotropic_noise, minibatch_noise, sam"),
    ("study.noise_temperature=-1", "study.noise_temperature=-1"),
    ("study.noise_temperature=hot", "study.noise_temperature='hot'"),
    ("study.protocols=[equal_loss]", "study.protocols has equal_loss, which trains every trial to the same training "
                                     "loss: set study.target_loss"),
])
def test_bad_study_settings_are_refused_before_any_training(override, expected, tmp_path, capsys):
    overrides = ["data.dataset=digits", f"run.storage_path={tmp_path}", override]
    if override.startswith("trainer.max_steps"):
        overrides.append("trainer.epochs=null")
    assert cli.main(["study", "sharpness", str(SHARPNESS), *overrides]) == 2
    assert expected in capsys.readouterr().err
    assert not any(tmp_path.glob("*/trials/*")), "nothing was trained"


def test_unknown_study_and_a_file_without_a_study_section(tmp_path, capsys):
    assert cli.main(["study", "grokking", str(SHARPNESS)]) == 2
    assert "unknown study 'grokking'; known: overparam, scaling, sharpness, temperature" in capsys.readouterr().err
    plain = REPO / "configs/resnet/mnist_laptop.yaml"
    assert cli.main(["study", "sharpness", str(plain)]) == 2
    assert "needs a 'study:' section" in capsys.readouterr().err


def test_a_study_directory_with_other_settings_is_refused(tmp_path):
    from distdl.errors import RunDirError
    from distdl.studies.runner import check_study_dir

    saved = {"study": {"kind": "sharpness", "seeds": [0]}, "training": {"optimizer": {"lr": 0.001}}}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.yaml").write_text(yaml.safe_dump(saved))
    check_study_dir(tmp_path / "s", saved, overwrite=False)  # the same settings: a resume
    changed = {**saved, "study": {"kind": "sharpness", "seeds": [0, 1]}}
    with pytest.raises(RunDirError, match=r"study.seeds: \[0\] -> \[0, 1\]"):
        check_study_dir(tmp_path / "s", changed, overwrite=False)
    check_study_dir(tmp_path / "s", changed, overwrite=True)
    assert not (tmp_path / "s").exists() and len(list(tmp_path.glob("s.replaced-*"))) == 1


# ----------------------------------------------------------------------------- overparam

OVERPARAM = REPO / "configs/studies/overparam.yaml"


@pytest.mark.distributed
def test_overparam_study_fits_the_distance_exponent_and_writes_its_plots(ray_local, tmp_path):
    from distdl.studies.runner import run_study

    study_dir, report = run_study("overparam", OVERPARAM, [
        "data.train_subset=128", "trainer.global_batch_size=128", "trainer.micro_batch_size=64",
        "trainer.max_steps=40", "trainer.log_every=2", "study.widths=[16,1024]", f"run.storage_path={tmp_path}",
        *QUIET], False, connect_ray)
    results = json.loads((study_dir / "results.json").read_text())
    assert results["provenance"]["software"]["distdl"]["commit"] == git_head()
    assert (study_dir / "ray" / "trials").is_dir(), "4 logical CPUs hold both 2-worker trials: Ray Tune ran them at once"
    narrow, wide = sorted(results["entries"], key=lambda e: e["width"])
    # A wrongly rebuilt W0 (another random draw) would put every network about sqrt(2) away.
    assert 0 < wide["relative_distance"] < narrow["relative_distance"] < 1
    assert results["distance_exponent"] == pytest.approx(
        np.log(wide["relative_distance"] / narrow["relative_distance"]) / np.log(1024 / 16))
    assert 0 < wide["activation_change"] < narrow["activation_change"] < 0.5
    for entry in (narrow, wide):
        assert entry["convergence_rate"] > 0 and entry["final_train_loss_logged"] < 1.0
        assert 0 <= entry["train_error"] <= entry["test_error"] < 0.9
    markdown = (study_dir / "report.md").read_text()
    assert f"exponent {results['distance_exponent']:.3f}" in markdown
    for name in ("loss_curves", "distance_vs_width", "error_vs_width"):
        assert (study_dir / f"{name}.png").is_file() and f"]({name}.png)" in markdown


@pytest.mark.parametrize("override, expected", [
    ("study.widths=[0,16]", "widths of at least 1"),
    ("study.widths=[]", "widths of at least 1"),
    ("study.width_key=model.depth", "model.width, model.width_multiplier"),
    ("study.fit_skip=1", "study.fit_skip=1.0 must lie in [0, 1)"),
    ("data.label_noise=1.5", "data.label_noise=1.5 must lie in [0, 1]"),
])
def test_bad_overparam_settings_are_refused(override, expected, tmp_path, capsys):
    assert cli.main(["study", "overparam", str(OVERPARAM), f"run.storage_path={tmp_path}", override]) == 2
    assert expected in capsys.readouterr().err


# ----------------------------------------------------------------------------- scaling

SCALING = REPO / "configs/studies/scaling.yaml"


# The digits MLP the scaling study trains, and the study's own keys.
SCALING_MODEL = ["data.dataset=digits", "model.hidden_sizes=[32]", "optimizer.lr=0.05"]
SCALING_STUDY = ["trainer.log_every=2", "study.workers=[1,2]", "study.throughput_kinds=[strong]",
                 "study.throughput_steps=8", "study.strong_batch_size=64", "study.batch_sizes=[16,64]",
                 "study.target_loss=1.0", "study.max_steps=300", "study.optimizers=[sgd, {name: lars, lr: 1.0}]",
                 *QUIET, "trainer.profile_steps=[4,5]"]


@pytest.fixture(scope="module")
def scaling_study(ray_local, tmp_path_factory) -> Path:
    from distdl.studies.runner import run_study

    storage = tmp_path_factory.mktemp("scaling")
    study_dir, _ = run_study("scaling", SCALING, [*SCALING_MODEL, *SCALING_STUDY, f"run.storage_path={storage}"],
                             False, connect_ray)
    return study_dir


@pytest.mark.distributed
def test_scaling_study_measures_throughput_and_steps_to_target(scaling_study):
    study_dir = scaling_study
    results = json.loads((study_dir / "results.json").read_text())
    # Two worker counts: the efficiency of 2 is its per-worker throughput over 1 worker's, as measured.
    one, two = sorted(results["throughput"], key=lambda row: row["workers"])
    assert (one["workers"], two["workers"]) == (1, 2) and one["samples_per_s"] > 0 and two["samples_per_s"] > 0
    assert one["efficiency"] == 1.0
    assert two["efficiency"] == pytest.approx(two["samples_per_s"] / 2 / one["samples_per_s"], rel=1e-9)
    assert 0 < two["efficiency"] < 1.5, "2 workers on 2 cores cannot be much more than twice as fast as one"
    assert list(results["by_optimizer"]) == ["sgd", "lars"]
    for name, fit in results["by_optimizer"].items():
        steps = {row["batch_size"]: row["steps_to_target"] for row in results["entries"] if row["optimizer"] == name}
        assert 0 < steps[64] < steps[16] <= 300, f"{name}: four times the batch (and learning rate), fewer steps"
        for batch, step in steps.items():
            metrics = read_metrics(study_dir / "trials" / f"target-{name}-batch{batch}-seed0")
            assert metrics[-1]["step"] == step and metrics[-1]["loss"] <= 1.0, "the run stopped at the target"
            assert all(m["loss"] > 1.0 for m in metrics[:-1] if "loss" in m)
            # Two points determine S = S_min (1 + B_crit / B) exactly.
            assert fit["min_steps"] * (1 + fit["critical_batch_size"] / batch) == pytest.approx(step)
        assert fit["lr_scaling"] == "linear" and fit["noise_scale_batch"] > 0
    markdown = (study_dir / "report.md").read_text()
    assert "B_crit is" in markdown and "for sgd" in markdown and "for lars" in markdown
    assert {"throughput.png", "steps_to_target.png"} <= {p.name for p in study_dir.glob("*.png")}


# Two gloo processes per "node": the links of benchmarks/results/allreduce_gloo_cpu.json's ring fit.
GLOO_FIT = json.loads((REPO / "benchmarks/results/allreduce_gloo_cpu.json").read_text())["fit"]
GLOO_LINK = {"bandwidth_gb_s": round(GLOO_FIT["bandwidth_gb_s"], 2), "latency_us": round(GLOO_FIT["latency_us"])}
GLOO_CLUSTER = yaml.safe_dump({"name": "gloo-pair", "gpu": "cpu", "peak_tflops": 0.1, "gpus_per_node": 2,
                               "max_nodes": 4, "intra_node": GLOO_LINK, "inter_node": GLOO_LINK})


@pytest.mark.distributed
def test_a_plan_from_the_studys_profile_and_fit_is_consistent_and_reproduces_its_profile(scaling_study, tmp_path,
                                                                                      capsys):
    from distdl.planning.cluster import read_cluster
    from distdl.planning.model import gradient_sync_seconds
    from distdl.planning.plan import default_gpu_counts

    cluster = tmp_path / "gloo.yaml"
    cluster.write_text(GLOO_CLUSTER)
    profile = scaling_study / "trials" / "throughput-strong-workers2"  # 2 workers, micro-batch 32, batch 64

    def plan(*args: str, compute: tuple[str, ...] = ("--profile", str(profile))) -> tuple[int, str]:
        code = cli.main(["plan", str(SCALING), *SCALING_MODEL, f"run.storage_path={tmp_path}", "--cluster", str(cluster),
                         *compute, "--scaling", str(scaling_study), *args])
        out, err = capsys.readouterr()
        return code, out + err

    code, out = plan("optimizer.name=lars", "--out", str(tmp_path / "lars"))
    assert code == 0, out
    written = json.loads((tmp_path / "lars" / "plan.json").read_text())
    assert (tmp_path / "lars" / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "lars" / "plan.md").read_text() in out, "the table printed is the one written"
    results = json.loads((scaling_study / "results.json").read_text())
    fit = results["by_optimizer"]["lars"]
    assert written["scaling"]["optimizer"] == "lars" and written["scaling"]["critical_batch"] == fit["critical_batch_size"]
    # The profile: its windows after the first, its parameters (64x32 + 32, batch norm's 2x32, 32x10 + 10).
    rates = [m["samples_per_s"] for m in read_metrics(profile) if m.get("samples_per_s")]
    assert written["profile"]["samples_per_s"] == pytest.approx(float(np.median(rates[1:])))
    assert written["profile"]["trainable_parameters"] == 2442 and written["profile"]["world_size"] == 2
    # The config's global batch 32 in micro-batches of 16 at most, on 1, 2, 4 and 8 processes.
    rows = written["rows"]
    assert [row["gpus"] for row in rows] == default_gpu_counts(read_cluster(cluster)) == [1, 2, 4, 8]
    assert [(row["micro_batch"], row["accumulation"]) for row in rows] == [(16, 2), (16, 1), (8, 1), (4, 1)]
    for row in rows:
        assert row["samples_per_s"] == pytest.approx(row["global_batch"] / row["step_s"], rel=1e-12)
        steps = fit["min_steps"] * (1 + fit["critical_batch_size"] / row["global_batch"])
        assert row["steps_to_target"] == pytest.approx(steps, rel=1e-12)
        assert row["time_to_target_s"] == pytest.approx(steps * row["step_s"], rel=1e-12)
        assert row["gpu_hours"] == pytest.approx(row["gpus"] * row["time_to_target_s"] / 3600, rel=1e-12)
    assert rows[0]["efficiency"] == 1.0 and all(0 < row["efficiency"] < 1 for row in rows[1:])
    assert written["fastest_gpus"] == min(rows, key=lambda row: row["time_to_target_s"])["gpus"]
    least = min(row["gpu_hours"] for row in rows)
    assert written["knee_gpus"] == max(row["gpus"] for row in rows if row["gpu_hours"] <= 1.1 * least)
    knee_row = next(row for row in rows if row["gpus"] == written["knee_gpus"])
    # CONFIG is a study file: the submit line names its training config, written beside the plan, and works.
    line = shlex.split(written["submit"])
    assert line[:4] == ["distdl", "submit", "slurm", str(tmp_path / "lars" / "training.yaml")]
    assert {f"--nodes={knee_row['nodes']}", f"scaling.num_workers={knee_row['gpus']}",
            f"trainer.global_batch_size={knee_row['global_batch']}"} <= set(line) and written["submit"] in out
    assert yaml.safe_load((tmp_path / "lars" / "training.yaml").read_text())["optimizer"]["name"] == "lars"
    assert cli.main([*line[1:], "--dry-run"]) == 0, capsys.readouterr().err
    capsys.readouterr()

    # The profile's trace of steps 4-5: its optimizer step and its collectives apart, their overlap
    # with computation measured (no --overlap given).
    trace = written["profile"]["trace"]
    assert trace["steps"] == 2 and trace["path"].endswith("rank0_steps4-5.pt.trace.json")
    assert 0 < trace["optimizer_s"] < trace["step_s"] and 0 < trace["collectives_s"] < trace["step_s"]
    assert trace["world_size"] == 2 and trace["exposed_collectives_s"] <= trace["collectives_s"]
    assert written["step_model"]["overlap"] == trace["overlap"] and 0 <= trace["overlap"] <= 1
    # Fed its own profile's batch, the plan gives back the step the profile measured, but for its
    # measured synchronization, replaced by the modelled one.
    code, out = plan("trainer.micro_batch_size=32", "trainer.global_batch_size=64", "--gpus", "2",
                     "--out", str(tmp_path / "own"))
    assert code == 0, out
    own_plan = json.loads((tmp_path / "own" / "plan.json").read_text())
    (own,) = own_plan["rows"]
    profiled_step = 64 / written["profile"]["samples_per_s"]
    exposed = trace["exposed_collectives_s"] / trace["step_s"] * profiled_step
    modelled = (1 - trace["overlap"]) * gradient_sync_seconds(2442 * 4, 0, 2, read_cluster(cluster))
    assert own["step_s"] == pytest.approx(profiled_step - exposed + modelled, rel=1e-9)
    optimizer = own_plan["step_model"]["optimizer_s"]
    assert optimizer == pytest.approx(trace["optimizer_s"] / trace["step_s"] * profiled_step, rel=1e-9)
    assert own["step_s"] - modelled - optimizer == pytest.approx(
        64 * own_plan["step_model"]["compute_per_sample_s"] / 2, rel=1e-9)

    # Without a profile: the FLOPs counted on a synthetic sample are those the run counted on its data,
    # at the stated share of the cluster file's peak.
    code, out = plan("--out", str(tmp_path / "estimated"), compute=("--mfu", "0.25"))
    assert code == 0, out
    estimated = json.loads((tmp_path / "estimated" / "plan.json").read_text())
    assert estimated["profile"] is None and "No profile:" in out
    assert estimated["estimate"]["flops_per_sample"] == pytest.approx(written["profile"]["flops_per_sample"], rel=1e-12)
    assert estimated["estimate"]["trainable_parameters"] == 2442
    assert estimated["step_model"]["compute_per_sample_s"] == pytest.approx(
        written["profile"]["flops_per_sample"] / (0.25 * 0.1e12), rel=1e-12)

    # Bad input: each error names the file or flag and the key, and nothing is written.

    unfitted = tmp_path / "unfitted"
    unfitted.mkdir()
    (unfitted / "study.yaml").write_text((scaling_study / "study.yaml").read_text())
    del results["by_optimizer"]["sgd"]["critical_batch_size"]
    (unfitted / "results.json").write_text(json.dumps(results))
    cut_short = tmp_path / "cut_short"
    shutil.copytree(profile, cut_short)
    summary = json.loads((cut_short / "summary.json").read_text())
    del summary["trainable_parameters"]
    (cut_short / "summary.json").write_text(json.dumps(summary))
    no_bandwidth = tmp_path / "no_bandwidth.yaml"
    latency_only = {"latency_us": GLOO_LINK["latency_us"]}
    no_bandwidth.write_text(yaml.safe_dump({**yaml.safe_load(GLOO_CLUSTER), "intra_node": latency_only,
                                            "inter_node": latency_only}))
    for args, expected in [
        (["model.hidden_sizes=[64]"], f"--profile {profile / 'config.yaml'}: model.hidden_sizes=[32], but the "
                                      "config planned has model.hidden_sizes=[64]"),
        (["--scaling", str(unfitted)], f"--scaling {unfitted / 'results.json'}: by_optimizer.sgd has no "
                                       "critical_batch_size"),
        (["optimizer.name=adamw"], "no fit for optimizer.name='adamw'; the study fitted sgd, lars"),
        (["--gpus", "0,2"], "--gpus 0,2: 0 is out of range; allowed: 1 to 8"),
        (["--gpus", "16"], f"--gpus 16: 16 is out of range; allowed: 1 to 8 (the lesser of 4096 and {cluster}'s"),
        (["--cluster", str(no_bandwidth)], f"{no_bandwidth}: missing intra_node.bandwidth_gb_s, "
                                           "inter_node.bandwidth_gb_s"),
        (["--profile", str(tmp_path)], f"--profile: {tmp_path} is not a distdl run directory"),
        (["--profile", str(cut_short)], f"--profile {cut_short / 'summary.json'}: no 'trainable_parameters'"),
        (["--gpus", "6"], "no GPU count of 6 can split the global batch 32 (trainer.global_batch_size)"),
    ]:
        out_dir = tmp_path / "refused"
        code, out = plan(*args, "--out", str(out_dir))
        assert code == 2 and expected in out, (args, out)
        assert not out_dir.exists()


@pytest.mark.distributed
def test_a_diverged_trial_fails_the_study_in_one_line(ray_local, tmp_path, capsys):
    code = cli.main(["study", "scaling", str(SCALING), "data.dataset=digits", "model.hidden_sizes=[32]",
                     "optimizer.lr=1e30", "trainer.log_every=2", "study.workers=[2]", "study.throughput_kinds=[strong]",
                     "study.throughput_steps=4", "study.strong_batch_size=64", "study.batch_sizes=[64]",
                     "study.max_steps=20", "study.max_concurrent_trials=1", f"run.storage_path={tmp_path}",
                     *QUIET])
    err = capsys.readouterr().err
    assert code == 1, err
    [line] = [line for line in err.splitlines() if line.startswith("distdl: error:")]
    assert "diverged: its loss or gradient norm was not finite at step" in line
    assert "Traceback" not in err


def test_bad_scaling_settings_are_refused(tmp_path, capsys):
    for override, expected in (("study.strong_batch_size=65", "does not split evenly over 2 workers"),
                               ("study.throughput_kinds=[diagonal]", "allowed: strong, weak"),
                               ("study.workers=[]", "must list worker counts of at least 1"),
                               ("study.target_loss=0", "must be positive"),
                               ("study.optimizers=[sgd,lars,sgd]", "lists sgd more than once"),
                               ("study.optimizers=[rmsprop]", "study.optimizers[0].name='rmsprop' is not allowed"),
                               ("study.optimizers=[{lr: 1.0}]", "study.optimizers[0]: give an optimizer name"),
                               ("study.optimizers=[{name: lars, eta: 1}]", "unknown key study.optimizers[0].eta")):
        assert cli.main(["study", "scaling", str(SCALING), f"run.storage_path={tmp_path}", override]) == 2
        assert expected in capsys.readouterr().err


def test_each_optimizer_sweeps_every_batch_with_its_own_lr_scaling(tmp_path):
    from distdl.optim import effective_lr
    from distdl.studies.base import read_study_file
    from distdl.studies.scaling import ScalingStudy

    study = read_study_file(SCALING, ["study.optimizers=[sgd, {name: lars, lr: 3.0}, {name: lamb, lr_scaling: linear}]",
                                      "study.batch_sizes=[32, 128]", "study.reference_batch_size=32"])
    scaling = ScalingStudy(ScalingStudy.parse_section(study.study), study.training, tmp_path)
    targets = [t for t in scaling.trials(4000) if t.tags["kind"] == "target"]
    assert [t.name for t in targets] == [f"target-{name}-batch{batch}-seed0" for name in ("sgd", "lars", "lamb")
                                         for batch in (32, 128)]
    lrs = {t.name: effective_lr(scaling.trial_config(t).optimizer, t.tags["batch_size"]) for t in targets}
    base_lr = study.training["optimizer"]["lr"]
    # SGD and LARS scale linearly (4x the batch, 4x the lr), LAMB as its entry says; LARS from its own lr.
    assert lrs["target-sgd-batch128-seed0"] == pytest.approx(4 * base_lr)
    assert lrs["target-lars-batch32-seed0"] == 3.0 and lrs["target-lars-batch128-seed0"] == pytest.approx(12.0)
    assert lrs["target-lamb-batch128-seed0"] == pytest.approx(4 * base_lr)
    assert {t.tags["optimizer"] for t in targets} == {"sgd", "lars", "lamb"}
    # Adam's own rule is the square root: 4x the batch, 2x the lr.
    adam = read_study_file(SCALING, ["study.optimizers=[adam]", "study.batch_sizes=[32, 128]"])
    scaling = ScalingStudy(ScalingStudy.parse_section(adam.study), adam.training, tmp_path)
    (small, large) = [scaling.trial_config(t).optimizer for t in scaling.trials(4000) if t.tags["kind"] == "target"]
    assert effective_lr(large, 128) == pytest.approx(2 * effective_lr(small, 32))


def test_critical_batch_size_fit_recovers_a_known_curve_and_efficiency_is_per_worker():
    import pandas as pd

    from distdl.studies.scaling import add_efficiency, critical_batch_size

    batches = np.array([16, 32, 64, 128, 256])
    curve = pd.DataFrame({"batch_size": batches, "steps_to_target": 400 * (1 + 96 / batches)})
    fit = critical_batch_size(curve)
    assert fit["min_steps"] == pytest.approx(400) and fit["critical_batch_size"] == pytest.approx(96)
    # A measured SGD curve (configs/studies/scaling_lars.yaml) whose small end falls faster than 1/B: an
    # unbounded fit started from a line walked off to B_crit = 1e133; the least-squares minimum is 718.
    batches = np.array([32, 64, 128, 256, 512, 1024, 2048])
    sgd = pd.DataFrame({"batch_size": batches, "steps_to_target": [545, 190, 105, 55, 30, 25, 30]})
    fit = critical_batch_size(sgd)
    assert fit["critical_batch_size"] == pytest.approx(718.0, rel=1e-3) and not fit["beyond_measured_batches"]
    # Steps that halve at every doubling show no critical batch: the fit ends on its bound and says so.
    assert critical_batch_size(pd.DataFrame({"batch_size": [16, 64, 256], "steps_to_target": [400, 100, 25]}))[
        "beyond_measured_batches"]
    speed = add_efficiency(pd.DataFrame({"kind": ["strong", "strong", "weak", "weak"], "workers": [1, 4, 1, 4],
                                         "samples_per_s": [100.0, 300.0, 100.0, 360.0]}))
    assert speed.efficiency.tolist() == pytest.approx([1.0, 0.75, 1.0, 0.9])


def test_linear_rate_and_distance_exponent_fits():
    import pandas as pd

    from distdl.studies.overparam import distance_exponent, linear_rate

    steps = np.arange(0, 200, 10.0)
    rate, r2 = linear_rate(steps, 3.0 * np.exp(-0.02 * steps), skip=0.1)
    assert rate == pytest.approx(0.02) and r2 == pytest.approx(1.0)
    widths = np.array([16, 64, 256, 1024])
    exponent, _ = distance_exponent(pd.DataFrame({"width": widths, "relative_distance": 2.0 * widths**-0.5}))
    assert exponent == pytest.approx(-0.5)


def test_a_run_saved_before_a_key_existed_still_resumes(tmp_path):
    """distdl grows keys; a run directory written without one resumes when the key has its default."""
    import yaml

    from distdl.config import load_config
    from distdl.driver import check_run_dir

    config = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [f"run.storage_path={tmp_path}"])
    older = config.to_dict()
    del older["data"]["label_noise"], older["trainer"]["stop_at_loss"]
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "config.yaml").write_text(yaml.safe_dump(older))
    assert check_run_dir(config, overwrite=False) is True
    changed = load_config(REPO / "configs/resnet/mnist_laptop.yaml", [f"run.storage_path={tmp_path}",
                                                                       "data.label_noise=0.1"])
    from distdl.errors import RunDirError

    with pytest.raises(RunDirError, match=r"data.label_noise: 0.0 -> 0.1"):
        check_run_dir(changed, overwrite=False)
