"""What the tests share: the repository's root and its shipped configs, the real text corpus the BERT
tests pretrain on, and the overrides that keep a test's run quiet (W&B off, no progress bar)."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
