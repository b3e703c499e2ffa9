"""What `distdl submit ray` ships to the cluster as the job's working directory: the project's files and
nothing else.

The project is the config's git work tree (its top level), and its files are what git would commit:
tracked files and untracked ones that no .gitignore excludes (`git ls-files --cached --others
--exclude-standard`). Outside git the folder is taken whole. Either way a home directory, any credential
file (`.aws/`, `.ssh/`, `.netrc`, `*.pem`, `.env`, ...) and an upload over the size cap are refused
before anything leaves the machine. The files go to Ray from a staged copy of exactly that list, so
Ray's own packaging cannot add anything the check did not see.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

from distdl.errors import ConfigError

# A path any of whose parts matches one of these is a credential: never shipped.
CREDENTIAL_PATTERNS = (".aws", ".ssh", ".gnupg", ".netrc", "_netrc", ".git-credentials", ".pgpass", ".env", ".env.*",
                       "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", "id_ecdsa*", "credentials.json")
MAX_UPLOAD_MIB = 100  # Ray caps a working_dir package at 512 MiB; a project is far smaller
MAX_FILES = 20_000  # a folder outside git with more is not a project


def project_root(config_file: Path) -> Path:
    """The config's git top level, or the config's own folder outside git."""
    folder = config_file.resolve().parent
    top = _git(folder, "rev-parse", "--show-toplevel")
    return Path(top.strip()) if top is not None else folder


def project_files(root: Path) -> list[PurePosixPath]:
    """The files of `root` a job gets: git's tracked and not-ignored untracked files, or all of them."""
    listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", ".")
    if listed is not None:
        names = [PurePosixPath(name) for name in listed.split("\0") if name]
        return sorted(name for name in names if (root / name).is_file())  # a tracked file deleted since
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__")]
        files += [PurePosixPath(Path(folder, name).relative_to(root).as_posix()) for name in names]
        if len(files) > MAX_FILES:
            raise ConfigError(f"--working-dir {root} holds over {MAX_FILES} files and is not a git work tree: "
                              "pass the project's folder (the job receives all of it)")
    return sorted(files)


def check_upload(root: Path, files: list[PurePosixPath], max_mib: float = MAX_UPLOAD_MIB) -> None:
    """Refuse a home directory, credential files and an upload over the cap, naming them."""
    if root.resolve() == Path.home().resolve():
        raise ConfigError(f"--working-dir {root} is your home directory: the job would receive all of it. Run from "
                          "the project's folder, or pass it as --working-dir")
    credentials = [str(name) for name in files if _is_credential(name)]
    if credentials:
        shown = ", ".join(credentials[:5]) + (f" and {len(credentials) - 5} more" if len(credentials) > 5 else "")
        raise ConfigError(f"--working-dir {root} holds credential files that the job would receive: {shown}. "
                          "Exclude them (.gitignore) or pass a folder without them as --working-dir")
    sizes = {name: (root / name).stat().st_size for name in files}
    total = sum(sizes.values())
    if total > max_mib * 2**20:
        largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        shown = ", ".join(f"{name} ({sizes[name] / 2**20:.0f} MiB)" for name in largest)
        raise ConfigError(f"--working-dir {root}: the job would receive {total / 2**20:.0f} MiB, over the "
                          f"{max_mib:g} MiB cap (largest: {shown}). Keep data on shared storage or an object store "
                          "and exclude it (.gitignore)")


def staged_copy(root: Path, files: list[PurePosixPath]) -> Path:
    """A new folder holding exactly `files` of `root` (hard links where possible): what Ray packages."""
    stage = Path(tempfile.mkdtemp(prefix="distdl-upload-"))
    for name in files:
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(root / name, target)
        except OSError:  # another file system
            shutil.copy2(root / name, target)
    return stage


def _is_credential(name: PurePosixPath) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in name.parts for pattern in CREDENTIAL_PATTERNS)


def _git(folder: Path, *args: str) -> str | None:
    """git's output in `folder`; None outside a work tree or without git."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None
