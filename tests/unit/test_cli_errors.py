"""Bad input stops `distdl train` before Ray starts, with a message naming the culprit; run-directory checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from distdl import driver, rundir
from distdl.config import load_config
from distdl.driver import check_run_dir
from distdl.errors import RunDirError
from distdl.rundir import CONFIG_FILE
from tests.helpers.shared import QUIET, REPO

TINY = REPO / "configs/bert/pretrain_tiny.yaml"


BAD_INPUTS = {
    "unknown key": (["trainer.max_stepz=3"], ["trainer.max_stepz", "max_steps"]),
    "zero stage": (["engine.zero_stage=5"], ["engine.zero_stage=5", "0, 1, 2, 3"]),
    "missing corpus": (["data.path=/nonexistent/corpus.txt"], ["/nonexistent/corpus.txt", "data.path"]),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """`distdl train` on each bad input, all started at once (each costs ~3 s of imports)."""
    runs = {}
    for case, (overrides, _) in BAD_INPUTS.items():
        tmp = tmp_path_factory.mktemp("cli")
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
        command = [sys.executable, "-m", "distdl.cli", "train", str(TINY), *overrides, f"run.storage_path={tmp}"]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[case] = (process, tmp, time.monotonic())
    results = {}
    for case, (process, tmp, begin) in runs.items():
        stdout, stderr = process.communicate(timeout=120)
        results[case] = (process.returncode, stdout, stderr, time.monotonic() - begin, tmp)
    return results


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_fast_naming_the_culprit(cli_runs, case):
    returncode, stdout, stderr, seconds, storage = cli_runs[case]
    assert returncode == 2, stderr
    for text in BAD_INPUTS[case][1]:
        assert text in stderr
    assert "Traceback" not in stderr
    assert "Ray" not in stdout + stderr  # no local Ray instance was started
    assert seconds < 60
    assert not (storage / "bert-tiny").exists()  # a failed first start leaves no run directory


def test_bad_deepspeed_json_fails_before_ray(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus with words {i % 7} and {i % 11}" for i in range(400)))
    bad_json = tmp_path / "ds.json"
    bad_json.write_text("{not json")
    config = load_config(TINY, [f"run.storage_path={tmp_path / 'runs'}", f"data.path={corpus}",
                                f"engine.deepspeed_config={bad_json}", "tokenizer.vocab_size=200",
                                "data.max_seq_length=16", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
                                f"data.cache_dir={tmp_path / 'hf'}", *QUIET])

    def ray_starts(config):
        raise AssertionError("Ray would start here")

    with pytest.raises(Exception) as info:
        driver.train(config, ray_starts)
    assert "engine.deepspeed_config" in str(info.value) and str(bad_json) in str(info.value)


# ----------------------------------------------------------------------------- check_run_dir


def config_in(tmp_path, *overrides):
    return load_config(TINY, [f"run.storage_path={tmp_path}", *overrides])


def saved_run(tmp_path, *overrides):
    """A run directory holding the config of a run made with `overrides`, and a checkpoint file."""
    old = config_in(tmp_path, *overrides)
    old.run_dir.mkdir(parents=True)
    (old.run_dir / CONFIG_FILE).write_text(old.to_yaml())
    (old.run_dir / "checkpoint_000000").mkdir()
    (old.run_dir / "checkpoint_000000" / "latest").write_text("global_step10")
    return old.run_dir


def test_fresh_run_dir(tmp_path):
    assert check_run_dir(config_in(tmp_path), overwrite=False) is False
    config = config_in(tmp_path)
    config.run_dir.mkdir()
    assert check_run_dir(config, overwrite=False) is False  # empty: not a resume


def test_identical_config_is_a_resume(tmp_path):
    saved_run(tmp_path)
    assert check_run_dir(config_in(tmp_path), overwrite=False) is True


def test_only_the_step_budget_changed_is_a_resume(tmp_path):
    saved_run(tmp_path, "trainer.max_steps=300")
    assert check_run_dir(config_in(tmp_path, "trainer.max_steps=600", "trainer.stop_at_step=400"), False) is True


def test_session_keys_changed_is_a_resume_model_keys_are_not(tmp_path):
    """A Slurm job chain reruns on a new Ray head with other intervals; the model must stay."""
    saved_run(tmp_path)
    session = ("ray.address=10.0.0.7:6379", "trainer.log_every=50", "trainer.checkpoint_every=500",
               "run.max_failures=3", "tracking.wandb_mode=offline", "scaling.cpus_per_worker=4")
    assert check_run_dir(config_in(tmp_path, *session), overwrite=False) is True
    with pytest.raises(RunDirError, match="model.preset"):
        check_run_dir(config_in(tmp_path, *session, "model.preset=mini"), overwrite=False)


def test_another_worker_count_is_a_resume_at_the_same_global_batch(tmp_path):
    """A job requeued onto fewer nodes: accumulation makes up the global batch. A global batch given as
    accumulation steps would change with the workers; the refusal says which global batch to pass."""
    saved_run(tmp_path)  # 2 workers x 16 x 1 = 32
    fewer = config_in(tmp_path, "scaling.num_workers=1")
    assert (fewer.trainer.global_batch_size, fewer.trainer.gradient_accumulation_steps) == (32, 2)
    assert check_run_dir(fewer, overwrite=False) is True
    with pytest.raises(RunDirError, match=r"trainer.global_batch_size: 32 -> 16[\s\S]*pass trainer.global_batch_size=32"):
        check_run_dir(config_in(tmp_path, "scaling.num_workers=1", "trainer.global_batch_size=null",
                                "trainer.gradient_accumulation_steps=1"), overwrite=False)


def test_different_config_is_refused_naming_the_key(tmp_path):
    run_dir = saved_run(tmp_path, "optimizer.lr=0.001")
    with pytest.raises(RunDirError) as info:
        check_run_dir(config_in(tmp_path, "optimizer.lr=0.002", "trainer.max_steps=500"), overwrite=False)
    message = str(info.value)
    assert "optimizer.lr" in message and "0.001" in message and "0.002" in message
    assert "max_steps:" not in message  # budget keys are not differences
    assert str(run_dir) in message
    assert (run_dir / CONFIG_FILE).is_file()  # nothing moved


def test_non_distdl_directory_is_refused(tmp_path):
    config = config_in(tmp_path)
    config.run_dir.mkdir()
    (config.run_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=CONFIG_FILE):
        check_run_dir(config, overwrite=False)


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run_dir = saved_run(tmp_path, "optimizer.lr=0.001")
    old_yaml = (run_dir / CONFIG_FILE).read_text()
    assert check_run_dir(config_in(tmp_path, "optimizer.lr=0.002"), overwrite=True) is False
    assert not run_dir.exists()
    [aside] = [p for p in tmp_path.iterdir() if p != run_dir]
    assert aside.name.startswith(run_dir.name)
    assert (aside / CONFIG_FILE).read_text() == old_yaml
    assert (aside / "checkpoint_000000" / "latest").read_text() == "global_step10"


def test_two_overwrites_in_the_same_second(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt, *args: "20250101-000000")
    saved_run(tmp_path, "optimizer.lr=0.001")
    check_run_dir(config_in(tmp_path, "optimizer.lr=0.002"), overwrite=True)
    saved_run(tmp_path, "optimizer.lr=0.003")
    assert check_run_dir(config_in(tmp_path, "optimizer.lr=0.002"), overwrite=True) is False
    assert len(list(tmp_path.iterdir())) == 2  # both earlier runs kept


def test_export_of_a_workload_without_a_format_is_refused_and_creates_nothing(tmp_path, capsys):
    from distdl.cli import main

    config = load_config(None, ["workload=no_export_format", "trainer.max_steps=1", f"run.storage_path={tmp_path}"])
    config.run_dir.mkdir()
    (config.run_dir / CONFIG_FILE).write_text(config.to_yaml())
    target = tmp_path / "exported"
    assert main(["export", str(config.run_dir), str(target)]) == 2
    err = capsys.readouterr().err
    assert "workload no_export_format defines no export format" in err and "Traceback" not in err
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == [config.run.name]
