"""One small generic registry: workloads (and later studies) register themselves by name."""

from __future__ import annotations

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
            from distdl.config import ConfigError

            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        _import_builtins()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _import_builtins() -> None:
    # Importing the package runs each workload's register() call.
    import distdl.workloads  # noqa: F401


WORKLOADS: Registry = Registry("workload")
