"""Stop requests in one process: the driver's signal handlers write the request, rank 0's watch sees
it without a step waiting on storage, the ranks stop one step after it was seen, and the job log
warns when Slurm's warning leaves too little time. The real signals to a real run are in
tests/distributed/test_faults.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from distdl.collectives import DeferredAnyRank
from distdl.driver import STOP_SIGNALS, StopSignals, stop_on_signal
from distdl.loop import Schedule, StopRules
from distdl.rundir import STOP_REQUEST_FILE, RunStorage
from distdl.stop_requests import POLL_S, StopRequestWatch, signal_margin, stop_request_watch
from tests.helpers.shared import wait_for

CPU = torch.device("cpu")




def schedule(stop: int) -> Schedule:
    return Schedule(stop=stop, log_every=10, eval_every=0, checkpoint_every=0, scored_checkpoints=False)


@pytest.mark.parametrize("flag", [False, True])
def test_a_deferred_question_gives_the_flag_back_in_one_process(flag):
    assert DeferredAnyRank(flag, CPU).result() is flag


def test_the_ranks_stop_at_the_step_after_rank_0_saw_the_request():
    seen_at = 7
    step_now = {"step": 0}
    rules = StopRules(target_loss=None, stop_requested=lambda: step_now["step"] >= seen_at)
    plan = schedule(stop=40)
    for step in range(1, 41):
        step_now["step"] = step
        rules.after_step(step, plan, rank=0, device=CPU)
        if step == plan.stop:
            break
    assert rules.on_request == plan.stop == seen_at + 1
    assert plan.logs(seen_at + 1) and plan.checkpoints(seen_at + 1), "the last step logs and checkpoints"
    assert not plan.evaluates(seen_at + 1), "a preemption's grace period is for the checkpoint, not an evaluation"
    assert rules.summary()["stopped_on_request_step"] == seen_at + 1


def test_other_ranks_never_ask_and_the_last_step_is_left_alone():
    rules = StopRules(target_loss=None, stop_requested=lambda: True)
    plan = schedule(stop=3)
    for step in (1, 2, 3):
        rules.after_step(step, plan, rank=1, device=CPU)  # rank 1's own answer is always False
    assert rules.on_request is None and plan.stop == 3
    asking = StopRules(target_loss=None, stop_requested=lambda: True)
    plan = schedule(stop=2)
    for step in (1, 2):
        asking.after_step(step, plan, rank=0, device=CPU)
    assert asking.on_request is None and plan.stop == 2, "the last step completes the run, not a stop"


def test_rank_0s_watch_sees_a_request_made_after_it_started_and_says_so(tmp_path, capsys):
    storage = RunStorage(tmp_path)
    watch = StopRequestWatch(storage, interval_s=0.05)
    try:
        assert not watch.requested()
        (tmp_path / STOP_REQUEST_FILE).write_text("SIGTERM\n")
        wait_for(watch.requested, 10, "the watch to see the request")
    finally:
        watch.close()
    assert "rank 0 saw the stop request: checkpointing after the next step" in capsys.readouterr().out
    with stop_request_watch(storage, rank=1) as elsewhere:
        assert elsewhere() is False, "only rank 0 watches"
    assert POLL_S["filesystem"] <= 1.0


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda signum: signal.Signals(signum).name)
def test_a_stop_signal_during_a_run_writes_the_request_and_the_handlers_are_given_back(tmp_path, signum, capsys):
    storage = RunStorage(tmp_path)
    (tmp_path / STOP_REQUEST_FILE).write_text("left by an earlier session\n")
    before = signal.getsignal(signum)

    def rays_handler(signum, frame):  # what ray.init puts in place for SIGTERM: exit at once
        raise SystemExit(signum)

    try:
        with stop_on_signal(storage) as signals:
            assert not (tmp_path / STOP_REQUEST_FILE).exists(), "an earlier session's request is dropped"
            # Connecting lets Ray take SIGTERM; the signals are taken back after it.
            signals.connecting(lambda config: signal.signal(signal.SIGTERM, rays_handler))(None)
            os.kill(os.getpid(), signum)
            wait_for(lambda: (tmp_path / STOP_REQUEST_FILE).exists()
                     and "checkpointing at the next step" in capsys.readouterr().out, 10, "the request file")
        assert (tmp_path / STOP_REQUEST_FILE).read_text().startswith(signal.Signals(signum).name)
        # Given back: Ray's SIGTERM handler, found when the signals were taken again; SIGUSR1's own.
        assert signal.getsignal(signum) is (rays_handler if signum == signal.SIGTERM else before)
    finally:
        signal.signal(signum, before)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if signum != signal.SIGTERM else before)


def test_a_request_that_cannot_be_written_is_said_and_the_run_goes_on(tmp_path, capsys):
    blocked = tmp_path / "run"
    blocked.write_text("a file where the run directory should be: the write fails\n")
    signals = StopSignals(RunStorage(blocked))
    signals.write_request("SIGTERM")
    assert "got SIGTERM but could not write the stop request" in capsys.readouterr().err


def test_the_job_log_warns_when_slurms_warning_leaves_too_little_time():
    assert signal_margin(120, step_s=2.0, save_s=20.0, poll_s=1.0) is None  # needs 25 s; 120 >= 1.5 x 25
    note = signal_margin(120, step_s=10.0, save_s=70.0, poll_s=1.0)  # needs 91 s; 1.5 x 91 = 136.5
    assert note is not None
    assert "Slurm warns 120 s before the time limit" in note and "about 91 s" in note
    assert "two steps of 10.0 s" in note and "a checkpoint of 70.0 s" in note
    assert note.endswith("--signal-seconds=140 or more")
