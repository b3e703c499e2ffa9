"""distdl's imports go one way, down the layers of `LAYERS` (imports inside functions count too); the
units of one layer are peers and never import one another (one workload from another, one study from
another: the shared part moves down a layer instead); no module imports itself back through another;
and only `distdl.engine` imports deepspeed. The graph is read from the source with `ast`.

The README's layer table is this map, rendered: `python -m tests.unit.test_layers` prints it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.shared import REPO

PACKAGE = REPO / "distdl"
README = REPO / "README.md"

# Top to bottom: each layer's name and its units (a module, or a package with every module under it
# that no longer unit names). A unit may import its own modules and any unit of a lower layer.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("command line", ("distdl.cli",)),
    ("cluster launch", ("distdl.cluster",)),
    ("commands above training", ("distdl.planning", "distdl.sweeps", "distdl.studies.runner")),
    ("the studies", ("distdl.studies",)),
    ("each study", ("distdl.studies.sharpness", "distdl.studies.temperature", "distdl.studies.overparam",
                    "distdl.studies.scaling")),
    ("what studies share", ("distdl.studies.solutions",)),
    ("study foundations", ("distdl.studies.base", "distdl.studies.measures", "distdl.studies.plots",
                           "distdl.studies.jobs")),
    ("trials on Ray Tune", ("distdl.tuning",)),
    ("driver", ("distdl.driver", "distdl.preparation", "distdl.glue_report")),
    ("worker loop", ("distdl.loop",)),
    ("the workloads", ("distdl.workloads",)),
    ("each workload", ("distdl.workloads.bert_pretrain", "distdl.workloads.glue", "distdl.workloads.resnet",
                       "distdl.workloads.gan")),
    ("what workloads share", ("distdl.workloads.base", "distdl.workloads.warm_start",
                              "distdl.workloads.classifier_run", "distdl.workloads.frechet")),
    ("engine (DeepSpeed)", ("distdl.engine",)),
    ("training services", ("distdl.tracking", "distdl.flops", "distdl.profiling", "distdl.noise_scale",
                           "distdl.stop_requests")),
    ("optimizers, data, models", ("distdl.optim", "distdl.data", "distdl.models")),
    ("config", ("distdl.config",)),
    ("foundations", ("distdl.rundir", "distdl.registry", "distdl.figures", "distdl.seeds", "distdl.precision",
                     "distdl.collectives", "distdl.provenance")),
    ("errors", ("distdl.errors", "distdl")),
)
UNITS = {unit: depth for depth, (_, units) in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imported(file: Path, package: str, known: set[str] = frozenset()) -> set[str]:
    """The module names `file` imports, anywhere in its source (relative imports resolved against
    `package`). `from package import name` names the submodule `package.name` where it is one of
    `known`, else `package`."""
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
    return found


def imports(name: str, file: Path, known: set[str]) -> set[str]:
    """The distdl modules `name` imports."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    return (imported(file, package, known) & known) - {name}


def unit(name: str) -> str:
    """The unit a module belongs to: the longest unit name that is it or a package above it."""
    while name not in UNITS:
        assert "." in name, f"{name} is in no layer of LAYERS"
        name = name.rpartition(".")[0]
    return name


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, file, set(found)) for name, file in found.items()}


def test_every_unit_of_the_map_exists_and_every_module_has_a_layer():
    found = modules()
    assert not [name for name in UNITS if name not in found], "LAYERS names modules that do not exist"
    for name in found:
        unit(name)


def test_no_module_imports_from_a_layer_above_its_own_or_from_a_peer():
    wrong = []
    for name, targets in sorted(graph().items()):
        own = unit(name)
        for other in sorted(targets):
            theirs = unit(other)
            if UNITS[theirs] < UNITS[own]:
                wrong.append(f"{name} ({LAYERS[UNITS[own]][0]}) imports {other} from above ({LAYERS[UNITS[theirs]][0]})")
            elif UNITS[theirs] == UNITS[own] and theirs != own:
                wrong.append(f"{name} imports its peer {other} ({LAYERS[UNITS[own]][0]}): move what they share down")
    assert not wrong, "\n".join(wrong)


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


def test_only_the_engine_package_imports_deepspeed():
    importers = sorted(name for name, file in modules().items() if unit(name) != "distdl.engine"
                       and any(found.split(".")[0] == "deepspeed" for found in imported(file, name)))
    assert not importers, f"only distdl/engine/ may import deepspeed: {importers}"


def unit_path(unit_name: str) -> str:
    """Where a unit's code is, under distdl/: a module's file, a package's folder, or the package's
    __init__.py where its other modules are units of their own."""
    parts = unit_name.split(".")[1:]
    if not PACKAGE.joinpath(*parts).is_dir():
        return "/".join(parts) + ".py"
    split = any(other.startswith(unit_name + ".") for other in UNITS)
    return "/".join([*parts, "__init__.py"]) if split else "/".join(parts) + "/"


def rendered_layers() -> str:
    """The map as the README shows it: each layer's name and where its units are."""
    width = max(len(name) for name, _ in LAYERS) + 2
    return "\n".join(f"{name:<{width}}{', '.join(unit_path(u) for u in units)}" for name, units in LAYERS)


def test_the_readme_draws_the_layers_of_this_map():
    assert f"```\n{rendered_layers()}\n```" in README.read_text(), \
        f"README.md's layer table differs from LAYERS; it should read:\n{rendered_layers()}"


if __name__ == "__main__":
    print(rendered_layers())
