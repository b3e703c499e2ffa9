"""The docs cannot drift from the code: the configuration reference lists every key of every
section, with its default, and the README's two commands are the ones CI runs."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from distdl.config import FIXED_SECTIONS
from distdl.registry import WORKLOADS
from tests.helpers.shared import REPO

REFERENCE = REPO / "docs" / "configuration.md"


def documented_rows() -> dict[str, list[tuple[list[str], str]]]:
    """The reference table's rows by group ("" for the sections every workload has; then each
    workload's name): each row's keys (`section.key`, or a bare key continuing the row's section)
    and its default column."""
    groups: dict[str, list[tuple[list[str], str]]] = {"": []}
    group = ""
    for line in REFERENCE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= {"-", " "}:
            continue
        if bold := re.fullmatch(r"\*\*(\w+)\*\*", cells[0]):
            group = bold.group(1)
            groups[group] = []
            continue
        names = re.findall(r"`([\w.]+)`", cells[0])
        if not names or names == ["workload"]:  # the top-level key, not a section's
            continue
        section = names[0].split(".")[0] if "." in names[0] else ""
        keys = [name if "." in name else f"{section}.{name}" for name in names]
        groups[group].append((keys, cells[1]))
    return groups


def shown(value) -> str:
    """A default as the reference writes it (YAML)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def fields(sections: dict[str, type]) -> dict[str, object]:
    out = {}
    for name, cls in sections.items():
        for field in dataclasses.fields(cls):
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            out[f"{name}.{field.name}"] = default
    return out


BUILT_IN = [name for name in WORKLOADS.names() if WORKLOADS.get(name).__module__.startswith("distdl.")]


@pytest.mark.parametrize("group", ["", *BUILT_IN])
def test_the_configuration_reference_lists_every_key_with_its_default(group):
    rows = documented_rows()
    assert group in rows, f"docs/configuration.md has no **{group}** part"
    expected = fields(FIXED_SECTIONS if not group else WORKLOADS.get(group).sections)
    documented = {key: default for keys, default in rows[group] for key in keys}
    # A workload's part may point to another's for shared sections (the GAN's data.* are the resnet's).
    borrowed = {key for key in expected if group and key not in documented
                and any(key in dict.fromkeys(k for keys, _ in rows[other] for k in keys) for other in rows if other)}
    missing = sorted(set(expected) - set(documented) - borrowed)
    assert not missing, f"docs/configuration.md does not list {missing}"
    unknown = sorted(set(documented) - set(expected))
    assert not unknown, f"docs/configuration.md lists keys that do not exist: {unknown}"
    for keys, default in rows[group]:
        if len(keys) == 1:
            written, value = default.replace("`", ""), expected[keys[0]]
            matches = (value is None and written == "(required)") or yaml.safe_load(written) == value
            assert matches, f"{keys[0]}: docs say {written!r}, the code's default is {shown(value)!r}"


def test_the_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert f"```bash\n{command}\n```" in readme
