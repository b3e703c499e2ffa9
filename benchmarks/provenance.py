"""How to make a results file again: every benchmark writes its results through `write_results`.

Each file under benchmarks/results/ carries a `provenance` object: the command that wrote it (paths
relative to the repository), the commit and any uncommitted changes to tracked files, the date, the
machine (cores, CPU model, memory, GPUs) and the versions of Python, torch, DeepSpeed, Ray and
transformers. The file is written whole (a temporary file renamed into place), so an interrupted
benchmark leaves the previous record rather than half a new one, and no machine's own paths (a home,
a checkout, a temporary directory) go into it: tests/unit/test_results_files.py checks all of this
for every committed file.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from distdl.rundir import write_json

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "deepspeed", "ray", "transformers")
# System data a Debian/Ubuntu package installs at the same place on every machine (the licence corpus).
SHARED_SYSTEM_DATA = "/usr/share/"


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write `results` with its provenance to `path`, whole, refusing a path that only this machine has."""
    found = machine_paths(results)
    if found:
        raise ValueError(f"{path.name}: {', '.join(found)} hold absolute paths of this machine; record what "
                         "they name instead (a package, a file name, a path relative to the repository)")
    write_json(path, {**results, "provenance": provenance()})


def provenance() -> dict[str, Any]:
    return {"command": command(), **git_state(), "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "machine": machine(), "versions": versions()}


def command(argv: list[str] | None = None) -> str:
    """The command line as it would be typed at the repository's root."""
    argv = sys.argv if argv is None else argv
    return shlex.join(["python", *(relative_to_repo(argument) for argument in argv)])


def relative_to_repo(argument: str) -> str:
    """A path inside the repository, bare or as --flag=path, made relative to it; anything else as given."""
    flag, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
    path = Path(value)
    if path.is_absolute() and path.resolve().is_relative_to(REPO):
        value = str(path.resolve().relative_to(REPO))
    return f"{flag}{equals}{value}"


def git_state() -> dict[str, Any]:
    def git(*arguments: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True,
                              check=True).stdout.strip()

    changed = [name for name in git("diff", "--name-only", "HEAD").splitlines()
               if not name.startswith("benchmarks/results/")]
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": changed}


def machine() -> dict[str, Any]:
    import cpuinfo  # py-cpuinfo, a DeepSpeed dependency
    import torch

    gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "cpu": cpuinfo.get_cpu_info().get("brand_raw", platform.processor()),
            "memory_gib": round(memory_gib, 1), "gpus": gpus, "os": platform.platform(terse=True)}


def versions() -> dict[str, str | None]:
    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{package: installed(package) for package in PACKAGES}}


def machine_paths(value: Any, where: str = "results") -> list[str]:
    """Keys whose values are absolute paths outside shared system data, as `results.a.b[2]`."""
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in machine_paths(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in machine_paths(item, f"{where}[{index}]")]
    if isinstance(value, str) and value.startswith(("/", "~")) and not value.startswith(SHARED_SYSTEM_DATA):
        return [where]
    return []
