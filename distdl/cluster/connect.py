"""Connecting this process to Ray: an embedded local Ray, or a running cluster (with its token).

The driver is handed `connect_ray` by the command line (cluster launch sits above the driver), and
calls it when the run is known to be good; the submit commands and the studies use it too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from distdl.config import Config
from distdl.engine.safe_loading import TRUST_VARIABLE
from distdl.errors import ClusterError, ConfigError

# Environment the workers need to see as the driver does (Ray clusters start workers elsewhere). Never a
# credential: Ray keeps a runtime_env with the job's record (readable by anyone holding the cluster's
# token) and writes it into its logs. Workers find credentials where the user's environment puts them on
# each node: inherited from the driver (embedded Ray) or the job (Slurm), or the node's own (docs/trust.md).
FORWARDED_ENV = ("DISTDL_PLUGINS", TRUST_VARIABLE, "WANDB_MODE", "WANDB_BASE_URL", "HF_HOME", "HF_DATASETS_CACHE",
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# NCCL's settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are per cluster and set by the user on the driver.
FORWARDED_PREFIXES = ("NCCL_",)
# Console settings for the whole job (driver.console_for_batch_logs sets them when the console is a file).
CONSOLE_ENV = ("RAY_COLOR_PREFIX", "HF_DATASETS_DISABLE_PROGRESS_BARS")
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def forwarded_env() -> dict[str, str]:
    """The driver's environment variables the workers must see too."""
    return {key: value for key, value in os.environ.items()
            if key in FORWARDED_ENV or key in CONSOLE_ENV or key.startswith(FORWARDED_PREFIXES)}


class _HideTokenNotice(logging.Filter):
    """Ray's notice that token authentication is on: distdl manages the token (restrict_default_token)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()



def connect_ray(config: Config) -> None:
    if config.ray.address is not None:
        use_cluster_token()  # before importing ray, which reads its auth mode once
    import ray

    if ray.is_initialized():
        return
    # Ray Train would send workers' print() through its logger as well as to stdout: each line twice.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **forwarded_env()}
    for name in ("ray", "ray._private.authentication.authentication_token_setup"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _HideTokenNotice) for existing in logger.filters):
            logger.addFilter(_HideTokenNotice())
    # Ray's INFO lines (start-up, the dashboard's address) stay in its log files (Ray Train's: quiet_train_logs).
    quiet = {"logging_level": logging.WARNING}
    if config.ray.address is None:
        # Ray Train's preemption watcher follows a cloud node's drain notices; the one node of an
        # embedded Ray has none to give, and starting the watcher prints an error line on every run
        # (ray#53727). A user who sets the variable keeps their choice.
        env_vars.setdefault(PREEMPTION_WATCHER, os.environ.get(PREEMPTION_WATCHER, "0"))
        # The dashboard (on 127.0.0.1) serves the State API that Ray Train's placement-group cleaner polls;
        # without it the cleaner warns every second on the console.
        ray.init(num_cpus=config.ray.num_cpus, runtime_env={"env_vars": env_vars}, include_dashboard=True,
                 log_to_driver=True, _temp_dir=private_temp_dir(), **quiet)
        restrict_default_token()
    else:
        join_cluster(config.ray.address, env_vars, quiet)


def private_temp_dir() -> Optional[str]:
    """Where an embedded Ray keeps its session (logs, sockets, the job's records): a fresh directory only
    this user can enter (mode 0700), not Ray's default /tmp/ray, which any user of the machine can read.
    Left behind, as Ray leaves its sessions, for the logs. Under /tmp as Ray's own, not $TMPDIR: Ray's Unix
    sockets lie four folders down and their paths may not pass 107 bytes (a Slurm job's TMPDIR is long).
    None (Ray's choice) when the user set RAY_TMPDIR: its protection is theirs."""
    if os.environ.get("RAY_TMPDIR"):
        return None
    import tempfile

    # Ray makes the folder it is given world-writable (0777); the private one is the folder around it.
    private = tempfile.mkdtemp(prefix="distdl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    return os.path.join(private, "ray")


def restrict_default_token() -> None:
    """Ray 2.60 writes the token it generates for a local cluster world-readable (0644); make it the user's."""
    token_file = Path.home() / ".ray" / "auth_token"
    if token_file.is_file() and token_file.stat().st_mode & 0o077:
        token_file.chmod(0o600)


def join_cluster(address: str, env_vars: dict[str, str], options: dict[str, Any]) -> None:
    """Connect to a running cluster, or say plainly why not (unreachable, or refused for its token)."""
    import ray

    if address != "auto" and "://" not in address:  # ray:// and other schemes are Ray's to resolve
        check_reachable(address)
    # A Ray Job's driver already runs in the job's runtime env (distdl submit ray put the variables
    # there), which Ray refuses to merge with a second one.
    runtime_env = None if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else {"env_vars": env_vars}
    try:
        ray.init(address=address, runtime_env=runtime_env, **options)
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        causes = []
        cause: BaseException | None = err
        while cause is not None and len(causes) < 10:
            causes.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(isinstance(c, ray.exceptions.AuthenticationError) or "Authentication" in str(c) for c in causes):
            raise ClusterError(f"ray.address={address}: the cluster refused this driver's token; run with the "
                              "cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token)") from err
        raise ClusterError(f"ray.address={address}: cannot connect ({err})") from err


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at host:port."""
    import socket

    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"ray.address={address!r} is not host:port (or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterError(f"ray.address={address}: nothing answers there ({err.strerror or err}); "
                          "is the cluster's head up, and is this its GCS port (ray start --port)?") from None


def use_cluster_token() -> None:
    """Join a token-authenticated cluster (Ray 2.60's default) when this user holds its token.

    A driver joining a cluster only sends the token with RAY_AUTH_MODE=token; an explicit
    RAY_AUTH_MODE from the user wins.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
