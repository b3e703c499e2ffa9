"""One small generic registry: workloads and studies register themselves by name.

A leaf: it imports nothing of distdl. What fills it is loaded from one place, the `distdl.plugins`
entry-point group, which holds distdl's own packages (`distdl.workloads` and `distdl.studies`, whose
`__init__` modules import their built-ins, as timm's `models/__init__.py` does) and any installed
package's plugins; modules listed (comma-separated) in $DISTDL_PLUGINS load too. Both reach Ray
workers, which look names up the same way.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from distdl.errors import ConfigError

T = TypeVar("T")
PLUGINS_GROUP = "distdl.plugins"
PLUGINS_ENV = "DISTDL_PLUGINS"


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_loaded = False


def load_plugins() -> None:
    """Import every module that registers workloads or studies (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    entries = entry_points(group=PLUGINS_GROUP)
    if not any(entry.value.startswith("distdl.") for entry in entries):
        raise ConfigError("distdl's own workloads are registered by its installed package metadata, which is "
                          "missing: install distdl (pip install -e . in the checkout, or ./launch/install.sh)")
    for entry in entries:
        entry.load()
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)


WORKLOADS: Registry = Registry("workload")
STUDIES: Registry = Registry("study")
