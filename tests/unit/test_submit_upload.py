"""What `distdl submit ray` ships (distdl/cluster/upload.py): only the project's files, never a home
directory or credential files, and never to a cluster that takes jobs without a token. Nothing here
reaches a cluster: every refusal comes before the Jobs API is called."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path, PurePosixPath

import pytest

from distdl.cluster.upload import check_upload, project_files, project_root, staged_copy
from distdl.errors import ConfigError
from tests.helpers.shared import QUIET, REPO, TINY

CLOSED = "http://127.0.0.1:9"  # nothing listens on the discard port


def submit(config: Path, *args: str, home: Path, address: str = CLOSED) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "distdl.cli", "submit", "ray", str(config), *QUIET,
                           f"run.storage_path={home / 'runs'}", *args, "--address", address],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def with_credentials(folder: Path) -> None:
    (folder / ".aws").mkdir(parents=True)
    (folder / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = planted\n")
    (folder / ".ssh").mkdir()
    (folder / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nplanted\n")


def test_a_home_directory_is_refused(tmp_path):
    home = tmp_path / "home"
    with_credentials(home)
    (home / "tiny.yaml").write_text(TINY.read_text())
    done = submit(home / "tiny.yaml", home=home)
    assert done.returncode == 2 and f"--working-dir {home} is your home directory" in done.stderr, done.stderr


def test_a_folder_holding_credentials_is_refused_naming_them(tmp_path):
    project = tmp_path / "home" / "notes"
    with_credentials(project)
    (project / "tiny.yaml").write_text(TINY.read_text())
    done = submit(project / "tiny.yaml", home=tmp_path / "home")
    assert done.returncode == 2, done.stderr
    assert "holds credential files that the job would receive: .aws/credentials, .ssh/id_rsa" in done.stderr
    assert "Traceback" not in done.stderr


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_a_project_ships_its_tracked_and_unignored_files_only(tmp_path):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "tiny.yaml").write_text(TINY.read_text())
    (project / "train.py").write_text("print('tracked')\n")
    (project / ".gitignore").write_text("data/\n.env\n")
    git(project, "init", "-q")
    git(project, "add", ".")
    git(project, "commit", "-qm", "start")
    (project / "notes.md").write_text("untracked, not ignored\n")
    (project / "data").mkdir()
    (project / "data" / "big.bin").write_bytes(b"\0" * 1000)
    (project / ".env").write_text("WANDB_API_KEY=planted\n")
    assert project_root(project / "configs" / "tiny.yaml") == project
    files = project_files(project)
    assert files == [PurePosixPath(name) for name in (".gitignore", "configs/tiny.yaml", "notes.md", "train.py")]
    check_upload(project, files)  # the ignored .env is not among them
    stage = staged_copy(project, files)
    shipped = sorted(PurePosixPath(p.relative_to(stage).as_posix()) for p in stage.rglob("*") if p.is_file())
    assert shipped == files and (stage / "train.py").read_text() == "print('tracked')\n"
    with pytest.raises(ConfigError, match=r"over the 0.0005 MiB cap \(largest: .*\)"):
        check_upload(project, files, max_mib=0.0005)


def test_this_repository_ships_without_its_virtual_environment():
    files = project_files(REPO)
    assert PurePosixPath("configs/bert/pretrain_tiny.yaml") in files
    assert not any(name.parts[0] in (".venv", ".git") for name in files)
    check_upload(REPO, files)


class OpenJobsApi(http.server.BaseHTTPRequestHandler):
    """A Jobs API that answers anyone, as Ray's did before token authentication."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args) -> None:
        pass


def test_a_cluster_that_takes_jobs_without_a_token_is_refused(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OpenJobsApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = submit(TINY, home=tmp_path, address=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert done.returncode == 2 and "takes jobs without a token" in done.stderr, done.stderr
