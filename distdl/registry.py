"""One small generic registry: workloads and studies register themselves by name."""

from __future__ import annotations

import os
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


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
        _import_builtins()
        if name not in self._entries:
            from distdl.errors import ConfigError

            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        _import_builtins()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


PLUGINS_ENV = "DISTDL_PLUGINS"
_loaded = False


def _import_builtins() -> None:
    """Import the modules whose import registers workloads: built-ins, then plugins.

    Plugins are modules named in the `distdl.plugins` entry-point group of an installed
    package, or listed (comma-separated) in $DISTDL_PLUGINS; both reach Ray workers too.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    from importlib.metadata import entry_points

    import distdl.studies.catalog  # noqa: F401
    import distdl.workloads  # noqa: F401

    for entry in entry_points(group="distdl.plugins"):
        entry.load()
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)


WORKLOADS: Registry = Registry("workload")
STUDIES: Registry = Registry("study")
