"""`distdl submit slurm|ray`: check a run locally, then send its command line to a cluster.

The config and overrides are validated here, before anything is queued, and the run directory is
checked as `distdl train` would; the job then runs the same `distdl train` (or `distdl study`, or
`distdl prepare`) command line, with the cluster's Ray address added.
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from distdl.cluster import upload
from distdl.cluster.connect import forwarded_env, use_cluster_token
from distdl.config import RunSection, load_config, parse_override, read_yaml
from distdl.driver import check_run_dir
from distdl.errors import ClusterError, ConfigError
from distdl.rundir import is_uri

# Job states the Ray Jobs API ends in.
FINISHED_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobPlan:
    """What a cluster job runs, and where its results land."""
    args: list[str]  # distdl's arguments: train CONFIG key=value ... (or study NAME CONFIG ..., prepare CONFIG ...)
    run_dir: Path
    run_name: str
    scaling: Any  # the scaling section after the overrides
    storage_path: str  # as written in the config or on the command line, before resolving
    # train checkpoints on Slurm's warning signal; a study's trials resume from their own checkpoints.
    on_signal: str


def plan_job(config_path: str, overrides: list[str], study: Optional[str], check_dir: bool = True,
             prepare: bool = False) -> JobPlan:
    """The job's command line and run directory; `check_dir` checks that directory as the job will.
    `prepare`: the job runs `distdl prepare`, and its logs go into data.prepared_path."""
    config_file = Path(config_path).resolve()
    if prepare:
        return plan_preparation(config_file, overrides)
    if study is None:
        config = load_config(config_file, overrides)
        if check_dir:
            check_run_dir(config, overwrite=False)
        return JobPlan(["train", str(config_file), *overrides], config.run_dir, config.run.name, config.scaling,
                       written_storage_path(config_file, overrides), "checkpoint")
    from distdl.studies.runner import locate_study

    study_dir, base = locate_study(study, config_file, overrides, check_dir)
    return JobPlan(["study", study, str(config_file), *overrides], study_dir, study_dir.name, base.scaling,
                   written_storage_path(config_file, overrides), "requeue")


def plan_preparation(config_file: Path, overrides: list[str]) -> JobPlan:
    """A `distdl prepare` job: checked as far as it can be here; a requeued job goes on from the
    shards already made."""
    config = load_config(config_file, overrides)
    data = config.sections.get("data")
    written = written_value(config_file, overrides, "data", "prepared_path", None)
    if getattr(data, "prepared_path", None) is None or written is None:
        raise ConfigError("--prepare needs data.prepared_path: the folder (shared by the cluster's nodes) to write "
                          "the shards to")
    return JobPlan(["prepare", str(config_file), *overrides], Path(data.prepared_path), f"{config.run.name}-prepare",
                   config.scaling, str(written), "requeue")


def written_storage_path(config_file: Path, overrides: list[str]) -> str:
    """run.storage_path as the user gave it (load_config resolves it against this machine's cwd)."""
    return str(written_value(config_file, overrides, "run", "storage_path", RunSection.storage_path))


def written_value(config_file: Path, overrides: list[str], section: str, key: str, default: Any) -> Any:
    """`section.key` as the user gave it, in the config file or the overrides (the last one wins, as
    in load_config), before any path is resolved."""
    for override in reversed(overrides):
        name, value = parse_override(override)
        if name == f"{section}.{key}":
            return value
    return (read_yaml(config_file).get(section) or {}).get(key, default)


def ray_entrypoint(plan: JobPlan, working_dir: Path, python: str) -> str:
    """The shell command the Ray job runs (Ray's job supervisor hands it to a shell): every word quoted."""
    args = [_relative_to(Path(arg), working_dir) if i == _config_index(plan) else arg for i, arg in enumerate(plan.args)]
    return shlex.join([python, "-m", "distdl.cli", *args, "ray.address=auto"])


def submit_ray(plan: JobPlan, address: str, working_dir: Optional[Path], python: str, follow: bool) -> int:
    """Submit to a running Ray cluster through the Ray Jobs API; the job's working directory is the
    project's files (distdl/cluster/upload.py), by default those of the config's git work tree."""
    if not Path(plan.storage_path).is_absolute() and not is_uri(plan.storage_path):
        key = "data.prepared_path" if plan.args[0] == "prepare" else "run.storage_path"
        raise ConfigError(f"{key}={plan.storage_path!r} is relative: on a Ray cluster the job runs in a "
                          "temporary copy of the working directory, and the run would be lost with it. "
                          "Give an absolute path that the cluster's nodes share, or an object-store URI (s3://...)")
    config_file = Path(plan.args[_config_index(plan)])
    working_dir = (working_dir or upload.project_root(config_file)).resolve()
    entrypoint = ray_entrypoint(plan, working_dir, python)
    files = upload.project_files(working_dir)
    if PurePosixPath(config_file.resolve().relative_to(working_dir).as_posix()) not in files:
        raise ConfigError(f"config {config_file} is not among the files the job receives from {working_dir} "
                          "(a .gitignore excludes it?)")
    upload.check_upload(working_dir, files)
    client = job_client(address)
    submission_id = f"distdl-{plan.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    stage = upload.staged_copy(working_dir, files)
    try:
        runtime_env = {"working_dir": str(stage), "env_vars": forwarded_env()}
        job_id = submit_when_ready(client, entrypoint, submission_id, runtime_env)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"distdl: submitted Ray job {job_id} to {address}: {entrypoint}")
    print(f"distdl: shipped {len(files)} files of {working_dir}")
    print(f"distdl: run directory {plan.run_dir}")
    print(f"distdl: follow with: ray job logs --address {address} --follow {job_id}; "
          f"stop with: ray job stop --address {address} {job_id}")
    if not follow:
        return 0
    return follow_job(client, job_id)


def submit_when_ready(client: Any, entrypoint: str, submission_id: str, runtime_env: dict[str, Any],
                      wait_s: float = 120.0) -> str:
    """Submit, waiting out a head that is up but whose job agent is not yet (Ray answers 500 "No
    available agent to submit job, please try again later" for a while after `ray start`)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            print("distdl: the cluster's job agent is not ready yet; retrying", flush=True)
            time.sleep(3)


def _config_index(plan: JobPlan) -> int:
    """Where the config file stands in the job's arguments (after the study's name for a study)."""
    return 2 if plan.args[0] == "study" else 1


def _relative_to(config: Path, working_dir: Path) -> str:
    try:
        return str(config.relative_to(working_dir))
    except ValueError:
        raise ConfigError(f"config {config} is outside the working directory {working_dir}, which is what the "
                          "cluster receives; move the config there or pass --working-dir") from None


def job_client(address: str) -> Any:
    """A Jobs API client, sending this user's Ray token when the cluster asks for one; a cluster that
    would run the job without asking for one is refused."""
    refuse_open_cluster(address)
    use_cluster_token()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {str(err).splitlines()[0]}\n"
                          "Give the dashboard's address (http://HEAD:8265) of a running cluster, and its token "
                          "(RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) if it uses token authentication") from err


def refuse_open_cluster(address: str, timeout_s: float = 10.0) -> None:
    """Refuse a cluster whose Jobs API answers without a token (Ray before 2.52, or token authentication
    turned off): anyone who reaches it runs code as its user and reads every job's record."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/jobs/", timeout=timeout_s) as answer:
            answered = answer.status
    except urllib.error.HTTPError as err:
        answered = err.code  # 401: it asks for a token
    except (urllib.error.URLError, OSError, ValueError):
        return  # unreachable or not http: the client says so
    if answered == 200:
        raise ClusterError(f"the Ray cluster at {address} takes jobs without a token: anyone who reaches it runs code "
                           "as its user and reads every job's record. Start it with token authentication (Ray >= "
                           "2.52 with RAY_AUTH_MODE=token; the default from Ray 2.60)")


def follow_job(client: Any, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 when it succeeded."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in FINISHED_STATES:
        time.sleep(1.0)
        status = str(client.get_job_status(job_id))
    status = status.split(".")[-1]
    print(f"distdl: Ray job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1
