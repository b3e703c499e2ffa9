"""distdl.provenance: what a study's or sweep's results.json records about the software and machine."""

from __future__ import annotations

import os

from distdl import provenance
from tests.helpers.shared import REPO, git_head


def test_the_record_names_this_checkouts_commit_the_libraries_and_the_machine():
    record = provenance.record()
    distdl = record["software"]["distdl"]
    assert distdl["commit"] == git_head()
    changed = os.popen(f"git -C {REPO} status --porcelain -- distdl").read().strip()
    assert distdl["uncommitted_changes"] is bool(changed)
    import deepspeed
    import torch

    assert torch.__version__.startswith(record["software"]["torch"])  # the wheel's local tag (+cu130) aside
    assert record["software"]["deepspeed"] == deepspeed.__version__
    assert record["driver"]["cores"] == os.cpu_count()
    assert record["driver"]["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def test_an_installed_wheel_has_no_commit_to_name(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGE", tmp_path)  # site-packages/distdl: no git checkout around it
    assert provenance.software()["distdl"].keys() == {"version"}
