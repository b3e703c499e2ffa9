"""The studies docs/studies.md quotes, run as shipped (or with the overrides named below) and kept.

    python benchmarks/studies.py                      # every study below, one after the other
    python benchmarks/studies.py sharpness-mnist5k    # one (names from STUDIES)
    python benchmarks/studies.py --work DIR ...       # keep the trials in DIR: rerunning resumes there

Each runs `distdl study KIND CONFIG OVERRIDES` with its study directory in a work folder, then copies
what the study wrote for readers (its settings, results, report and plots) to
benchmarks/results/studies/NAME/ and writes benchmarks/results/studies/NAME.json: the study command,
its wall time and the provenance of the run. The study's own results carry the software and machine
that made them (distdl.provenance); the trials themselves stay in the work folder.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from provenance import write_results

from distdl.studies.base import REPORT_FILE, RESULTS_FILE, STUDY_FILE

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks/results/studies"
# W&B would only slow the runs down; the plots and tables are kept here.
QUIET = ["tracking.wandb_mode=disabled"]
# Name (the study's study.name) -> (study, config, overrides).
STUDIES = {
    "sharpness-mnist5k": ("sharpness", "configs/studies/sharpness.yaml", []),
    "sharpness-variants-mnist5k": ("sharpness", "configs/studies/sharpness_variants.yaml", []),
    "sharpness-sam-rho-mnist5k": ("sharpness", "configs/studies/sharpness_variants.yaml",
                                  ["study.name=sharpness-sam-rho-mnist5k", "study.variants=[sam]",
                                   "study.sam_rho=0.2"]),
    # Keskar's protocol (Adam, equal epochs, batch 32 against 1,000) with the three arms: why the shipped
    # variants study trains SGD to equal loss instead.
    "sharpness-variants-adam-equal-epochs-mnist5k": (
        "sharpness", "configs/studies/sharpness.yaml",
        ["study.name=sharpness-variants-adam-equal-epochs-mnist5k", "study.protocols=[equal_epochs]",
         "study.variants=[sam,minibatch_noise,isotropic_noise]", "study.noise_temperature=matched",
         "study.subspace_dimension=0", "study.epsilons=[1.0e-3]"]),
    "temperature-mnist5k": ("temperature", "configs/studies/temperature.yaml", []),
    "temperature-mnist5k-equal-loss": ("temperature", "configs/studies/temperature.yaml",
                                       ["study.name=temperature-mnist5k-equal-loss", "study.protocol=equal_loss",
                                        "study.target_loss=0.1", "study.max_steps=2000"]),
    "overparam-digits": ("overparam", "configs/studies/overparam.yaml", []),
    "scaling-mnist5k": ("scaling", "configs/studies/scaling.yaml", []),
    "scaling-sgd-vs-lars": ("scaling", "configs/studies/scaling_lars.yaml", []),
}


def run(name: str, work: Path) -> None:
    kind, config, overrides = STUDIES[name]
    overrides = [*overrides, *QUIET]
    # Run from the work folder: the config's relative storage path puts the study there.
    command = [sys.executable, "-m", "distdl.cli", "study", kind, str(REPO / config), *overrides]
    print(f"{name}: distdl study {kind} {config} {' '.join(overrides)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=work, check=True)
    wall = time.perf_counter() - started
    storage = yaml.safe_load((REPO / config).read_text())["run"]["storage_path"]
    kept = keep(work / storage / name, OUT / name, storage)
    write_results(OUT / f"{name}.json", {
        "study": kind, "config": config, "overrides": overrides, "wall_minutes": round(wall / 60, 1),
        "files": kept})
    print(f"{name}: {wall / 60:.1f} minutes, written to {(OUT / name).relative_to(REPO)}", flush=True)


def keep(study_dir: Path, out: Path, storage: str) -> list[str]:
    """What a reader wants of a study directory, copied whole over the previous copy. The settings keep
    the config's storage path, not the absolute one the study resolved it to on this machine."""
    names = [STUDY_FILE, RESULTS_FILE, REPORT_FILE, *sorted(path.name for path in study_dir.glob("*.png"))]
    missing = [name for name in names[:3] if not (study_dir / name).is_file()]
    if missing:
        raise SystemExit(f"{study_dir.name}: the study wrote no {', '.join(missing)}")
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in names[1:]:
        shutil.copy2(study_dir / name, staging / name)
    settings = yaml.safe_load((study_dir / STUDY_FILE).read_text())
    settings["training"]["run"]["storage_path"] = storage
    (staging / STUDY_FILE).write_text(yaml.safe_dump(settings, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"studies to run (default: all): {', '.join(STUDIES)}")
    parser.add_argument("--work", type=Path, help="where the trials go (default: a temporary folder, removed)")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in STUDIES]
    if unknown:
        parser.error(f"no study {', '.join(unknown)}; the studies are {', '.join(STUDIES)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="distdl-studies-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(STUDIES):
        run(name, work.resolve())
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
