"""`distdl` command line: train, study, export and report. Knobs live in config files, not flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from distdl.config import config_from_dict, load_config
from distdl.errors import USER_ERRORS


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="distdl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume) a run from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_steps=200")
    train.add_argument("--overwrite", action="store_true",
                       help="if the run directory holds a different config, move it aside and start afresh")

    study = commands.add_parser("study", help="run a study (several training runs, measured and reported)")
    study.add_argument("name", help="sharpness, overparam or scaling")
    study.add_argument("config", help="YAML study file: a training config plus a study: section")
    study.add_argument("overrides", nargs="*", help="dotted.key=value overrides; study.* go to the study's section")
    study.add_argument("--overwrite", action="store_true",
                       help="if the study directory holds other settings, move it aside and start afresh")

    export = commands.add_parser("export", help="consolidated fp32 weights in HF format from a run's latest checkpoint")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--checkpoint", default="latest",
                        help="latest (default), best (by the workload's metric, e.g. a GLUE task's), or a checkpoint_* name")

    report = commands.add_parser("report", help="summarize finished runs as a markdown table")
    report.add_argument("kind", choices=["glue"], help="glue: the GLUE table (task by metric, with the BERT paper's average)")
    report.add_argument("run_dirs", nargs="+", help="run directories (several per task: the best on dev is shown)")

    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args.config, args.overrides, args.overwrite)
        if args.command == "study":
            return run_study(args.name, args.config, args.overrides, args.overwrite)
        if args.command == "report":
            return run_report(args.kind, [Path(d) for d in args.run_dirs])
        return run_export(Path(args.run_dir), Path(args.out_dir), args.checkpoint)
    except USER_ERRORS as err:
        print(f"distdl: error: {err}", file=sys.stderr)
        return 2


def run_train(config_path: str, overrides: list[str], overwrite: bool) -> int:
    from distdl.driver import train

    config = load_config(config_path, overrides)
    try:
        summary = train(config, overwrite=overwrite)
    except Exception as err:
        failures = getattr(err, "worker_failures", None)
        if not failures:
            raise
        # One line per failed rank instead of Ray's nested tracebacks (those stay in the Ray logs).
        for rank, failure in sorted(failures.items()):
            cause = failure.__cause__ or failure
            lines = str(cause).strip().splitlines() or [type(cause).__name__]
            print(f"distdl: error: worker {rank} failed: {lines[-1]}", file=sys.stderr)
        print(f"distdl: the last good checkpoint, if any, is kept in {config.run_dir}", file=sys.stderr)
        return 1
    if not summary:
        print(f"distdl: the run ended without a summary; see {config.run_dir}", file=sys.stderr)
        return 1
    final = summary.get("final", {})
    shown = ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float))
    print(f"distdl: step {summary['steps']}/{summary['max_steps']} done; {shown}")
    print(f"distdl: run directory {config.run_dir}")
    if "wandb_run_dir" in summary and "offline-run" in summary["wandb_run_dir"]:
        print(f"distdl: W&B ran offline; upload with: wandb sync {summary['wandb_run_dir']}")
    return 0


def run_study(name: str, config_path: str, overrides: list[str], overwrite: bool) -> int:
    from distdl.studies import runner

    study_dir, report = runner.run_study(name, config_path, overrides, overwrite)
    runner.print_summary(study_dir, report)
    return 0


def run_export(run_dir: Path, out_dir: Path, which: str = "latest") -> int:
    from distdl.driver import find_checkpoint, saved_config
    from distdl.engine import consolidated_state_dict
    from distdl.registry import WORKLOADS

    saved = saved_config(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export target {out_dir} exists and is not empty; choose a new folder")
    config = config_from_dict(saved)
    checkpoint = find_checkpoint(run_dir, which)
    workload = WORKLOADS.get(config.workload)
    state_dict = consolidated_state_dict(checkpoint / (workload.export_engine or ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    workload.export(config.sections, run_dir, state_dict, out_dir)
    print(f"distdl: exported {checkpoint.name} ({len(state_dict)} tensors, fp32) to {out_dir}")
    return 0


def run_report(kind: str, run_dirs: list[Path]) -> int:
    from distdl import report

    print(report.glue_table(run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
