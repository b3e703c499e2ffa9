"""Faults met with real processes: killed workers and drivers, saves cut short, full and read-only
storage, a diverging loss, an unreachable W&B. Each run must end equal to an uninterrupted one, or
stop with a clear message and its last good checkpoint intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from distdl.cluster.connect import connect_ray
from distdl.config import load_config
from distdl.driver import train
from distdl.engine.checkpoints import checkpoint_step, latest_checkpoint, trained_state, verify_checkpoint
from distdl.errors import TrainingFailed
from distdl.rundir import read_metrics, read_summary
from tests.helpers.bert_runs import QUICKSTART, overrides, run
from tests.helpers.shared import CORPUS, wait_for

pytestmark = pytest.mark.distributed
# bf16: a resumed, restarted or rerun run must equal the uninterrupted one in bf16 too.
RESUME_COMMON = ("engine.zero_stage=2", "engine.precision=bf16", "trainer.max_steps=12", "trainer.checkpoint_every=6")


@pytest.fixture(scope="module")
def shared_tokenizer(tmp_path_factory):
    """WordPiece training is not bit-reproducible (tokenizers#1794), so runs to compare share one."""
    from distdl.data.text import TextDataSection, TokenizerSection, load_raw_corpus, train_tokenizer

    if not CORPUS.is_dir():
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    out = tmp_path_factory.mktemp("shared") / "tokenizer"
    train_tokenizer(load_raw_corpus(TextDataSection(path=str(CORPUS))), TokenizerSection(vocab_size=2000), out)
    return out


@pytest.fixture(scope="module")
def common(shared_tokenizer):
    return (*RESUME_COMMON, f"tokenizer.name_or_path={shared_tokenizer}")


@pytest.fixture(scope="module")
def straight_run(ray_local, tmp_path_factory, common):
    """The uninterrupted run that every resumed, restarted and rerun run must end equal to."""
    return run(tmp_path_factory.mktemp("straight"), CORPUS, "run.name=straight", *common)[0]


def assert_same_final_weights(straight, other) -> None:
    a = trained_state(straight.run_dir).weights()
    b = trained_state(other.run_dir).weights()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)




def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of a live parent stays a zombie until reaped: dead all the same.
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())


def test_resumed_run_equals_uninterrupted(straight_run, tmp_path, corpus, common):
    """Stopped at step 6 and resumed (bf16, ZeRO-2), the run ends equal to the uninterrupted one. The resumed
    session turns activation checkpointing on, a session key (a run that ran out of memory may resume
    with it): recomputation changes no value."""
    first, half = run(tmp_path, corpus, "run.name=resumed", *common, "trainer.stop_at_step=6")
    assert half["steps"] == 6 and not half["completed"]
    resumed, summary = run(tmp_path, corpus, "run.name=resumed", *common, "model.activation_checkpointing=true")
    assert summary["steps"] == 12 and summary["completed"]
    assert resumed.sections["model"].activation_checkpointing
    assert_same_final_weights(straight_run, resumed)
    assert [m["step"] for m in read_metrics(resumed.run_dir)] == [4, 6, 8, 12]
    # Rerunning a finished run trains nothing and keeps its summary.
    again = train(load_config(resumed.run_dir / "config.yaml"), connect_ray)
    assert again == summary
    # The logged losses after the resume point are those of the uninterrupted run.
    losses = {m["step"]: m["loss"] for m in read_metrics(straight_run.run_dir)}
    assert read_metrics(resumed.run_dir)[-1]["loss"] == pytest.approx(losses[12], rel=1e-5)


def test_a_compiled_run_resumes_exactly(tmp_path, corpus, common):
    """torch.compile (bf16, ZeRO-2): each session compiles once, reported apart from the step rate,
    and a compiled run stopped and resumed ends with the weights of an uninterrupted compiled run.
    (Compiled dropout draws its numbers with Inductor's own generator, seeded from torch's, so its
    masks are not eager's: the comparison is with a compiled run.)"""
    # One worker: the compilation, not the world size, is under test, and one worker compiles on both cores.
    compiled = (*common, "trainer.compile=true", "scaling.num_workers=1")
    straight, _ = run(tmp_path, corpus, "run.name=straight_compiled", *compiled)
    run(tmp_path, corpus, "run.name=compiled", *compiled, "trainer.stop_at_step=6")
    first = read_summary(tmp_path / "compiled")
    resumed, summary = run(tmp_path, corpus, "run.name=compiled", *compiled)
    assert first["steps"] == 6 and summary["steps"] == 12 and summary["completed"]
    assert first["utilization"]["compile_s"] > 0 and summary["utilization"]["compile_s"] > 0
    logged = {m["step"]: m for m in read_metrics(resumed.run_dir)}
    assert sorted(logged) == [4, 6, 8, 12]
    assert "compile_s" in logged[4] and "compile_s" in logged[8], "each session reports its compilation"
    assert logged[12]["loss"] < logged[4]["loss"]
    assert_same_final_weights(straight, resumed)


def test_a_model_that_cannot_compile_stops_naming_compile_and_the_way_out(tmp_path, corpus, common):
    config = load_config(QUICKSTART, overrides(tmp_path, corpus, "run.name=uncompilable",
                                               "workload=bert_pretrain_uncompilable", *common, "trainer.compile=true"))
    with pytest.raises(TrainingFailed) as failure:
        train(config, connect_ray)
    message = str(failure.value)
    assert "trainer.compile=true: torch.compile could not compile the bert_pretrain_uncompilable model" in message
    assert "Attempt to trace forbidden callable" in message and "set trainer.compile=false" in message
    assert "pickle" not in message


def test_a_worker_killed_with_sigkill_is_restarted_from_the_last_checkpoint(straight_run, tmp_path, corpus, common):
    config = load_config(QUICKSTART, overrides(tmp_path, corpus, "run.name=killed", "workload=bert_pretrain_killed_once",
                                               "run.max_failures=1", *common))
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(summary=train(config, connect_ray)))
    driver.start()
    pid_file = config.run_dir / "worker_pid"
    wait_for(lambda: pid_file.is_file() and pid_file.read_text().strip() or not driver.is_alive(), 300,
             "rank 1 to reach micro-batch 7")
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    driver.join(300)
    assert not driver.is_alive() and not alive(pid)
    summary = outcome["summary"]
    assert summary["steps"] == 12 and summary["completed"]
    # Step 4 from the first attempt; the restart resumed from step 6's checkpoint.
    assert [m["step"] for m in read_metrics(config.run_dir)] == [4, 8, 12]
    assert_same_final_weights(straight_run, config)


def test_a_driver_killed_while_a_checkpoint_is_written_resumes_from_the_one_before(straight_run, tmp_path, corpus,
                                                                                 common):
    args = overrides(tmp_path, corpus, "run.name=driver_killed", "workload=bert_pretrain_killed_while_saving", *common)
    config = load_config(QUICKSTART, args)
    log = (tmp_path / "driver.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, as a user's would be
    # As in a Slurm job: stdout and stderr into a file, with the progress bar asked for.
    driver = subprocess.Popen([sys.executable, "-m", "distdl.cli", "train", str(QUICKSTART), *args,
                               "tracking.progress_bar=true"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    pid_file = config.run_dir / "saving_pid"
    try:
        wait_for(lambda: pid_file.is_file() and pid_file.read_text().strip() or driver.poll() is not None, 400,
                 "the step-12 checkpoint upload")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    worker = int(pid_file.read_text())
    wait_for(lambda: not alive(worker), 60, "the dead driver's workers to go too")
    # The job log: one plain line per log step (4 and 8; 12's may have been cut off by the kill), no
    # redrawn bar, no carriage returns, no colour codes.
    text = (tmp_path / "driver.log").read_text()
    assert "\r" not in text and "\x1b[" not in text and "%|" not in text, text[-3000:]
    # An embedded Ray's one node has no drain notices to watch for: no preemption watcher, and no
    # error line from starting one (ray#53727).
    assert "PreemptionWatcher" not in text, text[-3000:]
    progress = [line for line in text.splitlines() if "distdl: step " in line]
    assert [line.split("distdl: step ")[1].split()[0] for line in progress][:2] == ["4/12", "8/12"], text[-3000:]
    assert len(progress) <= 3 and all("loss=" in line and "eta=" in line for line in progress), progress
    # Half of step 12's checkpoint is in storage, but Ray Train never recorded it.
    half_written = config.run_dir / "checkpoint_00000012"
    assert half_written.is_dir() and any(half_written.rglob("*.pt"))
    assert latest_checkpoint(config.run_dir).name == "checkpoint_00000006" and checkpoint_step(config.run_dir) == 6
    verify_checkpoint(latest_checkpoint(config.run_dir))
    # The same command again: resumes from step 6 and ends where the uninterrupted run did.
    rerun, summary = run(tmp_path, corpus, "run.name=driver_killed", "workload=bert_pretrain_killed_while_saving",
                         *common)
    assert summary["steps"] == 12 and summary["completed"]
    # Step 12's line from the killed attempt was dropped and written again by the rerun.
    assert [m["step"] for m in read_metrics(rerun.run_dir)] == [4, 8, 12]
    assert_same_final_weights(straight_run, rerun)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preempted_run_checkpoints_at_the_next_step_exits_3_and_its_rerun_ends_equal(straight_run, tmp_path, corpus,
                                                                                      common, signum):
    """SIGTERM (Kubernetes', a cloud's preemption) or SIGUSR1 (Slurm's warning) to `distdl train`: rank 0
    takes the request in during step 6, every rank stops after step 7 (neither a log nor a checkpoint
    step) with a checkpoint there, the driver exits with 3 ("resume me"), and the same command again
    ends with the uninterrupted run's weights."""
    name = f"preempted_{signal.Signals(signum).name}"
    args = overrides(tmp_path, corpus, f"run.name={name}", "workload=bert_pretrain_paused_for_a_stop", *common)
    config = load_config(QUICKSTART, args)
    log_file = tmp_path / "driver.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, as a user's would be
    driver = subprocess.Popen([sys.executable, "-m", "distdl.cli", "train", str(QUICKSTART), *args],
                              stdout=log_file.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: (config.run_dir / "paused_pid").is_file() or driver.poll() is not None, 400,
                 "rank 0 to reach step 6")
        assert driver.poll() is None, log_file.read_text()[-3000:]
        driver.send_signal(signum)
        wait_for(lambda: "rank 0 saw the stop request" in log_file.read_text() or driver.poll() is not None, 60,
                 "rank 0 to see the stop request")
        (config.run_dir / "release").touch()
        status = driver.wait(300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = log_file.read_text()
    assert status == 3, text[-3000:]
    assert f"got {signal.Signals(signum).name}: checkpointing at the next step" in text
    assert "stopped on request at step 7 with a checkpoint; run the same command to resume" in text
    summary = read_summary(config.run_dir)
    assert summary["stopped_on_request_step"] == 7 and summary["steps"] == 7 and not summary["completed"]
    assert latest_checkpoint(config.run_dir).name == "checkpoint_00000007" and checkpoint_step(config.run_dir) == 7
    rerun, summary = run(tmp_path, corpus, f"run.name={name}", "workload=bert_pretrain_paused_for_a_stop", *common)
    assert summary["steps"] == 12 and summary["completed"] and summary["stopped_on_request_step"] is None
    assert [m["step"] for m in read_metrics(rerun.run_dir)] == [4, 7, 8, 12]
    assert_same_final_weights(straight_run, rerun)


def test_a_flipped_byte_is_named_on_export_and_a_rerun_resumes_from_the_checkpoint_before(straight_run, tmp_path,
                                                                                         corpus, common, capsys):
    """A byte flipped in the middle of the latest checkpoint's model states (a tensor's bytes, which
    torch.load would read without a word): `distdl export` names the checkpoint and the file, and the
    rerun of the finished run names them, moves that checkpoint aside and trains again from step 6,
    ending with the uninterrupted run's weights."""
    from distdl.cli import main

    config, summary = run(tmp_path, corpus, "run.name=flipped", *common)
    assert summary["completed"] and sorted(config.run_storage.checkpoints()) == ["checkpoint_00000006",
                                                                                 "checkpoint_00000012"]
    states = config.run_dir / "checkpoint_00000012/global_step12/mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x01
    states.write_bytes(bytes(data))
    torch.load(states, weights_only=False)  # what went unnoticed before: the archive still loads
    capsys.readouterr()
    assert main(["export", str(config.run_dir), str(tmp_path / "export")]) == 2
    said = capsys.readouterr().err
    assert "checkpoint_00000012 is corrupted: global_step12/mp_rank_00_model_states.pt does not match the sha256 " \
           "manifest_rank0_of_2.sha256 recorded when it was saved" in said, said
    assert not (tmp_path / "export").exists()
    rerun, summary = run(tmp_path, corpus, "run.name=flipped", *common)
    said = capsys.readouterr().out
    assert "Resuming from checkpoint_00000006, the newest checkpoint whose files match their manifests" in said, said
    assert summary["steps"] == 12 and summary["completed"]
    assert (rerun.run_dir / "damaged-checkpoint_00000012").is_dir()
    assert [m["step"] for m in read_metrics(rerun.run_dir)] == [4, 8, 12]
    assert_same_final_weights(straight_run, rerun)


def test_a_diverging_loss_stops_the_run_at_once_and_keeps_the_last_good_checkpoint(ray_local, tmp_path, corpus,
                                                                                   common, capsys):
    from distdl.cli import main

    args = overrides(tmp_path, corpus, "run.name=diverged", "workload=bert_pretrain_diverges", *common)
    assert main(["train", str(QUICKSTART), *args]) == 1
    err = capsys.readouterr().err
    run_dir = tmp_path / "diverged"
    assert "not finite at step 9" in err and "training stopped at step 12 without saving" in err
    assert f"the last good checkpoint is {run_dir / 'checkpoint_00000006'} (step 6)" in err
    assert not (run_dir / "checkpoint_00000012").exists() and checkpoint_step(run_dir) == 6
    verify_checkpoint(run_dir / "checkpoint_00000006")


@pytest.fixture()
def small_filesystem(tmp_path):
    """A real 64 MiB filesystem (tmpfs), to fill up or make read-only; needs mount rights."""
    mount_point = tmp_path / "storage"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({made.stderr.strip()})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


# Whichever part of the stack meets the full disk first: a worker writing its shards, or Ray Train's
# controller recording the checkpoint after every shard is in storage.
FULL_DISK_ORDERS = {
    "worker_first": ("bert_pretrain_fills_storage",
                     "could not write the checkpoint of step 12 to {run_dir}/checkpoint_00000012"),
    "controller_first": ("bert_pretrain_fills_storage_before_the_controller",
                         "Ray Train's controller failed while recording the run's state in {run_dir}"),
}


@pytest.mark.parametrize("order", FULL_DISK_ORDERS)
def test_storage_that_fills_up_fails_naming_the_cause_and_keeps_the_last_checkpoint(
        ray_local, small_filesystem, corpus, common, capsys, order):
    from distdl.cli import main

    workload, cause = FULL_DISK_ORDERS[order]
    args = overrides(small_filesystem, corpus, "run.name=full", f"workload={workload}", *common)
    assert main(["train", str(QUICKSTART), *args]) == 1
    err = capsys.readouterr().err
    run_dir = small_filesystem / "full"
    assert cause.format(run_dir=run_dir) in err and "No space left on device" in err, err
    assert "Traceback" not in err
    assert f"the last good checkpoint is {run_dir / 'checkpoint_00000006'} (step 6)" in err, err
    assert latest_checkpoint(run_dir).name == "checkpoint_00000006"
    verify_checkpoint(run_dir / "checkpoint_00000006")
    if order == "controller_first":
        # Ray Train's record was cut short by the full disk: distdl put its copy back.
        assert "checkpoint record" in err and "restored it as of the last complete checkpoint" in err, err


def test_storage_that_cannot_be_written_is_refused_before_anything_starts(small_filesystem, corpus, capsys):
    from distdl.cli import main

    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    args = overrides(small_filesystem / "runs", corpus, "run.name=readonly")
    assert main(["train", str(QUICKSTART), *args]) == 2
    err = capsys.readouterr().err
    assert f"run.storage_path: cannot write to {small_filesystem / 'runs'}" in err and "Read-only" in err


def test_wandb_unreachable_online_warns_and_keeps_the_run_offline_for_wandb_sync(tmp_path, monkeypatch):
    import socket

    from distdl.config import TrackingSection
    from distdl.tracking import Tracker

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    section = TrackingSection(wandb_mode="online", wandb_init_timeout=3, progress_bar=False)
    started = time.monotonic()
    with pytest.warns(UserWarning, match="(?s)W&B online failed.*connection refused.*logging offline instead"):
        tracker = Tracker(section, tmp_path, "unreachable", {"lr": 1e-3}, "online", 0, 4)
    assert time.monotonic() - started < 60, "training waited for W&B no longer than its timeout"
    for step in (1, 2):
        tracker.log(step, {"loss": 1.0 / step})
    summary = {"steps": 2}
    tracker.finish(summary)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    offline = Path(summary["wandb_run_dir"])
    assert offline.name.startswith("offline-run-") and list(offline.glob("run-*.wandb"))
