"""`distdl submit slurm`: the request checks and the rendered script, then real jobs on a real Slurm.

The jobs run on the two-node cluster slurm/local_cluster.sh starts on this machine (as in CI); where
it cannot start (no root, no apt), those tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distdl.cluster.slurm import SlurmRequest, check_request, render_script, scaling_overrides, time_limit_seconds
from distdl.cluster.submit import plan_job
from distdl.errors import ConfigError
from tests.helpers.shared import QUIET, REPO, wait_for

TINY = REPO / "configs/bert/pretrain_tiny.yaml"
HOSTILE = "it's a \"run\"; $(touch pwned) `touch pwned` & echo"


def request(**changes) -> SlurmRequest:
    settings = dict(nodes=2, gpus_per_node=4, cpus_per_task=16, time="2:00:00", partition="gpu")
    return SlurmRequest(**{**settings, **changes})


def scaling_after(overrides: list[str]):
    from distdl.config import load_config

    # The batch follows the worker count here (no fixed global batch to divide).
    return load_config(TINY, ["data.path=/usr/share/common-licenses", "trainer.global_batch_size=null",
                              *overrides]).scaling


def test_time_limits_in_slurm_forms():
    assert [time_limit_seconds(t) for t in ("30", "30:15", "2:00:00", "1-0", "1-02:03", "1-00:00:10")] == [
        1800, 1815, 7200, 86400, 93780, 86410]
    for bad in ("2h", "2:00:00\n", "-1"):
        with pytest.raises(ConfigError, match="is not a Slurm time.*HH:MM:SS"):
            time_limit_seconds(bad)


@pytest.mark.parametrize("changes, message", [
    (dict(nodes=0), "--nodes=0 must be at least 1"),
    (dict(gpus_per_node=-1), "--gpus-per-node=-1"),
    (dict(partition="gpu;rm -rf /"), "--partition 'gpu;rm -rf /' has characters"),
    (dict(account="$(id)"), "--account"),
    (dict(time="1:00", signal_seconds=120), "leaves no time before the checkpoint warning"),
    (dict(workers_per_node=2), "--workers-per-node is for CPU jobs"),
    (dict(ray_port_base=80), "--ray-port-base=80 must lie in"),
])
def test_bad_requests_are_refused_naming_the_flag(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_request(request(**changes))


def test_scaling_follows_the_request_unless_given():
    derived = scaling_overrides(request(), [], scaling_after([]))
    assert derived == ["scaling.use_gpu=true", "scaling.num_workers=8"]
    cpu = request(gpus_per_node=0, cpus_per_task=1)
    assert scaling_overrides(cpu, [], scaling_after([])) == [
        "scaling.use_gpu=false", "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD"]
    given = ["scaling.num_workers=2", "scaling.use_gpu=true"]
    assert scaling_overrides(request(), given, scaling_after(given)) == []


@pytest.mark.parametrize("overrides, changes, message", [
    (["scaling.num_workers=9", "scaling.use_gpu=true"], {}, "scaling.num_workers=9 does not fit 2 node(s) x 4"),
    (["scaling.use_gpu=true"], dict(gpus_per_node=0), "scaling.use_gpu=true but --gpus-per-node=0"),
    (["scaling.cpus_per_worker=8"], {}, "need 32 CPUs per node, but --cpus-per-task=16"),
])
def test_requests_that_cannot_hold_the_workers_are_refused(overrides, changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        scaling_overrides(request(**changes), overrides, scaling_after(overrides))


def header_values(script: str, tmp_path: Path) -> list[str]:
    """What bash makes of the settings distdl wrote: the run directory, then distdl's arguments."""
    header = script.split("\n# distdl on Slurm:")[0]
    probe = tmp_path / "probe.sh"
    probe.write_text(header + '\nprintf "%s\\0" "$DISTDL_RUN_DIR" "${DISTDL_ARGS[@]}"\n')
    done = subprocess.run(["bash", str(probe)], capture_output=True, check=True, cwd=tmp_path)
    return done.stdout.decode().split("\0")[:-1]


def test_hostile_values_reach_the_job_verbatim_and_run_nothing(tmp_path):
    storage = tmp_path / "shared $(touch pwned) dir"
    overrides = ["data.path=/usr/share/common-licenses", f"run.name={HOSTILE}", f"run.storage_path={storage}"]
    plan = plan_job(str(TINY), overrides, None)
    script = render_script(request(), plan)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, "the script parses"
    assert "--job-name=distdl-it_s_a__run____" in script  # #SBATCH lines get a name Slurm takes as is
    values = header_values(script, tmp_path)
    assert values[0] == str(storage / HOSTILE)
    assert values[1:] == ["train", str(TINY), *overrides]
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()


def test_hostile_values_reach_a_ray_job_verbatim_and_run_nothing(tmp_path):
    from distdl.cluster.submit import ray_entrypoint

    storage = tmp_path / "shared $(touch pwned) dir"
    overrides = ["data.path=/usr/share/common-licenses", f"run.name={HOSTILE}", f"run.storage_path={storage}"]
    plan = plan_job(str(TINY), overrides, None)
    # A stand-in for python that prints the words the job's shell hands it, NUL-separated.
    echo_args = tmp_path / "echo-args"
    echo_args.write_text('#!/bin/bash\nprintf "%s\\0" "$@"\n')
    echo_args.chmod(0o755)
    entrypoint = ray_entrypoint(plan, REPO, str(echo_args))
    words = subprocess.run(["bash", "-c", entrypoint], capture_output=True, check=True, cwd=tmp_path).stdout
    assert words.decode().split("\0")[:-1] == ["-m", "distdl.cli", "train", "configs/bert/pretrain_tiny.yaml",
                                                *overrides, "ray.address=auto"]
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path, capsys):
    from distdl.cli import main

    code = main(["submit", "slurm", str(TINY), "data.path=/usr/share/common-licenses", f"run.storage_path={tmp_path}",
                 "trainer.global_batch_size=null",
                 "--nodes=2", "--gpus-per-node=8", "--cpus-per-task=64", "--time=1-00:00:00", "--partition=gpu",
                 "--dry-run"])
    out = capsys.readouterr()
    assert code == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "#SBATCH --partition=gpu", "scaling.num_workers=16",
                 "DISTDL_WORKERS_PER_NODE=8"):
        assert line in out.out
    assert not (tmp_path / "bert-tiny").exists()
    # A worker count the command line fixes stays fixed; the job does not derive one from its nodes.
    assert main(["submit", "slurm", str(TINY), "data.path=/usr/share/common-licenses", f"run.storage_path={tmp_path}",
                 "scaling.num_workers=4", "trainer.global_batch_size=null", "--nodes=2", "--gpus-per-node=0",
                 "--cpus-per-task=4", "--time=10",
                 "--workers-per-node=2", "--dry-run"]) == 0
    assert "DISTDL_WORKERS_PER_NODE=''" in capsys.readouterr().out


def test_a_study_job_runs_distdl_study_and_requeues_on_the_warning(tmp_path, capsys):
    from distdl.cli import main

    study_file = REPO / "configs/studies/overparam.yaml"
    code = main(["submit", "slurm", "--study", "overparam", str(study_file), f"run.storage_path={tmp_path}",
                 "study.name=widths", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=4:00:00",
                 "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    assert "DISTDL_ON_SIGNAL=requeue" in script
    assert f"DISTDL_RUN_DIR={tmp_path / 'widths'}" in script
    assert f"DISTDL_ARGS=(study overparam {study_file} run.storage_path={tmp_path} study.name=widths" in script


def test_a_prepare_job_runs_distdl_prepare_on_the_jobs_ray_cluster_and_requeues_on_the_warning(tmp_path, capsys):
    """Slurm and Ray jobs that prepare: the same command line, logs beside the shards (which the
    preparation then accepts as its folder), a requeue that goes on from the shards already made."""
    from distdl.cli import main
    from distdl.cluster.submit import ray_entrypoint
    from distdl.data.prepared import storage_at
    from distdl.preparation import _refuse_foreign_folder

    root = tmp_path / "prepared"
    overrides = ["data.path=/usr/share/common-licenses", f"data.prepared_path={root}"]
    assert main(["submit", "slurm", "--prepare", str(TINY), *overrides, "--nodes=2", "--gpus-per-node=0",
                 "--cpus-per-task=32", "--time=2:00:00", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "DISTDL_ON_SIGNAL=requeue" in out.out and f"DISTDL_RUN_DIR={root}" in out.out
    assert f"DISTDL_ARGS=(prepare {TINY} data.path=/usr/share/common-licenses data.prepared_path={root})" in out.out
    assert f"--output={root}/slurm/slurm-%j.out" in out.out and "from the Slurm request" not in out.err
    (root / "slurm").mkdir(parents=True)
    _refuse_foreign_folder(storage_at(str(root)))  # the job's own logs do not make the folder someone else's

    plan = plan_job(str(TINY), overrides, None, prepare=True)
    assert shlex.split(ray_entrypoint(plan, REPO, "python")) == [
        "python", "-m", "distdl.cli", "prepare", "configs/bert/pretrain_tiny.yaml", *overrides, "ray.address=auto"]
    for args, message in {("--prepare", str(TINY), "data.prepared_path=relative/shards"):
                              "data.prepared_path='relative/shards' is relative",
                          ("--prepare", str(TINY)): "--prepare needs data.prepared_path",
                          ("--prepare", "--study", "sharpness", str(TINY)): "--prepare and --study"}.items():
        assert main(["submit", "ray", *args, "--address", "http://127.0.0.1:1"]) == 2
        assert message in capsys.readouterr().err


def test_the_same_submit_command_again_resumes_the_run(tmp_path, capsys):
    """The job saves its config with the scaling the request implied; submitting again must match it."""
    from distdl.cli import main
    from distdl.config import load_config
    from distdl.rundir import CONFIG_FILE

    overrides = ["data.path=/usr/share/common-licenses", f"run.storage_path={tmp_path}", "trainer.global_batch_size=null"]
    flags = ["--nodes=4", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "--dry-run"]
    assert main(["submit", "slurm", str(TINY), *overrides, *flags]) == 0
    derived = capsys.readouterr().err.split("from the Slurm request: ")[1].split()
    saved = load_config(TINY, [*overrides, *derived])  # what the first job's driver wrote
    saved.run_dir.mkdir(parents=True)
    (saved.run_dir / CONFIG_FILE).write_text(saved.to_yaml())
    assert main(["submit", "slurm", str(TINY), *overrides, *flags]) == 0, capsys.readouterr().err


def test_a_failed_first_start_keeps_the_slurm_logs(tmp_path):
    from distdl.driver import _remove_if_only_ours
    from distdl.rundir import SLURM_LOGS

    (tmp_path / SLURM_LOGS).mkdir()
    (tmp_path / SLURM_LOGS / "slurm-7.out").write_text("the error the user needs")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "stop_request").write_text("")
    _remove_if_only_ours(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [SLURM_LOGS]
    assert (tmp_path / SLURM_LOGS / "slurm-7.out").read_text() == "the error the user needs"


def test_missing_sbatch_and_bad_requests_exit_2(tmp_path):
    base = [sys.executable, "-m", "distdl.cli", "submit", "slurm", str(TINY), "data.path=/usr/share/common-licenses",
            f"run.storage_path={tmp_path}", "trainer.global_batch_size=null", "--gpus-per-node=0", "--cpus-per-task=1",
            "--time=10"]
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on it
    cases = {"sbatch is not on PATH": [*base, "--nodes=1"],
             "scaling.num_workers=3 does not fit 1 node(s) x 1": [*base, "--nodes=1", "scaling.num_workers=3"]}
    for message, command in cases.items():
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


# --- real jobs on the local two-node Slurm cluster ---------------------------------------------------

JOB_OVERRIDES = ["data.path=/usr/share/common-licenses", "trainer.max_steps=100", "trainer.log_every=2",
                 "trainer.micro_batch_size=4", "trainer.global_batch_size=8", "tokenizer.vocab_size=1000",
                 "data.max_seq_length=32", *QUIET]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "DISTDL_SLURM_DIR": str(state)}
    try:
        started = subprocess.run([str(REPO / "slurm/local_cluster.sh"), "start"], capture_output=True, text=True,
                                 env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("slurm/local_cluster.sh did not start Slurm within 300 s")
    if started.returncode != 0:
        pytest.skip(f"cannot start a local Slurm cluster here: {started.stderr.strip()[-300:]}")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    assert state.stat().st_mode & 0o777 == 0o700, "the cluster's state is private to its user"
    yield
    subprocess.run([str(REPO / "slurm/local_cluster.sh"), "stop"], env=env, timeout=120)
    os.environ.pop("SLURM_CONF", None)


def test_the_local_cluster_refuses_a_state_directory_another_user_owns(tmp_path):
    """Its state never goes into a folder someone else made first (a fixed /tmp path could be)."""
    if os.getuid() != 0:
        pytest.skip("needs root, to give a folder to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # nobody
    for command in ("start", "stop"):
        done = subprocess.run([str(REPO / "slurm/local_cluster.sh"), command], capture_output=True, text=True,
                              env={**os.environ, "DISTDL_SLURM_DIR": str(theirs)}, timeout=300)
        assert done.returncode == 1 and "belongs to another user" in done.stderr, (command, done.stderr)
    assert list(theirs.iterdir()) == []


def submit(storage: Path, name: str, *overrides: str) -> str:
    command = [sys.executable, "-m", "distdl.cli", "submit", "slurm", str(TINY), *JOB_OVERRIDES, *overrides,
               f"run.storage_path={storage}", f"run.name={name}", "--nodes=2", "--gpus-per-node=0",
               "--cpus-per-task=1", "--time=20", "--signal-seconds=60"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=storage)
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted Slurm job (\d+)", done.stdout).group(1)


def job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return re.search(rf"\b{field}=(\S+)", shown).group(1)




def job_tokens(job_id: str) -> set[str]:
    """The Ray tokens in the environments of this job's processes (root reads /proc/PID/environ)."""
    tokens = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = dict(item.split("=", 1) for item in environ.read_bytes().decode(errors="replace").split("\0")
                             if "=" in item)
        except OSError:
            continue
        if variables.get("SLURM_JOB_ID") == job_id and "RAY_AUTH_TOKEN" in variables:
            tokens.add(variables["RAY_AUTH_TOKEN"])
    return tokens


def final_weights(run_dir: Path) -> dict:
    from distdl.engine.checkpoints import trained_state

    return trained_state(run_dir).weights()


ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE")


def wait_until_ended(job_id: str, run_dir: Path) -> None:
    wait_for(lambda: job_field(job_id, "JobState") in ENDED_STATES, 600, f"job {job_id} to end", poll_s=1.0)
    log = run_dir / "slurm" / f"slurm-{job_id}.out"
    assert job_field(job_id, "JobState") == "COMPLETED", log.read_text()[-3000:] if log.is_file() else "no job log"


@pytest.mark.distributed
def test_two_node_jobs_train_and_a_warned_job_requeues_and_resumes(slurm_cluster, tmp_path):
    """A 2-node job trains with one worker per node; a second, warned before its time limit,
    checkpoints and requeues itself, is given one node only, resumes there on one worker with
    gradient accumulation 2 (the ZeRO-2 state resharded), and ends as the uninterrupted one did."""
    plain_dir, warned_dir = tmp_path / "plain", tmp_path / "warned"
    submitted_at = time.time()
    plain = submit(tmp_path, "plain")
    wait_until_ended(plain, plain_dir)
    summary = json.loads((plain_dir / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 100
    assert len(set(summary["ray_node_ids"])) == 2, "one worker on each of the two Ray nodes"
    first_step = json.loads((plain_dir / "metrics.jsonl").read_text().splitlines()[0])
    print(f"submit to first logged step (step {first_step['step']}): {first_step['time'] - submitted_at:.1f} s")
    assert sorted(p.name for p in (plain_dir / "slurm" / f"job-{plain}").iterdir()) == ["ray-node1.log", "ray-node2.log"]
    wait_for(lambda: not job_processes(plain), 30, "the job's Ray nodes to end with it")

    # The same vocabulary as the plain run (WordPiece training is not deterministic across processes).
    warned = submit(tmp_path, "warned", f"tokenizer.name_or_path={plain_dir / 'tokenizer'}")
    wait_for(lambda: (warned_dir / "metrics.jsonl").is_file(), 400, "the warned job's first logged step")
    tokens = job_tokens(warned)
    subprocess.run(["scancel", "--signal=USR1", "--batch", warned], check=True)
    wait_for(lambda: job_field(warned, "Restarts") == "1" and job_field(warned, "JobState") == "PENDING", 300,
             "the warned job to requeue", poll_s=1.0)
    # Requeued onto fewer nodes: one this time (and one task, or Slurm cannot place the job's two).
    subprocess.run(["scontrol", "update", f"JobId={warned}", "NumNodes=1", "NumTasks=1"], check=True)
    release_requeue_hold(warned)
    wait_until_ended(warned, warned_dir)
    log = (warned_dir / "slurm" / f"slurm-{warned}.out").read_text()
    stopped = int(re.search(r"stopped on request at step (\d+)", log).group(1))
    assert 0 < stopped < 100 and "resuming run" in log and "step 100/100 done" in log
    assert re.search(r"\(restart 1\) on node\d;", log), "the requeued job ran on one node"
    assert f"checkpoint_{stopped:08d} was saved by 2 workers; resuming on 1, resharded its ZeRO state" in log
    warned_summary = json.loads((warned_dir / "summary.json").read_text())
    assert warned_summary["final"]["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)
    plain_weights, warned_weights = final_weights(plain_dir), final_weights(warned_dir)
    for name, tensor in plain_weights.items():
        if name.endswith("attention.self.key.bias"):
            # Its gradient is 0 in exact arithmetic (softmax ignores what the bias adds to a query's every
            # score): it holds Adam-normalised rounding noise, ~1e-6, which another summation order redraws.
            assert warned_weights[name].abs().max() < 1e-5 and tensor.abs().max() < 1e-5, name
            continue
        assert warned_weights[name].allclose(tensor, rtol=1e-5, atol=1e-6), name

    assert len(tokens) == 1, "the job's Ray nodes and driver share one token"
    token = tokens.pop()
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert token.encode() not in path.read_bytes(), f"the token leaked into {path}"
    left = [p for p in Path("/tmp").glob(f"distdl-{warned}-*") if p.stat().st_mtime > submitted_at]
    assert not left, "the job's private Ray directory is removed"


def release_requeue_hold(job_id: str) -> None:
    """Start a requeued job now rather than after Slurm's hold (BeginTime, the credential lifetime:
    two minutes by default), but only once its old allocation is over everywhere.

    Each slurmd revokes the old allocation's credential when it ends the job there, and refuses to
    launch the job again under a credential created in or before that second ("Job credential
    revoked"). So: no step of the job left, every node done completing (its slurmd has processed the
    end), and then the next whole second on the clock before the new credential is made.
    """
    def old_allocation_gone() -> bool:
        steps = subprocess.run(["squeue", "-h", "-s", "-j", job_id], capture_output=True, text=True).stdout.strip()
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
        return not steps and bool(states) and all(state == "idle" for state in states)

    wait_for(old_allocation_gone, 120, f"job {job_id}'s old allocation to end on every node")
    ended_by = int(time.time())
    wait_for(lambda: int(time.time()) > ended_by, 5, "the next second")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def job_processes(job_id: str) -> list[str]:
    """This job's Ray processes (their command lines name its private directory); other Ray instances
    on the machine are not the job's."""
    listed = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listed if f"/distdl-{job_id}-" in line]
