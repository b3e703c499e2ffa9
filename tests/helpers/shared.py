"""What the tests share: the repository's root and its shipped configs, the real text corpus the BERT
tests pretrain on, the overrides that keep a test's run quiet (W&B off, no progress bar), and waiting
on a condition (never on a fixed sleep)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TINY = CONFIGS / "bert" / "pretrain_tiny.yaml"
# Debian's license texts: real English prose, on every machine of this kind (launch/install.sh checks).
CORPUS = Path("/usr/share/common-licenses")
QUIET = ("tracking.wandb_mode=disabled", "tracking.progress_bar=false")


def git_head() -> str:
    """The commit this checkout is at."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    """Wait until `condition()` holds, looking every `poll_s`; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(poll_s)
