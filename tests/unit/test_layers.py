"""distdl's imports go one way, down the layers (imports inside functions count too):

    command line -> cluster launch -> driver, runners -> worker loop -> engine, workloads, studies, sweeps
    -> data, models -> config, registry, errors, run directory

and no module imports itself back through another. The graph is read from the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distdl"

# Top (0) to bottom (6); a module not listed takes its package's layer.
LAYERS = {
    "distdl.cli": 0,
    "distdl.cluster": 1,
    "distdl.driver": 2, "distdl.tuning": 2, "distdl.studies.runner": 2, "distdl.sweeps.runner": 2, "distdl.report": 2, "distdl.preparation": 2,
    "distdl.loop": 3, "distdl.studies.jobs": 3,
    "distdl.engine": 4, "distdl.workloads": 4, "distdl.studies": 4, "distdl.sweeps": 4, "distdl.tracking": 4, "distdl.optim": 4,
    "distdl.metrics": 4, "distdl.noise_scale": 4, "distdl.flops": 4, "distdl.profiling": 4, "distdl.planning": 4,
    "distdl.data": 5, "distdl.models": 5,
    "distdl.config": 6, "distdl.registry": 6, "distdl.errors": 6, "distdl.rundir": 6, "distdl.collectives": 6,
    "distdl": 6,
}


def modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imports(name: str, file: Path, known: set[str]) -> set[str]:
    """The distdl modules `name` imports anywhere in its source. `from package import submodule`
    counts as importing the submodule."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules or {base}
    return (found & known) - {name}


def layer(name: str) -> int:
    while name not in LAYERS:
        name = name.rpartition(".")[0]
    return LAYERS[name]


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, file, set(found)) for name, file in found.items()}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted(f"{name} (layer {layer(name)}) imports {other} (layer {layer(other)})"
                    for name, targets in graph().items() for other in targets if layer(other) < layer(name))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(edges[name]):
            if state.get(other) == 1:
                cycles.append(" -> ".join(path[path.index(other):] + [other]))
            elif other not in state:
                visit(other, path + [other])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
