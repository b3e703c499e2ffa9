"""What made a result: the software and the machine, recorded in the results.json a study or a sweep
writes (its `provenance`), beside the study.yaml or sweep.yaml that holds its settings, so that a
reader can tell how to make it again.

`software()` names the distdl that ran (its version, and the commit of the checkout it was imported
from, with whether that checkout had uncommitted changes) and the versions of the libraries whose
behaviour the results depend on; `machine()` the cores, CPU model, memory, GPUs and OS of the
machine it runs on (for a study or sweep, the driver's: each trial's run directory names the device
its workers measured their MFU against).
benchmarks/provenance.py builds its records on the same two.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

import psutil

LIBRARIES = ("torch", "deepspeed", "ray", "transformers")
PACKAGE = Path(__file__).resolve().parent


def record() -> dict[str, Any]:
    """The provenance of a result made now (its settings are the study.yaml or sweep.yaml beside it)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "software": software(), "driver": machine()}


def software() -> dict[str, Any]:
    return {"distdl": {"version": installed("distdl"), **checkout()}, "python": platform.python_version(),
            **{library: installed(library) for library in LIBRARIES}}


def installed(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def checkout() -> dict[str, Any]:
    """The git commit distdl was imported from, where it is a checkout (an editable install), and
    whether its code differed from that commit; nothing for an installed wheel."""
    def git(*arguments: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(PACKAGE), *arguments], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    changed = git("status", "--porcelain", "--", str(PACKAGE))
    return {"commit": commit.strip(), "uncommitted_changes": bool(changed and changed.strip())}


def machine() -> dict[str, Any]:
    import cpuinfo  # py-cpuinfo: DeepSpeed's own dependency, which DeepSpeed uses for the same
    import torch

    gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return {"cores": os.cpu_count(), "cpu": cpuinfo.get_cpu_info().get("brand_raw", platform.processor()),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpus": gpus,
            "os": platform.platform(terse=True)}
