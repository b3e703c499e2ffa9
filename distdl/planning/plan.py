"""`distdl plan`: the step model fed from a profile, a cluster file and a scaling study, over the GPU
counts a job could ask for; the table, the plot, the JSON and the `distdl submit slurm` line."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from distdl.config import Config
from distdl.errors import ConfigError
from distdl.flops import same_datasheet_gpu
from distdl.planning.cluster import ClusterSpec
from distdl.planning.estimate import Estimate
from distdl.planning.inputs import Profile, ScalingInput, gradient_bytes
from distdl.planning.model import BatchPolicy, ScalingFit, StepModel, gradient_sync_seconds, knee, predict

MAX_GPUS = 4096
# Added to a job's time limit: Ray's start on every node, data loading, the final checkpoint, and
# submit slurm's checkpoint warning (120 s before the limit by default).
START_UP_S = 600.0


@dataclass(frozen=True)
class PlanRequest:
    """What the command line asked for, besides the files."""

    config_path: str
    overrides: list[str] = field(default_factory=list)
    batch_policy: str = "global"  # global: the config's global batch at every N; per_gpu: its per-GPU share
    gpus: Optional[list[int]] = None  # None: powers of two inside a node, then whole nodes doubling
    overlap: Optional[float] = None  # None: measured by the profile's trace, else 0
    gpu_hours_tolerance: float = 0.10
    # The training config the submit line names, where CONFIG is a study file (its overrides are in it).
    submit_config: Optional[str] = None


def gpu_limit(cluster: ClusterSpec) -> int:
    """The most GPUs a plan considers: the cluster's, at most MAX_GPUS."""
    return min(cluster.max_gpus, MAX_GPUS)


def default_gpu_counts(cluster: ClusterSpec) -> list[int]:
    """1, 2, 4, ... inside a node, then 1, 2, 4, ... whole nodes, up to the cluster or 4,096 GPUs."""
    top = gpu_limit(cluster)
    inside = [2**k for k in range(13) if 2**k < cluster.gpus_per_node]
    nodes = [cluster.gpus_per_node * 2**k for k in range(13) if cluster.gpus_per_node * 2**k <= top]
    return [n for n in inside + nodes if n <= top]


def check_gpu_counts(gpus: list[int], cluster: ClusterSpec, cluster_path: str) -> None:
    top = gpu_limit(cluster)
    wrong = [n for n in gpus if not 1 <= n <= top]
    if wrong:
        raise ConfigError(f"--gpus {','.join(map(str, gpus))}: {wrong[0]} is out of range; allowed: 1 to {top} "
                          f"(the lesser of {MAX_GPUS} and {cluster_path}'s gpus_per_node x max_nodes = "
                          f"{cluster.max_gpus})")
    split = [n for n in gpus if n > cluster.gpus_per_node and n % cluster.gpus_per_node]
    if split:
        raise ConfigError(f"--gpus: {split[0]} GPUs do not fill whole nodes of {cluster.gpus_per_node} "
                          f"({cluster_path}: gpus_per_node); above one node, give multiples of it")


def step_model(config: Config, compute: Profile | Estimate, cluster: ClusterSpec,
               overlap: Optional[float]) -> tuple[StepModel, list[str]]:
    """The step model of the planned config, its compute per sample from a profile or an estimate, and
    what was assumed on the way. `overlap`: stated (--overlap), or None: measured by the profile's
    trace where it has one, else 0."""
    if isinstance(compute, Estimate):
        part, notes = Compute(compute.compute_per_sample_s), estimate_notes(config, compute, cluster)
    else:
        part, notes = profiled_compute(config, compute, cluster, overlap)
    if overlap is None:
        overlap = part.measured_overlap or 0.0
    if not overlap:
        notes.append("no synchronization hidden behind the backward pass (--overlap states a share)")
    parameters_bytes = gradient_bytes(compute.trainable_parameters, config.engine.precision)
    return StepModel(compute_per_sample_s=part.per_sample_s, micro_batch=config.trainer.micro_batch_size,
                     gradient_bytes=parameters_bytes, zero_stage=config.engine.zero_stage, overlap=overlap,
                     optimizer_s=part.optimizer_s), notes


@dataclass(frozen=True)
class Compute:
    per_sample_s: float
    optimizer_s: float = 0.0  # the whole optimizer step on one GPU (StepModel.optimizer_s)
    measured_overlap: Optional[float] = None


def estimate_notes(config: Config, estimate: Estimate, cluster: ClusterSpec) -> list[str]:
    notes = [f"no profile: compute per sample is {estimate.flops_per_sample:.4g} model FLOPs (counted on the "
             f"config's model) at a stated MFU of {estimate.mfu:.0%} of the {cluster.gpu}'s "
             f"{estimate.peak_tflops:g} TFLOP/s ({peak_kind(config, cluster)}); a short run measures it "
             "(--profile)",
             "the optimizer step and the data loading are taken to fit inside the stated MFU"]
    return notes + ([estimate.caveat] if estimate.caveat else [])


def peak_kind(config: Config, cluster: ClusterSpec) -> str:
    kind = cluster.peak_kind(config.engine.precision, config.engine.tf32)
    return {"peak_tflops": "the cluster file's peak_tflops", "tf32": "fp32 on TF32 tensor cores"}.get(kind, kind)


def profiled_compute(config: Config, profile: Profile, cluster: ClusterSpec,
                     overlap: Optional[float]) -> tuple[Compute, list[str]]:
    """Compute per sample from the profile's step: less its optimizer step and the collectives it
    left exposed, as its trace measured them (shares of the traced step, applied to the profile's),
    or without a trace, less the synchronization the model gives it on this cluster. A stated
    `overlap` is for the planned runs; the profile's own step is split by what it measured."""
    notes = []
    trace = profile.trace
    optimizer, measured = 0.0, None
    compute_s = profile.step_s
    if trace is not None:
        optimizer = trace.optimizer_s / trace.step_s * profile.step_s
        exposed = trace.exposed_collectives_s / trace.step_s * profile.step_s
        compute_s -= optimizer + exposed
        measured = trace.overlap
        notes.append(f"from the profile's trace ({trace.path.name}, {trace.steps} steps): the optimizer step "
                     f"{optimizer * 1e3:.3g} ms and exposed collectives {exposed * 1e3:.3g} ms of its "
                     f"{profile.step_s * 1e3:.3g} ms step"
                     + (f", {trace.overlap:.0%} of the collectives beside computation" if trace.overlap is not None
                        else ""))
    else:
        notes.append("the optimizer step is inside the profiled compute per sample (trainer.profile_steps "
                     "in the profile's run measures it apart)")
    if profile.world_size > 1 and (trace is None or not trace.collectives_s):
        # The step holds its own synchronization (at its own ZeRO stage and precision), unmeasured:
        # take off what the model gives for it on this cluster.
        profiled_bytes = gradient_bytes(profile.trainable_parameters, profile.precision)
        synced = (1 - (overlap or 0.0)) * gradient_sync_seconds(profiled_bytes, profile.zero_stage,
                                                                profile.world_size, cluster)
        compute_s -= synced
        unseen = " (its trace shows no collectives)" if trace is not None else ""
        notes.append(f"the profile ran on {profile.world_size} workers{unseen}: its step less the modelled "
                     f"synchronization ({synced * 1e3:.3g} ms, assuming it ran on this cluster) is its compute")
    if compute_s <= 0:
        cause = ("its trace's optimizer step and exposed collectives fill it: profile more steps, or check the "
                 "trace in Perfetto" if trace is not None and trace.collectives_s else
                 "the profile did not run on this cluster: profile one worker (scaling.num_workers=1)")
        raise ConfigError(f"--profile {profile.run_dir}: its step ({profile.step_s * 1e3:.3g} ms) leaves no compute "
                          f"after its synchronization and optimizer step ({(profile.step_s - compute_s) * 1e3:.3g} "
                          f"ms); {cause}")
    profiled_gpu = (profile.device or "").partition(" for ")[2]  # "datasheet bf16 for NVIDIA H100 80GB HBM3"
    if profiled_gpu and not same_datasheet_gpu(profiled_gpu, cluster.gpu):
        notes.append(f"the profile ran on {profiled_gpu}, the cluster file's GPU is {cluster.gpu}: the plan holds "
                     "only for the GPU the profile ran on")
    # ZeRO stages 1-3 step each GPU's partition of the optimizer state only.
    whole_optimizer = optimizer * (profile.world_size if profile.zero_stage >= 1 else 1)
    return Compute(compute_s / profile.samples_per_worker, whole_optimizer, measured), notes


def batch_policy(config: Config, kind: str) -> BatchPolicy:
    trainer = config.trainer
    if kind == "global":
        return BatchPolicy("global", trainer.global_batch_size)
    per_gpu, left = divmod(trainer.global_batch_size, config.scaling.num_workers)
    if left:
        raise ConfigError(f"--batch per_gpu: trainer.global_batch_size={trainer.global_batch_size} does not split "
                          f"evenly over scaling.num_workers={config.scaling.num_workers}")
    return BatchPolicy("per_gpu", per_gpu)


def make_plan(config: Config, cluster: ClusterSpec, compute: Profile | Estimate, scaling: Optional[ScalingInput],
              request: PlanRequest) -> dict[str, Any]:
    """The plan as JSON-ready data: inputs, assumptions, one row per GPU count, the fastest and knee counts.
    `compute`: a profile (a measured run), or without one, counted FLOPs at a stated MFU."""
    model, notes = step_model(config, compute, cluster, request.overlap)
    policy = batch_policy(config, request.batch_policy)
    counts = request.gpus or default_gpu_counts(cluster)
    fit = ScalingFit(scaling.min_steps, scaling.critical_batch) if scaling else None
    rows = predict(model, cluster, policy, counts, fit)
    skipped = sorted(set(counts) - {row["gpus"] for row in rows})
    batch = f"the global batch {policy.size}" if policy.kind == "global" else "their global batch"
    if not rows:
        raise ConfigError(f"no GPU count of {', '.join(map(str, counts))} can split {batch} (trainer."
                          f"global_batch_size) into whole micro-batches of trainer.micro_batch_size={model.micro_batch} "
                          "or fewer samples; give --gpus that divide it")
    if skipped:
        notes.append(f"{', '.join(map(str, skipped))} GPUs cannot split {batch} into whole micro-batches "
                     f"(of {model.micro_batch} at most)")
    profiled_micro, whose = ((compute.micro_batch, "the profile's") if isinstance(compute, Profile)
                             else (model.micro_batch, "the configured"))
    smaller = [row["gpus"] for row in rows if row["micro_batch"] < profiled_micro]
    if smaller:
        where = "at every GPU count" if smaller[0] == rows[0]["gpus"] else f"from {smaller[0]} GPUs on"
        notes.append(f"{where}, micro-batches are smaller than {whose} {profiled_micro}: "
                     "compute is taken as linear in the samples, which a GPU at small micro-batches does not reach "
                     "(the plan is optimistic there)")
    if scaling is None:
        notes.append("no --scaling study: no steps or time to a target loss, and no knee")
    else:
        notes.extend(scaling_notes(scaling, rows))
    chosen = knee(rows, request.gpu_hours_tolerance)
    plan = {
        "config": request.config_path, "overrides": request.overrides, "cluster": asdict(cluster),
        "profile": profile_json(compute) if isinstance(compute, Profile) else None,
        "estimate": asdict(compute) if isinstance(compute, Estimate) else None,
        "scaling": {**asdict(scaling), "study_dir": str(scaling.study_dir)} if scaling else None,
        "step_model": asdict(model), "batch_policy": asdict(policy), "gpu_hours_tolerance": request.gpu_hours_tolerance,
        "rows": rows, **chosen, "notes": notes,
    }
    # The knee; without a study, the count with the most throughput.
    pick = chosen["knee_gpus"] or max(rows, key=lambda row: row["samples_per_s"])["gpus"]
    plan["submit"] = submit_line(config, request, cluster, next(row for row in rows if row["gpus"] == pick))
    return plan


def profile_json(profile: Profile) -> dict[str, Any]:
    trace = {**asdict(profile.trace), "path": str(profile.trace.path)} if profile.trace else None
    return {**asdict(profile), "run_dir": str(profile.run_dir), "step_s": profile.step_s, "trace": trace}


def scaling_notes(scaling: ScalingInput, rows: list[dict[str, Any]]) -> list[str]:
    notes = [f"steps to loss {scaling.target_loss} (the study's target) from S(B) = {scaling.min_steps:.4g} "
             f"(1 + {scaling.critical_batch:.4g} / B), fitted for {scaling.optimizer}"]
    if scaling.beyond_measured_batches:
        notes.append("the study found no critical batch within 100x its batches (its steps still fall as 1/B): "
                     "the steps planned at large batches are a lower bound")
    if scaling.measured_batches:
        low, high = scaling.measured_batches[0], scaling.measured_batches[-1]
        outside = sorted({int(row["global_batch"]) for row in rows if not low <= row["global_batch"] <= high})
        if outside:
            notes.append(f"global batches {', '.join(map(str, outside))} lie outside the {low}-{high} the study "
                         "measured: their steps are extrapolated along its fit")
    return notes


def submit_line(config: Config, request: PlanRequest, cluster: ClusterSpec, row: dict[str, Any]) -> str:
    """The `distdl submit slurm` command for one row: its nodes, GPUs per node, workers and batch, and
    a time limit of the predicted time to target plus a fifth and START_UP_S (an hour when there is no
    target)."""
    gpus, nodes = int(row["gpus"]), int(row["nodes"])
    planned = {"scaling.num_workers": gpus, "trainer.micro_batch_size": int(row["micro_batch"]),
               "trainer.gradient_accumulation_steps": int(row["accumulation"]),
               "trainer.global_batch_size": int(row["global_batch"])}
    overrides = [] if request.submit_config else [o for o in request.overrides if o.split("=", 1)[0] not in planned]
    # The row's worker count and batch, so the config checks as the job will run it.
    overrides += [f"{key}={value}" for key, value in planned.items()]
    seconds = 1.2 * row["time_to_target_s"] + START_UP_S if "time_to_target_s" in row else 3600.0
    per_node = gpus // nodes
    words = ["distdl", "submit", "slurm", request.submit_config or request.config_path, *overrides, f"--nodes={nodes}",
             f"--gpus-per-node={per_node}", f"--cpus-per-task={per_node * config.scaling.cpus_per_worker}",
             f"--time={slurm_time(seconds)}"]
    return shlex.join(words)


def slurm_time(seconds: float) -> str:
    """D-HH:MM:SS, rounded up to the minute."""
    minutes = max(1, math.ceil(seconds / 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:00" if days else f"{hours:02d}:{minutes:02d}:00"


def table(plan: dict[str, Any]) -> str:
    """The rows as a markdown table, the fastest and knee counts marked."""
    timed = plan["scaling"] is not None
    head = ["GPUs", "nodes", "global batch", "micro-batch", "accum.", "step (ms)", "samples/s", "efficiency"]
    head += ["steps to target", "time to target", "GPU-hours"] if timed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in plan["rows"]:
        mark = "".join([" (fastest)" if row["gpus"] == plan["fastest_gpus"] else "",
                        " (knee)" if row["gpus"] == plan["knee_gpus"] else ""])
        cells = [f"{row['gpus']}{mark}", str(row["nodes"]), str(row["global_batch"]), str(row["micro_batch"]),
                 str(row["accumulation"]),
                 f"{row['step_s'] * 1e3:.4g}", f"{row['samples_per_s']:.4g}", f"{row['efficiency']:.1%}"]
        if timed:
            cells += [f"{row['steps_to_target']:.4g}", duration(row["time_to_target_s"]), f"{row['gpu_hours']:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def markdown(plan: dict[str, Any]) -> str:
    profile, estimate, cluster = plan["profile"], plan["estimate"], plan["cluster"]
    lines = [f"# Plan for `{plan['config']}` on {cluster['name']}", ""]
    if profile:
        mfu = f", MFU {profile['mfu']:.1%}" if profile["mfu"] is not None else ""
        lines.append(f"- Profile: {profile['run_dir']} ({profile['world_size']} worker(s), {profile['samples_per_s']:.4g} "
                     f"samples/s, median of {profile['windows']} windows{mfu}; "
                     f"{profile['device'] or 'device unknown'})")
    else:
        lines.append(f"- No profile: {estimate['flops_per_sample']:.4g} FLOPs per sample at a stated MFU of "
                     f"{estimate['mfu']:.0%} ({estimate['peak_tflops']:g} TFLOP/s peak per GPU)")
    lines += [f"- Batch policy: {plan['batch_policy']['kind']} ({plan['batch_policy']['size']})"]
    if plan["scaling"]:
        study = plan["scaling"]
        simple = (f", B_simple = {study['noise_scale_batch']:.4g} (the gradient noise scale it measured)"
                  if study["noise_scale_batch"] else "")
        lines.append(f"- Scaling study: {study['study_dir']} ({study['optimizer']}: S_min = {study['min_steps']:.4g}, "
                     f"B_crit = {study['critical_batch']:.4g}{simple})")
    lines += ["", table(plan), ""]
    if plan["fastest_gpus"] is not None:
        lines.append(f"**Fastest to the target:** {plan['fastest_gpus']} GPUs. **Knee:** {plan['knee_gpus']} GPUs, "
                     f"the most whose GPU-hours stay within {plan['gpu_hours_tolerance']:.0%} of the least.")
        lines.append("")
    lines += ["To submit:", "", "    " + plan["submit"], ""]
    lines += ["Assumed:", "", *[f"- {note}" for note in plan["notes"]], ""]
    return "\n".join(lines)


def write_plan(plan: dict[str, Any], out_dir: Path, config: Config, training_file: Optional[Path] = None) -> dict[str, Path]:
    """plan.json, plan.md and plan.png in `out_dir`, and the planned training config where the submit
    line names one (`training_file`: CONFIG was a study file)."""
    import yaml

    from distdl.planning.plots import plot_plan

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "plan.json", "markdown": out_dir / "plan.md"}
    if training_file is not None:
        training_file.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        written["training"] = training_file
    written["json"].write_text(json.dumps(plan, indent=2) + "\n")
    written["markdown"].write_text(markdown(plan))
    written["plot"] = plot_plan(plan, out_dir / "plan.png")
    return written
