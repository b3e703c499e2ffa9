"""One Ray node of a batch job's Ray cluster, run in the foreground (one `srun` task per node).

`python -m distdl.cluster.ray_node start ...` runs `ray start --block` with every port pinned to a block of
the job's own, so several jobs' Ray clusters can share nodes, and takes the node's whole process
tree down when Slurm ends the task (a `ray start --block` alone leaves its raylet and GCS running).
`wait` blocks until the cluster has a number of nodes; `ip` prints this node's address as Ray sees it.
The sbatch template (slurm/ray_cluster.sbatch) calls these.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

# Offsets in a node's port block. The GCS and dashboard are the head's; workers get the rest.
GCS_OFFSET = 0
DASHBOARD_OFFSET = 1
CLIENT_SERVER_OFFSET = 8
NODE_PORT_OFFSETS = {
    "--node-manager-port": 2,
    "--object-manager-port": 3,
    "--metrics-export-port": 4,
    "--dashboard-agent-listen-port": 5,
    "--dashboard-agent-grpc-port": 6,
    "--runtime-env-agent-port": 7,
}
WORKER_PORTS = (10, 99)  # one port per worker process on the node (Ray's own and Ray Train's)
PORT_BLOCK = 100


def ray_start_command(port_base: int, head_address: Optional[str], num_cpus: int, num_gpus: int,
                      temp_dir: Optional[str]) -> list[str]:
    """`ray start --block` for a head (no address) or a worker node, ports from `port_base` on."""
    # Ray's CLI through this Python, wherever pip put the `ray` script.
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
    if head_address is None:
        # The dashboard serves the job API and the State API Ray Train polls; it listens on this node only.
        command += ["--head", f"--port={port_base + GCS_OFFSET}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={port_base + DASHBOARD_OFFSET}"]
        if ray_client_installed():  # Ray starts its client server (on 10001) only when it can
            command += [f"--ray-client-server-port={port_base + CLIENT_SERVER_OFFSET}"]
    else:
        command += [f"--address={head_address}"]
    command += [f"{flag}={port_base + offset}" for flag, offset in NODE_PORT_OFFSETS.items()]
    command += [f"--min-worker-port={port_base + WORKER_PORTS[0]}", f"--max-worker-port={port_base + WORKER_PORTS[1]}"]
    if temp_dir:
        command += [f"--temp-dir={temp_dir}"]
    return command


def ray_client_installed() -> bool:
    from ray._private.utils import get_ray_client_dependency_error

    return get_ray_client_dependency_error() is None


def run_node(command: list[str]) -> int:
    """Run `ray start --block`; on SIGUSR2, SIGTERM or SIGINT stop it and every child."""
    node = subprocess.Popen(command)

    def stop(signum: int, _frame: object) -> None:
        stop_tree()
        sys.exit(0 if signum == signal.SIGUSR2 else 128 + signum)

    # SIGUSR2 is the job's own request (srun forwards it to the task); SIGTERM/SIGINT come from Slurm.
    for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    code = node.wait()
    stop_tree()  # nothing of ours may outlive the node, even when `ray start` failed
    return code


def stop_tree(grace_s: float = 5.0) -> None:
    """Terminate every descendant of this process (raylet, GCS, workers), then kill what is left."""
    import psutil

    stop_processes(psutil.Process().children(recursive=True), grace_s)


def stop_processes(processes: list, grace_s: float) -> None:
    """Terminate these psutil processes; kill those still running after `grace_s`, and wait for them."""
    import psutil

    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)  # a killed process is gone before its caller goes on


def wait_for_nodes(address: str, count: int, timeout_s: float) -> None:
    """Block until `count` nodes are alive in the cluster at `address` (GCS host:port).

    Connecting is retried too: a head that is still starting, or busy, may time a driver out.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before importing ray, which reads it once
    import ray

    deadline = time.monotonic() + timeout_s
    alive, last_error = 0, None
    while time.monotonic() < deadline:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            alive = sum(node["Alive"] for node in ray.nodes())
        except (ConnectionError, RuntimeError) as err:
            last_error = err
        finally:
            ray.shutdown()
        if alive >= count:
            print(f"distdl: {alive} Ray nodes joined", flush=True)
            return
        time.sleep(2.0)
    raise SystemExit(f"distdl: only {alive} of {count} Ray nodes joined within {timeout_s:.0f} s"
                     f"{f' (last error: {last_error})' if last_error else ''}; "
                     "see the ray-*.log files beside this job's log")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distdl.cluster.ray_node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run one Ray node in the foreground")
    role = start.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head")
    role.add_argument("--address", help="join the head at this GCS host:port")
    start.add_argument("--port-base", type=int, required=True, help=f"first of {PORT_BLOCK} ports this node may use")
    start.add_argument("--num-cpus", type=int, required=True)
    start.add_argument("--num-gpus", type=int, default=0)
    start.add_argument("--temp-dir", help="Ray's session directory root on this node")
    wait = commands.add_parser("wait", help="wait until the cluster has this many nodes")
    wait.add_argument("--address", required=True)
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=300.0)
    commands.add_parser("ip", help="this node's IP address as Ray picks it")
    args = parser.parse_args(argv)

    if args.command == "start":
        if args.temp_dir:
            Path(args.temp_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return run_node(ray_start_command(args.port_base, args.address, args.num_cpus, args.num_gpus,
                                              args.temp_dir))
        finally:
            if args.temp_dir:  # Ray's session files on this node go with it
                shutil.rmtree(args.temp_dir, ignore_errors=True)
    if args.command == "wait":
        wait_for_nodes(args.address, args.nodes, args.timeout)
        return 0
    import ray.util

    print(ray.util.get_node_ip_address())
    return 0


if __name__ == "__main__":
    sys.exit(main())
