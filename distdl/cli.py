"""`distdl` command line: train, prepare, study, sweep, plan, export and report. Knobs live in config files, not flags."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from distdl.config import config_from_dict, load_config
from distdl.errors import USER_ERRORS, ConfigError, RunDirError, TrainingFailed
from distdl.registry import STUDIES
from distdl.rundir import Outcome, RunStorage, run_outcome

# Exit status of `distdl train` that checkpointed and stopped on SIGUSR1 or SIGTERM: "resume me" (slurm/ray_cluster.sbatch
# requeues on it).
STOPPED_ON_REQUEST = 3


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="distdl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume) a run from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_steps=200")
    train.add_argument("--overwrite", action="store_true",
                       help="if the run directory holds a different config, move it aside and start afresh")

    study = commands.add_parser("study", help="run a study (several training runs, measured and reported)")
    study.add_argument("name", help=f"one of: {', '.join(STUDIES.names())}")
    study.add_argument("config", help="YAML study file: a training config plus a study: section")
    study.add_argument("overrides", nargs="*", help="dotted.key=value overrides; study.* go to the study's section")
    study.add_argument("--overwrite", action="store_true",
                       help="if the study directory holds other settings, move it aside and start afresh")

    sweep = commands.add_parser("sweep", help="a hyperparameter search on Ray Tune: trials side by side, ASHA stops "
                                              "the worst mid-run")
    sweep.add_argument("config", help="YAML training config, with a sweep: section or with --sweep")
    sweep.add_argument("overrides", nargs="*", help="dotted.key=value overrides; sweep.* go to the sweep's section")
    sweep.add_argument("--sweep", metavar="FILE", help="a YAML file holding the sweep: section (e.g. configs/glue/search.yaml)")
    sweep.add_argument("--overwrite", action="store_true",
                       help="if the sweep directory holds other settings, move it aside and start afresh")

    prepare = commands.add_parser("prepare", help="tokenize a training config's corpus into shards across the "
                                  "Ray cluster, at data.prepared_path, for training to read")
    prepare.add_argument("config", help="YAML config file (the one training will use)")
    prepare.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. data.prepared_path=/shared/x")

    export = commands.add_parser("export", help="consolidated fp32 weights in HF format from a run's latest checkpoint")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--checkpoint", default="latest",
                        help="latest (default), best (by the workload's metric, e.g. a GLUE task's), or a checkpoint_* name")

    report = commands.add_parser("report", help="summarize finished runs as a markdown table")
    report.add_argument("kind", choices=["glue"], help="glue: the GLUE table (task by metric, with the BERT paper's average)")
    report.add_argument("run_dirs", nargs="+", help="run directories (several per task: the best on dev is shown)")

    add_submit_commands(commands)
    add_plan_command(commands)

    args, extra = parser.parse_known_args(argv)
    if args.command in ("submit", "sweep", "plan"):
        # Overrides may follow the flags (key=value after --nodes 2 or --sweep FILE), as users type them.
        args.overrides += [item for item in extra if "=" in item and not item.startswith("-")]
        extra = [item for item in extra if item not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "submit":
            return run_submit(args)
        if args.command == "train":
            return run_train(args.config, args.overrides, args.overwrite)
        if args.command == "prepare":
            return run_prepare(args.config, args.overrides)
        if args.command == "study":
            return run_study(args.name, args.config, args.overrides, args.overwrite)
        if args.command == "sweep":
            return run_sweep(args.config, args.overrides, args.sweep, args.overwrite)
        if args.command == "plan":
            return run_plan(args)
        if args.command == "report":
            return run_report(args.kind, [Path(d) for d in args.run_dirs])
        return run_export(args.run_dir, Path(args.out_dir), args.checkpoint)
    except USER_ERRORS as err:
        print(f"distdl: error: {err}", file=sys.stderr)
        return 2


def add_plan_command(commands: Any) -> None:
    plan = commands.add_parser("plan", help="predict throughput, time to a target loss and GPU-hours against the GPU "
                               "count, from a short run, a cluster file and a scaling study (docs/plan.md)")
    plan.add_argument("config", help="YAML training config to plan (or a study file: its training config)")
    plan.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for distdl train")
    plan.add_argument("--cluster", required=True, metavar="FILE", help="cluster file (clusters/*.yaml)")
    compute = plan.add_mutually_exclusive_group(required=True)
    compute.add_argument("--profile", metavar="RUN_DIR",
                         help="a short run of the config on the cluster's GPU type (one worker is best)")
    compute.add_argument("--mfu", type=float, help="without a profile: the model FLOP utilization to assume (e.g. "
                         "0.4); the config's model FLOPs are counted on a synthetic sample")
    plan.add_argument("--scaling", metavar="STUDY_DIR", help="a finished `distdl study scaling` of the config")
    plan.add_argument("--batch", choices=["global", "per_gpu"], default="global",
                      help="global: the config's global batch at every GPU count (accumulating what a GPU's share "
                      "needs); per_gpu: each GPU's share of it stays, the global batch grows with the GPUs")
    plan.add_argument("--gpus", help="comma-separated GPU counts (default: 1, 2, 4, ... in a node, then whole nodes "
                      "doubling, up to the cluster or 4096)")
    plan.add_argument("--overlap", type=float,
                      help="the share of the gradient synchronization hidden behind the backward pass (default: "
                      "measured by the profile's trace, trainer.profile_steps, where it has one; else 0)")
    plan.add_argument("--tolerance", type=float, default=0.10,
                      help="the knee: the most GPUs whose GPU-hours stay within this share of the least (0.10)")
    plan.add_argument("--out", metavar="DIR", help="where plan.json, plan.md and plan.png go "
                      "(default: plans/<run.name>-<cluster name>)")


def add_submit_commands(commands: Any) -> None:
    submit = commands.add_parser("submit", help="run training or a study on a Slurm allocation or a Ray cluster")
    targets = submit.add_subparsers(dest="target", required=True)
    slurm = targets.add_parser("slurm", help="sbatch a job that starts Ray across its nodes and runs distdl on it")
    ray = targets.add_parser("ray", help="submit to a running Ray cluster through the Ray Jobs API")
    for target in (slurm, ray):
        target.add_argument("config", help="YAML config (a study file with --study)")
        target.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for distdl train")
        target.add_argument("--study", metavar="NAME", help=f"run this study ({', '.join(STUDIES.names())}) instead "
                            "of training")
        target.add_argument("--prepare", action="store_true", help="run distdl prepare (the config's data into "
                            "data.prepared_path, across the job's nodes) instead of training")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="0 for CPU workers")
    slurm.add_argument("--cpus-per-task", type=int, required=True, help="CPUs per node (one task per node runs Ray)")
    slurm.add_argument("--time", required=True, help="Slurm time limit, e.g. 2:00:00 or 1-00:00:00")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--workers-per-node", type=int, help="CPU jobs: Ray Train workers per node (default 1)")
    slurm.add_argument("--signal-seconds", type=int, default=120,
                       help="warning before the time limit, when the run checkpoints and requeues (default 120)")
    slurm.add_argument("--ray-port-base", type=int,
                       help="first of the job's Ray ports (default: from the job id, so jobs sharing nodes differ)")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    ray.add_argument("--address", required=True, help="the cluster's Ray Jobs API (dashboard), http://HEAD:8265")
    ray.add_argument("--working-dir", help="folder whose files are shipped to the cluster as the job's working "
                     "directory; the config must be inside it (default: the config's git work tree). Its git-ignored "
                     "files, credential files and a home directory are never shipped")
    ray.add_argument("--python", default="python", help="the cluster's Python with distdl installed (default: python)")
    ray.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its outcome")


def run_submit(args: argparse.Namespace) -> int:
    from distdl.cluster import submit

    if args.prepare and args.study:
        raise ConfigError("--prepare and --study: a job either prepares data or runs a study; submit them apart")
    if args.target == "ray":
        plan = submit.plan_job(args.config, args.overrides, args.study, prepare=args.prepare)
        working_dir = Path(args.working_dir) if args.working_dir else None
        return submit.submit_ray(plan, args.address, working_dir, args.python, args.follow)
    from distdl.cluster import slurm

    request = slurm.SlurmRequest(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                                 time=args.time, partition=args.partition, account=args.account, qos=args.qos,
                                 workers_per_node=args.workers_per_node, signal_seconds=args.signal_seconds,
                                 ray_port_base=args.ray_port_base)
    slurm.check_request(request)
    # The run directory is checked with the scaling the request implies, as the job will run it
    # (so the same command submitted again resumes).
    unscaled = submit.plan_job(args.config, args.overrides, args.study, check_dir=False, prepare=args.prepare)
    # A preparation's tasks take whatever CPUs the job's Ray cluster has: no training scaling to derive.
    derived = [] if args.prepare else slurm.scaling_overrides(request, args.overrides, unscaled.scaling)
    if derived:
        print(f"distdl: from the Slurm request: {' '.join(derived)}", file=sys.stderr)
    plan = unscaled if args.prepare else submit.plan_job(args.config, [*args.overrides, *derived], args.study)
    slurm.submit(request, plan, args.dry_run,
                 workers_follow_nodes=any(key.startswith("scaling.num_workers=") for key in derived))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from distdl.planning.cluster import read_cluster
    from distdl.planning.estimate import estimate_compute
    from distdl.planning.inputs import is_study_file, planned_config, read_profile, read_scaling
    from distdl.planning.plan import PlanRequest, check_gpu_counts, make_plan, write_plan

    if args.overlap is not None and not 0 <= args.overlap <= 1:
        raise ConfigError(f"--overlap {args.overlap}: a share of the synchronization, from 0 to 1")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: a share of the GPU's peak FLOP/s, above 0 and at most 1")
    if not 0 <= args.tolerance:
        raise ConfigError(f"--tolerance {args.tolerance}: a share of the least GPU-hours, 0 or more")
    config = planned_config(args.config, args.overrides)
    cluster = read_cluster(args.cluster)
    gpus = parse_gpu_counts(args.gpus) if args.gpus else None
    if gpus:
        check_gpu_counts(gpus, cluster, args.cluster)
    if args.profile:
        compute = read_profile(args.profile, config)
    else:
        print(f"distdl: counting the model FLOPs of one {config.workload} sample on this CPU ...", flush=True)
        compute = estimate_compute(config, args.mfu, cluster.peak(config.engine.precision, config.engine.tf32))
    scaling = read_scaling(args.scaling, config) if args.scaling else None
    out_dir = Path(args.out) if args.out else Path("plans") / f"{config.run.name}-{cluster.name}"
    # A study file cannot be submitted for training: the submit line names its training config, written out.
    training_file = out_dir / "training.yaml" if is_study_file(args.config) else None
    request = PlanRequest(args.config, args.overrides, args.batch, gpus, args.overlap, args.tolerance,
                          str(training_file) if training_file else None)
    plan = make_plan(config, cluster, compute, scaling, request)
    written = write_plan(plan, out_dir, config, training_file)
    print(written["markdown"].read_text())
    print(f"distdl: plan written to {out_dir}: {', '.join(path.name for path in written.values())}")
    return 0


def parse_gpu_counts(text: str) -> list[int]:
    try:
        counts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {text}: comma-separated whole GPU counts, e.g. 1,8,64") from None
    if not counts:
        raise ConfigError("--gpus is empty: give comma-separated GPU counts, e.g. 1,8,64")
    return sorted(set(counts))


def run_train(config_path: str, overrides: list[str], overwrite: bool) -> int:
    import signal

    from distdl.cluster.connect import connect_ray
    from distdl.driver import train

    # Slurm's warning before or after training must not kill the driver (its default action);
    # during training the driver turns it, and SIGTERM, into a checkpoint (driver.stop_on_signal).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    config = load_config(config_path, overrides)
    try:
        summary = train(config, connect_ray, overwrite=overwrite)
    except TrainingFailed as failed:
        print_failure(failed)
        print(f"distdl: {last_good_checkpoint(config.run_storage)}", file=sys.stderr)
        return 1
    outcome = run_outcome(summary)
    if outcome is Outcome.NO_SUMMARY:
        print(f"distdl: the run ended without a summary; see {config.run_storage}", file=sys.stderr)
        return 1
    if outcome is Outcome.DIVERGED:
        print(f"distdl: error: the loss or gradient norm was not finite at step {summary['non_finite_step']}; "
              f"training stopped at step {summary['steps']} without saving. {last_good_checkpoint(config.run_storage)}. "
              "Lower the learning rate, raise warmup or gradient clipping, or use bf16 instead of fp16, "
              "in a new run (or --overwrite).", file=sys.stderr)
        return 1
    if outcome is Outcome.STOPPED:
        print(f"distdl: stopped on request at step {summary['stopped_on_request_step']} with a checkpoint; "
              f"run the same command to resume ({config.run_storage})")
        return STOPPED_ON_REQUEST
    final = summary.get("final", {})
    shown = ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float))
    print(f"distdl: step {summary['steps']}/{summary['max_steps']} done; {shown}")
    print(f"distdl: run directory {config.run_storage}")
    if "wandb_run_dir" in summary and "offline-run" in summary["wandb_run_dir"]:
        print(f"distdl: W&B ran offline; upload with: wandb sync {summary['wandb_run_dir']}")
    return 0


def run_prepare(config_path: str, overrides: list[str]) -> int:
    from distdl.cluster.connect import connect_ray
    from distdl.preparation import prepare

    config = load_config(config_path, overrides)
    manifest = prepare(config, connect_ray)
    counts, root = manifest["counts"], config.sections["data"].prepared_path
    what = (f"{counts['lines']:,} lines into {counts['examples']:,} examples ({counts['tokens']:,} tokens)"
            if "lines" in counts else f"{counts['examples']:,} images ({counts['bytes'] / 2**20:,.1f} MiB)")
    print(f"distdl: prepared {what} in {counts['shards']} shards from {len(manifest['nodes'])} node(s) at {root}")
    print(f"distdl: train from them with data.prepared_path={root}")
    return 0


def print_failure(failed: TrainingFailed) -> None:
    for line in failed.lines:
        print(f"distdl: error: {line}", file=sys.stderr)


def last_good_checkpoint(storage: RunStorage) -> str:
    """Which checkpoint a rerun of a failed run (a RunStorage) resumes from, in words."""
    from distdl.engine.checkpoints import checkpoint_step, latest_checkpoint

    # A run on object storage is read through a copy of its own: the working copy may be a live run's.
    storage = RunStorage(storage.uri, cache="read") if storage.remote else storage
    try:
        storage.pull()
        latest = latest_checkpoint(storage.local)
    except RunDirError as err:
        return f"which checkpoint a rerun resumes from is unknown: {err}"
    except USER_ERRORS:
        return f"no checkpoint was saved yet in {storage}; a rerun starts afresh"
    return (f"the last good checkpoint is {storage.location(latest.name)} (step {checkpoint_step(storage.local)}); "
            "the same command resumes from it")


def run_study(name: str, config_path: str, overrides: list[str], overwrite: bool) -> int:
    from distdl.cluster.connect import connect_ray
    from distdl.studies import runner

    try:
        study_dir, report = runner.run_study(name, config_path, overrides, overwrite, connect_ray)
    except TrainingFailed as failed:
        # Finished trials and measurements stay in the study directory; the same command goes on from them.
        print_failure(failed)
        return 1
    runner.print_summary(study_dir, report)
    return 0


def run_sweep(config_path: str, overrides: list[str], sweep_file: Optional[str], overwrite: bool) -> int:
    from distdl.cluster.connect import connect_ray
    from distdl.sweeps import runner

    try:
        sweep_dir, report = runner.run_sweep(config_path, overrides, sweep_file, overwrite, connect_ray)
    except TrainingFailed as failed:
        # Finished trials and their results stay in the sweep directory; the same command resumes the rest.
        print_failure(failed)
        return 1
    print(f"distdl: sweep written to {sweep_dir}: report.md, results.json"
          + "".join(f", {path.name}" for path in report.plots.values()))
    summary = report.results["summary"]
    if summary["best_trial"] is not None:
        print(f"distdl: best trial {summary['best_trial']} ({summary['metric']} = {summary['best']:.4g} at step "
              f"{summary['best_step']}); to export: {report.best_run or 'none has a recorded checkpoint'}")
    return 0


def run_export(location: str | Path, out_dir: Path, which: str = "latest") -> int:
    """`location`: a run directory, or its URI on object storage (its files and the checkpoint are
    pulled into the node's cache first)."""
    from distdl.engine.checkpoints import trained_state
    from distdl.registry import WORKLOADS

    trained = trained_state(location, which)
    config = config_from_dict(trained.config())
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export target {out_dir} exists and is not empty; choose a new folder")
    workload = WORKLOADS.get(config.workload)
    if not workload.has_export_format():
        raise ConfigError(f"workload {config.workload} defines no export format; its checkpoints stay in "
                          f"{trained.storage}")
    state_dict = trained.weights(workload.export_engine or "")
    # Written beside the target and renamed into place: a failed export leaves nothing behind.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        workload.export(config.sections, trained.run_dir, state_dict, staging)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"distdl: exported {trained.name} ({len(state_dict)} tensors, fp32) to {out_dir}")
    return 0


def run_report(kind: str, run_dirs: list[Path]) -> int:
    from distdl import glue_report

    print(glue_report.glue_table(run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
