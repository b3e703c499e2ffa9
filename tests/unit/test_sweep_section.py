"""`distdl sweep`'s own settings, without Ray: the GLUE search's grid, Tune's search space and
scheduler, trial names, and bad input refused before any trial starts, naming the key."""

from __future__ import annotations

import pytest

from distdl import cli
from distdl.config import load_config
from distdl.errors import ConfigError
from distdl.sweeps.report import TUNE_TRIAL_ID
from distdl.sweeps.runner import read_sweep
from distdl.sweeps.section import search_algorithm, search_space, trial_name, trial_scheduler
from tests.helpers.shared import REPO

SEARCH = REPO / "configs/glue/search.yaml"
MRPC = REPO / "configs/glue/mrpc.yaml"
LAPTOP = REPO / "configs/resnet/mnist_laptop.yaml"


def test_the_glue_search_expands_to_the_papers_24_combinations_each_a_valid_config():
    from ray.tune.search.variant_generator import generate_variants

    section, dimensions, base = read_sweep(MRPC, ["trainer.micro_batch_size=8"], SEARCH)
    assert (section.name, section.metric, section.mode, section.scheduler) == ("glue-mrpc-sweep", "eval_f1", "max",
                                                                                 "asha")
    trials = [resolved for resolved, _ in generate_variants(search_space(dimensions))]
    combinations = {(t[("optimizer.lr",)], t[("trainer.global_batch_size",)], t[("trainer.epochs",)]) for t in trials}
    assert len(trials) == len(combinations) == 24
    assert combinations == {(lr, batch, epochs) for lr in (5e-5, 4e-5, 3e-5, 2e-5) for batch in (16, 32)
                            for epochs in (2, 3, 4)}
    # ASHA's first rung is the first evaluation (every epoch here: step 1 and on), its rungs 3x apart.
    scheduler = trial_scheduler(section, dimensions)
    assert (scheduler._time_attr, scheduler._reduction_factor) == ("step", 3)
    # CoLA is ranked by its own metric.
    assert read_sweep(REPO / "configs/glue/cola.yaml", ["trainer.micro_batch_size=8"], SEARCH)[0].metric == "eval_mcc"


def test_every_kind_of_dimension_becomes_tunes_own():
    from ray import tune

    section, dimensions, _ = read_sweep(LAPTOP, [
        "sweep.space={optimizer.lr: {loguniform: [1.0e-3, 1.0]}, optimizer.momentum: {uniform: [0.0, 0.9]}, "
        "model.name: {choice: [mlp, cifar_resnet20]}, optimizer.weight_decay: {grid: [0.0, 1.0e-4]}}",
        "sweep.metric=eval_top1", "sweep.mode=max", "sweep.samples=3"], None)
    space = search_space(dimensions)
    assert isinstance(space["optimizer.lr"], tune.search.sample.Float) and space["optimizer.lr"].lower == 1e-3
    assert isinstance(space["optimizer.lr"].sampler, tune.search.sample.LogUniform)
    assert isinstance(space["optimizer.momentum"].sampler, tune.search.sample.Uniform)
    assert space["model.name"].categories == ["mlp", "cifar_resnet20"]
    assert space["optimizer.weight_decay"] == {"grid_search": [0.0, 1e-4]}
    assert section.samples == 3 and section.name == "resnet20-mnist-sweep" and trial_scheduler(section, dimensions) is None


def test_trial_names_give_the_index_and_the_values():
    assert trial_name("71e9a_00003", {"optimizer.lr": 3e-05, "trainer.global_batch_size": 16}) == \
        "trial00003-lr3e-05-global_batch_size16"
    assert trial_name("71e9a_00012", {"model.name": "a/b c"}) == "trial00012-namea_b_c"
    # A searcher's (Optuna's) trial ids are 8 random hex digits.
    assert trial_name("c0ffee42", {"optimizer.lr": 0.1}) == "trialc0ffee42-lr0.1"
    # The report finds each run's name in Tune's directory name for the trial, in both forms.
    for directory, own in [("sweep_trial_71e9a_00003_3_optimizer.lr=0.0000_2026-12-01_10-00-00", "00003"),
                           ("sweep_trial_c0ffee42_1_optimizer.lr=0.1000_2026-12-01_10-00-00", "c0ffee42")]:
        assert TUNE_TRIAL_ID.search(directory).group(2) == own


def test_optuna_proposes_from_choices_and_ranges_seeded_by_the_run_seed(monkeypatch):
    from ray.tune.search.optuna import OptunaSearch

    optuna = ["sweep.search=optuna", "sweep.metric=eval_top1", "sweep.mode=max", "sweep.samples=8"]
    section, dimensions, _ = read_sweep(LAPTOP, [
        "sweep.space={optimizer.lr: {loguniform: [1.0e-3, 1.0]}, model.name: {choice: [mlp, cifar_resnet20]}}",
        *optuna], None)
    searcher = search_algorithm(section, seed=6)
    assert isinstance(searcher, OptunaSearch) and searcher._seed == 6
    searcher.set_search_properties(section.metric, section.mode, search_space(dimensions))
    drawn = [searcher.suggest(f"t{i}") for i in range(8)]
    assert all(1e-3 <= d["optimizer.lr"] <= 1.0 and d["model.name"] in ("mlp", "cifar_resnet20") for d in drawn)
    assert len({d["optimizer.lr"] for d in drawn}) == 8
    # The same seed proposes the same trials.
    again = search_algorithm(section, seed=6)
    again.set_search_properties(section.metric, section.mode, search_space(dimensions))
    assert [again.suggest(f"t{i}") for i in range(8)] == drawn
    assert search_algorithm(read_sweep(LAPTOP, ["sweep.space={optimizer.lr: {grid: [0.1]}}", *optuna[1:]],
                                       None)[0], seed=0) is None
    # Optuna runs no grid; without the package, it is named, with how to install it.
    with pytest.raises(ConfigError, match=r"sweep.space.optimizer.lr: sweep.search=optuna draws every value itself "
                                          r"and runs no grid; give it as \{choice: \[0.1, 0.3\]\}"):
        read_sweep(LAPTOP, ["sweep.space={optimizer.lr: {grid: [0.1, 0.3]}}", *optuna], None)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"sweep.search=optuna needs the optuna package.*pip install 'distdl\[optuna\]'"):
        read_sweep(LAPTOP, ["sweep.space={optimizer.lr: {choice: [0.1, 0.3]}}", *optuna], None)


def test_a_key_below_an_optional_section_left_out_can_be_searched():
    _, dimensions, _ = read_sweep(LAPTOP, ["sweep.space={optimizer.sam.rho: {grid: [0.05, 0.1]}}",
                                           "sweep.metric=eval_top1", "sweep.mode=max"], None)
    assert dimensions[0].values == (0.05, 0.1)
    assert load_config(LAPTOP).optimizer.sam is None


ASHA = ["sweep.scheduler=asha", "sweep.metric=eval_top1", "sweep.mode=max"]
PBT = ["sweep.scheduler=pbt", "sweep.metric=eval_top1", "sweep.mode=max", "trainer.eval_every=10",
       "trainer.checkpoint_every=10"]


@pytest.mark.parametrize("overrides, expected", [
    (["sweep.space={optimizer.learning_rate: {grid: [0.1]}}"], "sweep.space.optimizer.learning_rate is not a key of "
                                                               "the training config"),
    (["sweep.space={optimizer.lr: {choice: []}}"], "sweep.space.optimizer.lr.choice=[] must be a non-empty list"),
    (["sweep.space={optimizer.lr: {loguniform: [0, 0.1]}}"], "sweep.space.optimizer.lr.loguniform=[0, 0.1]: a "
                                                             "log-uniform draw needs low > 0"),
    (["sweep.space={optimizer.lr: {uniform: [0.1, 0.01]}}"], "must be two numbers [low, high] with low < high"),
    (["sweep.space={optimizer.lr: {normal: [0.1, 0.01]}}"], "must be one of {grid: [...]}, {choice: [...]}"),
    (["sweep.space={optimizer.lr: {grid: [0.1, 0.1]}}"], "lists a value twice"),
    (["sweep.space={run.seed: {grid: [0, 1]}}"], "run.* and sweep.* name and place the trials"),
    (["sweep.space={optimizer.lr: {grid: [-1.0]}}"], "the trial with optimizer.lr=-1.0 would have an invalid config"),
    (["sweep.space={trainer.global_batch_size: {grid: [128, 192]}}"], "trainer.global_batch_size=192 would have an "
                                                                    "invalid config"),
    (["sweep.space={}"], "sweep.space is empty"),
    (["sweep.metric=eval_f1", "sweep.mode=max"], "sweep.metric='eval_f1' is not reported by the resnet workload's "
                                                 "evaluations here; it reports: eval_loss, eval_top1"),
    (["sweep.metric=eval_top1"], "sweep.metric=eval_top1: set sweep.mode to max or min"),
    ([], "set sweep.metric (and sweep.mode): the resnet workload has no default"),
    ([*ASHA, "trainer.eval_every=0"], "sweep.scheduler=asha stops trials at their evaluations: set trainer.eval_every"),
    (["sweep.scheduler=hyperband"], "sweep.scheduler='hyperband' is not allowed; allowed: none, asha, pbt"),
    ([*PBT, "trainer.checkpoint_every=20"], "sweep.scheduler=pbt continues trials from the checkpoints they report "
                                            "with their evaluations: set trainer.eval_every and "
                                            "trainer.checkpoint_every to the same steps (they are 10 and 20)"),
    ([*PBT, "sweep.space={model.name: {grid: [mlp, cifar_resnet20]}}"], "sweep.scheduler=pbt perturbs optimizer.lr, "
                                                                       "optimizer.weight_decay, optimizer.momentum, "
                                                                       "optimizer.eps as it trains; sweep.space "
                                                                       "searches none of them (model.name)"),
    ([*PBT, "sweep.quantile_fraction=0.6"], "sweep.quantile_fraction=0.6"),
    ([*PBT, "sweep.search=optuna", "sweep.space={optimizer.lr: {choice: [0.1, 0.3]}}"], "sweep.scheduler=pbt explores "
                                                                                       "by itself, around its initial "
                                                                                       "population; it does not combine "
                                                                                       "with sweep.search=optuna"),
    (["sweep.search=hyperopt"], "sweep.search='hyperopt' is not allowed; allowed: basic, optuna"),
    (["sweep.reduction_factor=1"], "sweep.reduction_factor=1"),
    (["sweep.samples=0"], "sweep.samples=0 must be at least 1"),
    (["sweep.colour=blue"], "unknown key sweep.colour"),
])
def test_bad_sweeps_are_refused_before_any_trial_starts(overrides, expected, tmp_path, capsys):
    base = ["sweep.space={optimizer.lr: {grid: [0.1, 0.3]}}"] if not any(o.startswith("sweep.space") for o in overrides) \
        else []
    argv = ["sweep", str(LAPTOP), *base, *overrides, f"run.storage_path={tmp_path}"]
    assert cli.main(argv) == 2
    assert expected in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing was written"


def test_the_sweep_section_comes_from_the_config_or_its_own_file_not_both(tmp_path, capsys):
    assert cli.main(["sweep", str(LAPTOP), f"run.storage_path={tmp_path}"]) == 2
    assert "has no 'sweep:' section: add one, or give it with --sweep FILE" in capsys.readouterr().err
    both = tmp_path / "both.yaml"
    both.write_text(MRPC.read_text() + SEARCH.read_text())
    with pytest.raises(ConfigError, match="gives another; keep one"):
        read_sweep(both, [], SEARCH)
    with pytest.raises(ConfigError, match="must hold only a 'sweep:' section"):
        read_sweep(MRPC, [], MRPC)


def test_a_search_dimension_can_be_replaced_from_the_command_line():
    """sweep.space.optimizer.lr=... writes a nested key; it replaces the file's dotted one, in place."""
    _, dimensions, _ = read_sweep(MRPC, ["trainer.micro_batch_size=8", "sweep.space.optimizer.lr={grid: [1.0e-4]}",
                                         "sweep.space.trainer.epochs={choice: [1, 2]}"], SEARCH)
    assert {d.key: (d.kind, d.values) for d in dimensions} == {
        "optimizer.lr": ("grid", (1e-4,)), "trainer.global_batch_size": ("grid", (16, 32)),
        "trainer.epochs": ("choice", (1, 2))}


def test_pbt_perturbs_the_optimizer_keys_within_their_ranges_and_its_population_trains_side_by_side(monkeypatch):
    from ray.tune.schedulers import PopulationBasedTraining

    from distdl.sweeps import runner

    section, dimensions, training = read_sweep(LAPTOP, [
        *PBT, "sweep.space={optimizer.lr: {grid: [0.3, 0.1]}, optimizer.momentum: {uniform: [0.5, 0.95]}, "
        "model.name: {grid: [mlp, cifar_resnet20]}}", "sweep.samples=2"], None)
    assert section.perturbation_steps == 10, "the interval defaults to the checkpoints'"
    scheduler = trial_scheduler(section, dimensions)
    assert isinstance(scheduler, PopulationBasedTraining) and scheduler._perturbation_interval == 10
    # Only the optimizer's keys are perturbed (a trial that continues another's takes its model name too).
    assert set(scheduler._hyperparam_mutations) == {"optimizer.lr", "optimizer.momentum"}
    assert scheduler._hyperparam_mutations["optimizer.lr"] == [0.3, 0.1]
    # x1.2 would take momentum 0.9 past its range (and past 1, where SGD diverges): it stays at the bound.
    assert scheduler._custom_explore_fn({"optimizer.lr": 0.36, "optimizer.momentum": 1.08}) == {
        "optimizer.lr": 0.36, "optimizer.momentum": 0.95}
    # 2 lrs x 2 models x 2 samples: 8 trials, which must fit side by side.
    base = load_config(LAPTOP, ["trainer.eval_every=10", "trainer.checkpoint_every=10"])
    monkeypatch.setattr(runner, "trials_that_fit", lambda config: 8)
    runner.check_placement(section, dimensions, base)
    monkeypatch.setattr(runner, "trials_that_fit", lambda config: 4)
    with pytest.raises(ConfigError, match="sweep.scheduler=pbt trains its population side by side: 8 trials, but 4 "
                                          "fit at once"):
        runner.check_placement(section, dimensions, base)


def test_a_pbt_run_replaced_at_a_step_is_replaced_even_if_its_workers_finished_the_rest(tmp_path):
    """Ray Train reports without pausing the loop: a run whose trial Tune continued from another run's
    step-10 checkpoint may still finish its last steps. It is reported replaced, ranked by what it
    reported up to step 10, whichever came first (a race the PBT test lost once on a busy machine)."""
    import json

    from distdl.sweeps.report import trial_row
    from distdl.sweeps.section import SweepSection

    config = load_config(LAPTOP, ["trainer.max_steps=15", f"run.storage_path={tmp_path}", "run.name=trial00001-lr0.001"])
    run_dir = tmp_path / "trial00001-lr0.001"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config.to_yaml())
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "eval_top1": step / 100}) + "\n"
                                                   for step in (5, 10, 15)))
    (run_dir / "summary.json").write_text(json.dumps({"completed": True, "steps": 15}))
    section = SweepSection(metric="eval_top1", mode="max", scheduler="pbt")
    row = trial_row(run_dir, section, [], set(), {}, replaced_at_step=10)
    assert (row["status"], row["best_step"], row["best"]) == ("replaced", 10, 0.1)
    assert trial_row(run_dir, section, [], set(), {})["status"] == "finished"
