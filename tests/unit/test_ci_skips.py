"""Under CI a skip for a missing prerequisite is a failure that names it (tests/conftest.py), so a green CI
means every test ran; on a developer's machine it stays a skip, and the legitimate skips stay skips."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.shared import REPO

PROBE = '''
import pytest

def test_needs_the_corpus():
    pytest.skip("needs the Debian license texts in /usr/share/common-licenses")

def test_on_older_torch():
    pytest.skip("PyTorch before 2.9 has only allow_tf32")
'''


def run_probe(tmp_path, ci: str) -> str:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(probe)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "CI": ci}, timeout=300)
    return done.stdout


def test_under_ci_a_missing_prerequisite_fails_naming_it_and_a_legitimate_skip_stays(tmp_path):
    said = run_probe(tmp_path, "true")
    assert "1 failed, 1 skipped" in said, said
    assert ("test_probe.py::test_needs_the_corpus - skipped under CI, where every test must run: needs the "
            "Debian license texts") in said, said


def test_outside_ci_both_stay_skips(tmp_path):
    said = run_probe(tmp_path, "")
    assert "2 skipped" in said and "failed" not in said, said
