"""Loading a script under benchmarks/ as a module, as `python benchmarks/<name>.py` would see it."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.helpers.shared import REPO

BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str, monkeypatch) -> ModuleType:
    """The script `benchmarks/<name>.py`, with benchmarks/ on sys.path for its sibling imports (provenance)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
