"""Every committed results file is a record someone else can reproduce: written by its script through
benchmarks/provenance.py, holding only keys that script writes, and no path of the machine it ran on."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers.benchmark_scripts import BENCHMARKS, load_benchmark
from tests.helpers.shared import REPO

STUDIES = BENCHMARKS / "results/studies"
# A kept study's record (benchmarks/studies.py) stands beside the folder holding what the study wrote.
STUDY_RECORDS = sorted(STUDIES.glob("*.json"))
RESULTS = sorted((BENCHMARKS / "results").glob("*.json")) + STUDY_RECORDS
COMMAND = re.compile(r"^python benchmarks/(?P<script>\w+)\.py( |$)")
# Changes that cannot alter what a benchmark measures; anything else uncommitted makes a record unrepeatable.
HARMLESS = re.compile(r"^(tests|docs)/|\.(md|png)$")
RECORD_KEYS = {"command", "commit", "uncommitted_changes", "date", "machine", "versions"}


def script_literals(script: Path, seen: frozenset[Path] = frozenset()) -> set[str]:
    """The string constants in a script and in the sibling benchmark modules it imports."""
    tree = ast.parse(script.read_text())
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            for name in names:
                sibling = BENCHMARKS / f"{name}.py"
                if name and sibling.exists() and sibling not in seen | {script}:
                    literals |= script_literals(sibling, seen | {script})
    return literals


def unrepeatable(changes: list[str], script: Path) -> list[str]:
    """Changed paths that could alter the script's results: code, configs, or a results file it reads."""
    source = script.read_text()
    return [name for name in changes if not HARMLESS.search(name)
            and not (name.startswith("benchmarks/results/") and Path(name).name not in source)]


@pytest.fixture(scope="module")
def provenance_module():
    with pytest.MonkeyPatch.context() as patch:
        yield load_benchmark("provenance", patch)


def test_results_files_exist():
    assert len(RESULTS) - len(STUDY_RECORDS) >= 18, [path.name for path in RESULTS]


@pytest.mark.parametrize("path", RESULTS, ids=[str(path.relative_to(BENCHMARKS / "results")) for path in RESULTS])
def test_each_results_file_says_how_to_make_it_again(path, provenance_module):
    record = json.loads(path.read_text())
    provenance = record.get("provenance")
    assert provenance, f"{path.name} was not written through benchmarks/provenance.py: rerun its script"
    # code_changed_during_run came a few hours after the first records of 2026-12-07; absent means not checked.
    assert RECORD_KEYS <= set(provenance) <= RECORD_KEYS | {"code_changed_during_run"}
    assert set(provenance["machine"]) == {"cores", "cpu", "memory_gib", "gpus", "os"}
    assert {"torch", "deepspeed", "ray", "transformers", "python"} <= set(provenance["versions"])
    assert all(provenance["versions"].values()), provenance["versions"]

    command = COMMAND.match(provenance["command"])
    assert command, f"{path.name}: {provenance['command']!r} is not a benchmark script's command line"
    script = BENCHMARKS / f"{command['script']}.py"
    assert "write_results(" in script.read_text(), f"{script.name} does not write through provenance.py"

    for key in ("uncommitted_changes", "code_changed_during_run"):
        changed = unrepeatable(provenance.get(key, []), script)
        assert not changed, f"{path.name}: {key} holds {changed}, which can change what it measured"
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"])
    if not shallow():  # a shallow clone lacks the commit
        ancestor = git("merge-base", "--is-ancestor", provenance["commit"], "HEAD")
        assert ancestor.returncode == 0, f"{path.name}: commit {provenance['commit']} is not in this history"

    unwritten = set(record) - {"provenance"} - script_literals(script)
    assert not unwritten, f"{path.name} holds keys {sorted(unwritten)} that {script.name} never writes (a hand edit?)"
    assert provenance_module.machine_paths(record) == [], f"{path.name} holds paths of the machine it ran on"


def test_every_study_the_docs_quote_is_kept_with_its_record(monkeypatch):
    studies = load_benchmark("studies", monkeypatch)
    assert sorted(path.stem for path in STUDY_RECORDS) == sorted(studies.STUDIES)
    assert sorted(path.name for path in STUDIES.iterdir()) == sorted(
        name for study in studies.STUDIES for name in (study, f"{study}.json")), "only the kept studies and their records"


@pytest.mark.parametrize("path", STUDY_RECORDS, ids=[path.stem for path in STUDY_RECORDS])
def test_a_kept_study_is_what_its_command_makes_today(path):
    """Its settings are those its config and overrides give now, and its results were made by the
    code of the commit its record names (or one that differs from it in nothing that runs)."""
    from distdl.studies.base import RESULTS_FILE, STUDY_FILE
    from distdl.studies.runner import read_study, saved_settings

    record = json.loads(path.read_text())
    folder = path.with_suffix("")
    assert sorted(entry.name for entry in folder.iterdir()) == sorted(record["files"])
    _, section, base = read_study(record["study"], REPO / record["config"], record["overrides"])
    expected = saved_settings(record["study"], section, base)
    expected["training"]["run"]["storage_path"] = yaml.safe_load((REPO / record["config"]).read_text())["run"]["storage_path"]
    assert yaml.safe_load((folder / STUDY_FILE).read_text()) == json.loads(json.dumps(expected))

    made_by = json.loads((folder / RESULTS_FILE).read_text())["provenance"]["software"]["distdl"]
    assert made_by["uncommitted_changes"] is False, f"{folder.name} ran on uncommitted code"
    if made_by["commit"] != record["provenance"]["commit"] and not shallow():
        between = git("diff", "--name-only", record["provenance"]["commit"], made_by["commit"]).stdout.split()
        changed = unrepeatable(between, BENCHMARKS / "studies.py")
        assert not changed, f"{folder.name}: {changed} changed while it ran"


def shallow() -> bool:
    return git("rev-parse", "--is-shallow-repository").stdout.strip() == "true"


def git(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True)


def test_a_record_is_written_whole_with_the_command_as_typed_at_the_root(tmp_path, monkeypatch):
    out = tmp_path / "result.json"
    monkeypatch.chdir(BENCHMARKS)  # typed from benchmarks/, recorded as typed at the root
    monkeypatch.setattr("sys.argv", ["scaling.py", "--out", "results/scaling_cpu.json", "--model",
                                     str(tmp_path / "bert"), "--corpus=/usr/share/common-licenses", "--repeats", "2"])
    provenance = load_benchmark("provenance", monkeypatch)
    provenance.write_results(out, {"samples_per_s": 1.5})
    record = json.loads(out.read_text())
    assert record["samples_per_s"] == 1.5
    assert record["provenance"]["command"] == (
        "python benchmarks/scaling.py --out benchmarks/results/scaling_cpu.json --model '<outside the repository>/bert' "
        "--corpus=/usr/share/common-licenses --repeats 2")
    assert record["provenance"]["commit"] == git("rev-parse", "HEAD").stdout.strip()
    assert record["provenance"]["code_changed_during_run"] == []
    assert record["provenance"]["machine"]["cores"] >= 1


def test_a_path_of_this_machine_is_refused_by_key_and_the_previous_record_kept(tmp_path, monkeypatch):
    provenance = load_benchmark("provenance", monkeypatch)
    out = tmp_path / "result.json"
    out.write_text('{"previous": true}\n')
    for results, culprit in [({"runs": [{"model": "bert"}, {"model": str(tmp_path / "random-init")}]}, r"results\.runs\[1\]\.model"),
                             ({"note": f"loaded from {Path.home()}/models"}, r"results\.note"),
                             ({str(tmp_path): 1.0}, "results key")]:
        with pytest.raises(ValueError, match=culprit + ".* hold paths of this machine"):
            provenance.write_results(out, {**results, "corpus": "/usr/share/common-licenses", "step": "~120 ms"})
    with pytest.raises(TypeError):
        provenance.write_results(out, {"unserializable": object()})
    assert out.read_text() == '{"previous": true}\n'
    assert [entry.name for entry in tmp_path.iterdir()] == ["result.json"], "no partial file left behind"


def test_every_figure_the_docs_quote_is_the_one_its_results_file_holds():
    from tests.helpers.doc_figures import missing, working_record

    stale = missing(working_record)
    assert not stale, "docs quote figures their results files do not hold (python -m tests.helpers.doc_figures " \
                      "HEAD updates them after a rerun):\n" + "\n".join(f"{doc} ({name}): {text}" for doc, name, text in stale)
