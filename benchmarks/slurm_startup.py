"""Time from `distdl submit slurm` to the first training step, by phase, on a real Slurm cluster.

    SLURM_CONF=... python benchmarks/slurm_startup.py [--nodes 2] [--repeats 2]
    python benchmarks/slurm_startup.py --local      # starts slurm/local_cluster.sh first (root)

Each repeat submits the tiny BERT pretraining config as a CPU job with one worker per node and reads
the phases from the job's log (its timestamped `distdl:` lines) and the run's metrics.jsonl:
queued (from running `distdl submit`, whose imports and checks take ~5 s, to the job's start), Ray up (to every node joined), driver (to the workers' start), and
first step (to the first logged step). Results go to benchmarks/results/slurm_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/bert/pretrain_tiny.yaml"
OVERRIDES = ["data.path=/usr/share/common-licenses", "trainer.max_steps=4", "trainer.log_every=2",
             "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "tokenizer.vocab_size=1000",
             "data.max_seq_length=32", "tracking.wandb_mode=disabled", "tracking.progress_bar=false"]
# The job log's milestones (slurm/ray_cluster.sbatch writes `distdl: <time> <message>`).
MILESTONES = {"job_start": r"job \d+ \(restart", "ray_up": r"Ray nodes joined", "driver_done": r"driver exited"}


def job_state(job_id: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", shown)
    return match.group(1) if match else "UNKNOWN"


def milestone_times(log: str) -> dict[str, float]:
    times = {}
    for line in log.splitlines():
        match = re.match(r"distdl: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) (.*)", line)
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        for name, pattern in MILESTONES.items():
            if re.search(pattern, match.group(2)) and name not in times:
                times[name] = stamp
    return times


def one_job(storage: Path, nodes: int, index: int) -> dict[str, float]:
    name = f"startup-{index}"
    submitted = time.time()
    done = subprocess.run([sys.executable, "-m", "distdl.cli", "submit", "slurm", str(TINY), *OVERRIDES,
                           f"run.storage_path={storage}", f"run.name={name}", f"--nodes={nodes}",
                           "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"],
                          capture_output=True, text=True, check=True)
    job_id = re.search(r"submitted Slurm job (\d+)", done.stdout).group(1)
    while job_state(job_id) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
        time.sleep(1.0)
    run_dir = storage / name
    log = (run_dir / "slurm" / f"slurm-{job_id}.out").read_text()
    if job_state(job_id) != "COMPLETED":
        raise SystemExit(f"job {job_id} ended {job_state(job_id)}:\n{log[-3000:]}")
    marks = milestone_times(log)
    first_step = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["time"]
    return {
        "queued_s": marks["job_start"] - submitted,
        "ray_up_s": marks["ray_up"] - marks["job_start"],
        "driver_and_workers_to_first_step_s": first_step - marks["ray_up"],
        "submit_to_first_step_s": first_step - submitted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--local", action="store_true", help="start slurm/local_cluster.sh and use it")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/slurm_startup.json"))
    args = parser.parse_args()
    if args.local:
        started = subprocess.run([str(REPO / "slurm/local_cluster.sh"), "start"], capture_output=True, text=True,
                                 check=True)
        os.environ["SLURM_CONF"] = started.stdout.strip().split("=", 1)[1]
    with tempfile.TemporaryDirectory(prefix="distdl-startup-") as storage:
        jobs = [one_job(Path(storage), args.nodes, i) for i in range(args.repeats)]
    for i, job in enumerate(jobs):
        print(f"job {i}: " + ", ".join(f"{k} {v:.1f}" for k, v in job.items()))
    result = {"nodes": args.nodes, "workers": args.nodes, "jobs": jobs,
              "machine": f"{os.cpu_count()} cores; nodes {'share this host' if args.local else 'as Slurm gave them'}"}
    write_results(Path(args.out), result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
