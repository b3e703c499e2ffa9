"""`distdl submit slurm`: render slurm/ray_cluster.sbatch for a run and hand it to sbatch.

The Slurm request (nodes, GPUs, CPUs per node) and the run's scaling config must agree; unless the
command line sets them, the scaling keys follow from the request. Every value that reaches the
script is shell-quoted, and Slurm names are checked against the characters Slurm allows.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distdl.cluster.submit import JobPlan
from distdl.errors import ClusterError, ConfigError
from distdl.rundir import SLURM_LOGS

TEMPLATE = "ray_cluster.sbatch"

SLURM_NAME = re.compile(r"[A-Za-z0-9_.,+:@-]+")
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
TIME_FORMS = (
    (re.compile(r"(\d+)"), ("minutes",)),
    (re.compile(r"(\d+):(\d+)"), ("minutes", "seconds")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("hours", "minutes", "seconds")),
    (re.compile(r"(\d+)-(\d+)"), ("days", "hours")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("days", "hours", "minutes")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("days", "hours", "minutes", "seconds")),
)
SECONDS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


@dataclass(frozen=True)
class SlurmRequest:
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    time: str
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # CPU jobs only (GPU jobs run one worker per GPU).
    workers_per_node: Optional[int] = None
    # Slurm's warning before the time limit: the run checkpoints and requeues on it.
    signal_seconds: int = 120
    ray_port_base: Optional[int] = None

    @property
    def slots_per_node(self) -> int:
        return self.gpus_per_node or self.workers_per_node or 1


def time_limit_seconds(text: str) -> int:
    for pattern, units in TIME_FORMS:
        match = pattern.fullmatch(text)
        if match:
            return sum(int(value) * SECONDS[unit] for value, unit in zip(match.groups(), units))
    raise ConfigError(f"--time {text!r} is not a Slurm time; allowed forms: minutes, MM:SS, HH:MM:SS, "
                      "D-HH, D-HH:MM, D-HH:MM:SS")


def check_request(request: SlurmRequest) -> None:
    """Refuse what Slurm or the job could not honour, naming the flag and what is allowed."""
    for flag, value, least in (("--nodes", request.nodes, 1), ("--gpus-per-node", request.gpus_per_node, 0),
                               ("--cpus-per-task", request.cpus_per_task, 1),
                               ("--signal-seconds", request.signal_seconds, 1)):
        if value < least:
            raise ConfigError(f"{flag}={value} must be at least {least}")
    if request.workers_per_node is not None:
        if request.gpus_per_node:
            raise ConfigError("--workers-per-node is for CPU jobs; a GPU job runs one worker per GPU "
                              f"(--gpus-per-node={request.gpus_per_node})")
        if request.workers_per_node < 1:
            raise ConfigError(f"--workers-per-node={request.workers_per_node} must be at least 1")
    for flag, value in (("--partition", request.partition), ("--account", request.account), ("--qos", request.qos)):
        if value is not None and not SLURM_NAME.fullmatch(value):
            raise ConfigError(f"{flag} {value!r} has characters Slurm names do not use; "
                              "allowed: letters, digits and _ . , + : @ -")
    limit = time_limit_seconds(request.time)
    if limit <= request.signal_seconds:
        raise ConfigError(f"--time {request.time} ({limit} s) leaves no time before the checkpoint warning "
                          f"(--signal-seconds={request.signal_seconds}); ask for more time or an earlier warning")
    if request.ray_port_base is not None and not 1024 <= request.ray_port_base <= 65535 - 100 * request.nodes:
        raise ConfigError(f"--ray-port-base={request.ray_port_base} must lie in 1024..{65535 - 100 * request.nodes} "
                          "(each node may use a block of 100 ports)")


def scaling_overrides(request: SlurmRequest, overrides: list[str], scaling: Any) -> list[str]:
    """The scaling keys the request implies, for those the command line leaves unset.

    Keys the command line sets are checked against the request instead. `scaling` is the
    config's scaling section after the command line's overrides.
    """
    given = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    capacity = request.nodes * request.slots_per_node
    derived: dict[str, Any] = {}
    if "scaling.use_gpu" not in given:
        derived["scaling.use_gpu"] = bool(request.gpus_per_node)
    elif scaling.use_gpu != bool(request.gpus_per_node):
        raise ConfigError(f"scaling.use_gpu={str(scaling.use_gpu).lower()} but --gpus-per-node={request.gpus_per_node}; "
                          "GPU workers need GPUs per node, CPU workers --gpus-per-node=0")
    workers = scaling.num_workers if "scaling.num_workers" in given else capacity
    if workers > capacity:
        raise ConfigError(f"scaling.num_workers={workers} does not fit {request.nodes} node(s) x "
                          f"{request.slots_per_node} worker(s) per node; ask for more nodes or fewer workers")
    if "scaling.num_workers" not in given:
        derived["scaling.num_workers"] = capacity
    cpus_needed = request.slots_per_node * scaling.cpus_per_worker
    if cpus_needed > request.cpus_per_task:
        raise ConfigError(f"{request.slots_per_node} worker(s) per node x scaling.cpus_per_worker="
                          f"{scaling.cpus_per_worker} need {cpus_needed} CPUs per node, but --cpus-per-task="
                          f"{request.cpus_per_task}")
    if "scaling.placement_strategy" not in given and request.slots_per_node == 1 and request.nodes > 1:
        derived["scaling.placement_strategy"] = "STRICT_SPREAD"  # one worker on each node
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in derived.items()]


def directives(request: SlurmRequest, job_name: str) -> list[str]:
    lines = [f"--job-name={job_name}", f"--nodes={request.nodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={request.cpus_per_task}", f"--time={request.time}",
             # The warning goes to the batch shell only (B:), which asks the driver for a checkpoint.
             f"--signal=B:USR1@{request.signal_seconds}", "--requeue", "--open-mode=append"]
    if request.gpus_per_node:
        lines.append(f"--gpus-per-node={request.gpus_per_node}")
    lines += [f"--{flag}={value}" for flag, value in
              (("partition", request.partition), ("account", request.account), ("qos", request.qos)) if value]
    return [f"#SBATCH {line}" for line in lines]


def job_name(run_name: str) -> str:
    return "distdl-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", run_name) or "run")


def template_path() -> Path:
    """slurm/ray_cluster.sbatch in a checkout, or where a wheel install puts it."""
    for folder in (Path(__file__).resolve().parents[2] / "slurm", Path(sys.prefix) / "share" / "distdl" / "slurm"):
        if (folder / TEMPLATE).is_file():
            return folder / TEMPLATE
    raise FileNotFoundError(f"cannot find the sbatch template {TEMPLATE} (slurm/ in distdl's checkout)")


def render_script(request: SlurmRequest, plan: JobPlan, workers_follow_nodes: bool = False,
                  python: str = sys.executable) -> str:
    """The job script; with `workers_follow_nodes` (scaling.num_workers left to the request) the job
    derives the worker count from the nodes it is given, so a requeue onto fewer nodes still runs."""
    settings = {
        "DISTDL_PYTHON": python,
        "DISTDL_RUN_DIR": str(plan.run_dir),
        "DISTDL_GPUS_PER_NODE": str(request.gpus_per_node),
        "DISTDL_ON_SIGNAL": plan.on_signal,
        "DISTDL_RAY_PORT_BASE": "" if request.ray_port_base is None else str(request.ray_port_base),
        "DISTDL_WORKERS_PER_NODE": str(request.slots_per_node) if workers_follow_nodes else "",
        "DISTDL_SIGNAL_SECONDS": str(request.signal_seconds),
    }
    header = ["#!/bin/bash", *directives(request, job_name(plan.run_name)), "",
              "# Set by distdl submit slurm.",
              *(f"{key}={shlex.quote(value)}" for key, value in settings.items()),
              f"DISTDL_ARGS=({' '.join(shlex.quote(arg) for arg in plan.args)})", ""]
    return "\n".join(header) + "\n" + template_path().read_text()


def sbatch_arguments(run_dir: Path) -> list[str]:
    """Paths go on sbatch's command line, where no shell or #SBATCH parsing touches them."""
    log_pattern = str(run_dir / SLURM_LOGS).replace("%", "%%") + "/slurm-%j.out"  # % starts Slurm's patterns
    return ["--parsable", f"--chdir={Path.cwd()}", f"--output={log_pattern}"]


def submit(request: SlurmRequest, plan: JobPlan, dry_run: bool, workers_follow_nodes: bool = False) -> Optional[str]:
    """Print (dry run) or submit the job; the job id, or None for a dry run."""
    check_request(request)
    script_text = render_script(request, plan, workers_follow_nodes)
    if dry_run:
        print(script_text)
        print(f"# submit with: {shlex.join(['sbatch', *sbatch_arguments(plan.run_dir), 'SCRIPT'])}")
        return None
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ClusterError("sbatch is not on PATH: run distdl submit slurm on a Slurm login node "
                          "(--dry-run prints the script without Slurm)")
    logs = plan.run_dir / SLURM_LOGS
    logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    script = logs / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script.write_text(script_text)
    done = subprocess.run([sbatch, *sbatch_arguments(plan.run_dir), str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"sbatch refused the job (exit {done.returncode}): {done.stderr.strip()}\n"
                          f"the script is kept in {script}")
    job_id = done.stdout.strip().split(";")[0]
    job_log = logs / f"slurm-{job_id}.out"
    print(f"distdl: submitted Slurm job {job_id} ({request.nodes} node(s)); script {script}")
    print(f"distdl: job log {job_log}; Ray node logs in {logs / f'job-{job_id}'}/")
    print(f"distdl: follow with: tail -f {shlex.quote(str(job_log))}; cancel with: scancel {job_id}")
    return job_id
