"""How to make a results file again: every benchmark writes its results through `write_results`.

Each file under benchmarks/results/ carries a `provenance` object: the command that wrote it (paths
relative to the repository's root), the commit the run started from and the changes to it that
were not committed (tracked or untracked, all but the file being written), the date it started, the
machine (cores, CPU model, memory, GPUs) and the versions of Python, torch, DeepSpeed, Ray and
transformers. What git says is taken when the script imports this module, before it measures
anything; code that changed while it ran is named in `code_changed_during_run`. The file is
written whole (a temporary file renamed into place), so an interrupted benchmark leaves the previous
record rather than half a new one, and no machine's own paths (a home, a checkout, a temporary
directory, an environment) go into it. tests/unit/test_results_files.py checks the committed files.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from distdl.provenance import LIBRARIES, installed, machine
from distdl.rundir import write_json

REPO = Path(__file__).resolve().parents[1]
# System data a Debian/Ubuntu package installs at the same place on every machine (the licence corpus).
SHARED_SYSTEM_DATA = "/usr/share/"


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write `results` with its provenance to `path`, whole, refusing a path that only this machine has."""
    found = machine_paths(results)
    if found:
        raise ValueError(f"{path.name}: {', '.join(found)} hold paths of this machine; record what they name "
                         "instead (a package, a file name, a path relative to the repository)")
    write_json(path, {**results, "provenance": provenance(path)})


def provenance(path: Path) -> dict[str, Any]:
    written = str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else None
    now = git_state()
    return {"command": STARTED["command"], "commit": STARTED["commit"],
            "uncommitted_changes": [name for name in STARTED["changes"] if name != written],
            "code_changed_during_run": sorted(code_changes(STARTED, now) - {written}),
            "date": STARTED["date"], "machine": machine(), "versions": versions()}


def command(argv: list[str], cwd: Path) -> str:
    """The command line as it would be typed at the repository's root."""
    return shlex.join(["python", *(as_typed_at_root(argument, cwd) for argument in argv)])


def as_typed_at_root(argument: str, cwd: Path) -> str:
    """A path inside the repository (bare or as --flag=path) relative to its root; one outside it, and
    outside shared system data, only by its name (the machine's own layout is nobody else's)."""
    flag, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
    path = cwd / value
    if value.startswith("/") or (value and not value.startswith("-") and path.exists()):
        resolved = path.resolve()
        if resolved.is_relative_to(REPO):
            value = str(resolved.relative_to(REPO))
        elif not str(resolved).startswith(SHARED_SYSTEM_DATA):
            value = f"<outside the repository>/{resolved.name}"
    return f"{flag}{equals}{value}"


def git(*arguments: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True,
                          check=True).stdout


def git_state() -> dict[str, Any]:
    """HEAD and every path that differs from it, tracked or not (paths relative to the root)."""
    changes = [line[3:] for line in git("status", "--porcelain", "--untracked-files=all").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "changes": sorted(changes)}


def code_changes(started: dict[str, Any], now: dict[str, Any]) -> set[str]:
    """Paths whose content differs now from when the run started (a commit in between counts by its diff)."""
    moved = set(git("diff", "--name-only", started["commit"], now["commit"]).split()) \
        if started["commit"] != now["commit"] else set()
    return moved | (set(started["changes"]) ^ set(now["changes"]))


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), **{library: installed(library) for library in LIBRARIES}}


def machine_roots() -> list[str]:
    roots = {str(REPO), str(Path.home()), tempfile.gettempdir(), sys.prefix, os.path.realpath(sys.prefix)}
    return sorted(root for root in roots if root not in ("/", ""))


def machine_paths(value: Any, where: str = "results") -> list[str]:
    """Where, as `results.a.b[2]`, a key or value holds an absolute path outside shared system data or
    any of this machine's own roots (the checkout, the home, the temporary directory, the environment)."""
    if isinstance(value, dict):
        return [found for key, item in value.items()
                for found in machine_paths(key, f"{where} key {key!r}") + machine_paths(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in machine_paths(item, f"{where}[{index}]")]
    if isinstance(value, str):
        absolute = value.startswith(("/", "~/")) and not value.startswith(SHARED_SYSTEM_DATA)
        if absolute or any(root in value for root in machine_roots()):
            return [where]
    return []


# Taken at import, which every benchmark does before it measures anything.
STARTED = {**git_state(), "command": command(sys.argv, Path.cwd()),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
