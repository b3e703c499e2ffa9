"""One reading of how a session ended (rundir.run_outcome), from the summary the loop writes."""

from __future__ import annotations

import pytest

from distdl.rundir import Outcome, run_outcome

ENDED = {"steps": 40, "max_steps": 40, "completed": True, "stopped_at_loss_step": None,
         "stopped_on_request_step": None, "non_finite_step": None}


@pytest.mark.parametrize("changes, outcome", [
    ({}, Outcome.FINISHED),
    ({"steps": 12, "stopped_at_loss_step": 12}, Outcome.TARGET_REACHED),
    ({"steps": 20, "completed": False, "stopped_on_request_step": 20}, Outcome.STOPPED),
    # A request that arrived at the last step: the run finished all the same.
    ({"stopped_on_request_step": 40}, Outcome.FINISHED),
    ({"steps": 7, "completed": False, "non_finite_step": 7}, Outcome.DIVERGED),
    # Divergence wins over a stop request of the same session.
    ({"steps": 7, "completed": False, "non_finite_step": 5, "stopped_on_request_step": 4}, Outcome.DIVERGED),
    ({"steps": 10, "completed": False}, Outcome.UNFINISHED),  # trainer.stop_at_step=10
])
def test_each_ending_is_read_from_the_summary(changes, outcome):
    assert run_outcome({**ENDED, **changes}) is outcome


def test_a_session_without_a_summary_has_no_outcome_and_is_not_done():
    assert run_outcome({}) is Outcome.NO_SUMMARY
    assert not Outcome.NO_SUMMARY.done and not Outcome.STOPPED.done and not Outcome.DIVERGED.done
    assert Outcome.FINISHED.done and Outcome.TARGET_REACHED.done
