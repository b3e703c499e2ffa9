"""A real `ray start --head` with token authentication (Ray 2.60's default): `distdl submit ray` trains
on it through the Ray Jobs API, and drivers, clients and nodes without its token are refused."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers.shared import QUIET, REPO

pytestmark = pytest.mark.distributed
RAY = Path(sys.executable).with_name("ray")
TINY = "configs/bert/pretrain_tiny.yaml"  # inside the working directory the job ships


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_with_token(home: Path, token: str | None) -> dict[str, str]:
    """A user whose only token is `token` (none at all when None): no ~/.ray/auth_token to fall back on."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the job's `python` is this venv's
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("head-home")
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = free_port(), free_port()
    # Its own short temp dir (Unix socket paths are limited to 107 bytes) names its processes.
    temp_dir = tempfile.mkdtemp(prefix="distdl-head-", dir="/tmp")
    # The job agent's HTTP port too: Ray's fixed default (52365) is taken by any other Ray on the
    # machine (an embedded one of a concurrent run), and the agent then never comes up to take jobs.
    start = [str(RAY), "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
             f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4", "--disable-usage-stats",
             f"--temp-dir={temp_dir}"]
    subprocess.run(start, check=True, capture_output=True, timeout=120, env=env_with_token(home, token), cwd=home)
    yield {"gcs": f"127.0.0.1:{gcs_port}", "jobs": f"http://127.0.0.1:{dashboard_port}", "token": token,
           "temp_dir": temp_dir}
    # Only this head's processes: `ray stop` would end every Ray instance on the machine (other tests' too).
    stop_processes_of(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes_of(temp_dir: str, grace_s: float = 3.0) -> None:
    """Stop the processes whose command line names `temp_dir`, as a Slurm job's Ray node stops its own."""
    import psutil

    from distdl.cluster.ray_node import stop_processes

    stop_processes([process for process in psutil.process_iter(["cmdline"])
                    if any(f"{temp_dir}/" in part for part in process.info["cmdline"] or [])], grace_s)


def distdl(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distdl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def small_run(tmp_path: Path, corpus: Path) -> list[str]:
    return [f"run.storage_path={tmp_path}", f"data.path={corpus}", "trainer.max_steps=4", "trainer.micro_batch_size=4",
            "trainer.global_batch_size=8", "tokenizer.vocab_size=1000", "data.max_seq_length=32", *QUIET]


def with_secrets(env: dict[str, str]) -> tuple[dict[str, str], list[str], str]:
    """The environment with credentials planted (their values are what must appear nowhere), and a
    setting distdl does forward, whose value shows where Ray writes what it is given."""
    planted = {"WANDB_API_KEY": f"wandb-secret-{secrets.token_hex(16)}", "HF_TOKEN": f"hf_secret{secrets.token_hex(16)}"}
    canary = f"http://canary-{secrets.token_hex(8)}.invalid"
    return {**env, **planted, "WANDB_BASE_URL": canary}, list(planted.values()), canary


def files_holding(root: Path, values: list[str]) -> list[str]:
    """Every file under `root` that holds any of `values`, and which."""
    found = []
    for file in root.rglob("*"):
        if file.is_file() and not file.is_symlink():
            try:
                data = file.read_bytes()
            except OSError:  # a socket or a file Ray removes as we read
                continue
            found += [f"{file}: {value[:12]}..." for value in values if value.encode() in data]
    return found


def job_info(address: str, job_id: str, env: dict[str, str]) -> str:
    """The Jobs API's record of a job, as its own client gives it to anyone holding the cluster's token."""
    script = ("import sys; from ray.job_submission import JobSubmissionClient; "
              "print(JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2]))")
    done = subprocess.run([sys.executable, "-c", script, address, job_id], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_submit_ray_trains_through_the_jobs_api_and_no_credential_travels(ray_head, tmp_path, corpus):
    env, planted, canary = with_secrets(env_with_token(tmp_path, ray_head["token"]))
    done = distdl("submit", "ray", TINY, *small_run(tmp_path, corpus), "--address", ray_head["jobs"], "--follow",
                  env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted Ray job distdl-bert-tiny-" in done.stdout and "SUCCEEDED" in done.stdout
    assert "ray job logs --address" in done.stdout
    summary = json.loads((tmp_path / "bert-tiny" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 4 and len(summary["ray_node_ids"]) == 2
    job_id = done.stdout.split("submitted Ray job ", 1)[1].split()[0]
    record = job_info(ray_head["jobs"], job_id, env)
    assert canary in record, "the job's record holds its runtime environment"
    assert not any(value in record for value in planted)
    assert not any(value in done.stdout + done.stderr for value in planted)
    assert files_holding(Path(ray_head["temp_dir"]), [canary]), "Ray's logs hold what the job was given"
    assert not files_holding(Path(ray_head["temp_dir"]), planted)
    assert not files_holding(tmp_path / "bert-tiny", planted)


def test_an_embedded_run_keeps_rays_files_private_and_credentials_out_of_them(tmp_path, corpus):
    before = set(Path("/tmp").glob("distdl-ray-*"))
    env, planted, canary = with_secrets(env_with_token(tmp_path, None))
    env.pop("RAY_TMPDIR", None)
    done = distdl("train", TINY, *small_run(tmp_path, corpus), env=env)
    sessions = sorted(set(Path("/tmp").glob("distdl-ray-*")) - before)
    try:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert len(sessions) == 1 and sessions[0].stat().st_mode & 0o777 == 0o700, sessions
        assert files_holding(sessions[0], [canary]), "Ray's logs hold the runtime environment distdl gives it"
        assert not files_holding(sessions[0], planted)
        assert not files_holding(tmp_path / "bert-tiny", planted)
        assert not any(value in done.stdout + done.stderr for value in planted)
    finally:
        for session in sessions:
            stop_processes_of(str(session))
            shutil.rmtree(session, ignore_errors=True)


def test_cluster_refuses_whoever_lacks_its_token(ray_head, tmp_path):
    wrong = env_with_token(tmp_path, secrets.token_hex(32))
    # A node with the wrong token, started first: Ray takes ~20 s to give up on it, as on the driver
    # below, and the two waits overlap.
    node = subprocess.Popen([str(RAY), "start", f"--address={ray_head['gcs']}", f"--node-manager-port={free_port()}",
                             "--disable-usage-stats"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=wrong)
    refused = distdl("submit", "ray", TINY, f"run.storage_path={tmp_path}", "--address", ray_head["jobs"], env=wrong)
    assert refused.returncode == 2 and "Invalid authentication token" in refused.stderr, refused.stderr

    no_token = env_with_token(tmp_path, None)
    driver = distdl("train", TINY, f"ray.address={ray_head['gcs']}", f"run.storage_path={tmp_path}",
                    "data.path=/usr/share/common-licenses", env=no_token, timeout=300)
    assert driver.returncode == 2 and "refused this driver's token" in driver.stderr, driver.stderr[-2000:]
    assert not (tmp_path / "bert-tiny").exists(), "a refused driver leaves no run directory"

    output, _ = node.communicate(timeout=300)
    assert node.returncode != 0 and "Authentication token is missing or incorrect" in output


def test_unreachable_cluster_and_relative_storage_are_clear_errors(tmp_path):
    # In subprocesses: Ray keeps the first auth token it reads for the life of a process, and this
    # one's must not be the test session's (its later local clusters would refuse it).
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    closed = f"http://127.0.0.1:{free_port()}"
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((REPO / TINY).read_text())
    cases = {f"cannot reach the Ray Jobs API at {closed}": [TINY, f"run.storage_path={tmp_path}"],
             "run.storage_path='runs' is relative": [TINY, "run.storage_path=runs"],
             "outside the working directory": [str(outside), f"run.storage_path={tmp_path}", "--working-dir", str(REPO)]}
    for message, args in cases.items():
        done = distdl("submit", "ray", *args, "--address", closed, env=env, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_token_ray_writes_for_a_local_cluster_is_made_private(tmp_path, monkeypatch):
    from distdl.cluster.connect import restrict_default_token

    token_file = tmp_path / ".ray" / "auth_token"
    token_file.parent.mkdir()
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o644)  # as Ray 2.60 writes it
    monkeypatch.setenv("HOME", str(tmp_path))
    restrict_default_token()
    assert token_file.stat().st_mode & 0o777 == 0o600
