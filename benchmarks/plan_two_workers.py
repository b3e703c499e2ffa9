"""`distdl plan` against measurements on this machine, in one benchmark run.

1. **Throughput.** For each config, `--repeats` times: two 1-worker runs (the profiles) and a
   2-worker run at the same global batch. The plan predicts the 2-worker samples/s from each
   profile and a cluster of two gloo processes whose links are the all-reduce fit of
   `benchmarks/allreduce_gloo.py`; the error is against the measured 2-worker run (median of its
   logged windows after the first, as the profile's). One profile has the machine to itself; the
   other is held to one core with everything it starts (Ray's processes too), the share of the
   machine each of the 2 workers has, as a GPU worker on a cluster node has its share of the
   node's CPUs.
2. **A control for the first: compute side by side.** The tiny BERT's forward, backward and AdamW
   step, timed in one process alone and in two processes at once (one thread each, no
   communication): how much two workers slow each other on these 2 cores, which no
   interconnect model holds.
3. **The synchronization traced.** The tiny BERT at ZeRO-2 on 2 workers with steps 4-5 traced on
   each rank: the time its collectives took (and the part beside no computation) against the ring
   formula's synchronization time of the throughput runs.
4. **Steps to a target loss at a batch the study did not run.** A scaling study of the digits MLP
   fits S(B) = S_min (1 + B_crit / B) at two batches; a second study runs a batch between them; the
   fit's S at that batch is compared with the mean steps its seeds took.

    .venv/bin/python benchmarks/plan_two_workers.py [--out benchmarks/results/plan_two_workers_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from provenance import write_results  # noqa: E402

from distdl.config import config_from_dict, load_config  # noqa: E402
from distdl.planning.cluster import ClusterSpec, Link  # noqa: E402
from distdl.planning.inputs import read_profile, read_scaling  # noqa: E402
from distdl.planning.model import steps_to_target  # noqa: E402
from distdl.planning.plan import PlanRequest, make_plan  # noqa: E402
from distdl.planning.trace import read_step_trace  # noqa: E402
from distdl.profiling import trace_files  # noqa: E402

CORPUS = "/usr/share/common-licenses"
QUIET = ["tracking.wandb_mode=disabled", "tracking.progress_bar=false", "trainer.eval_every=0",
         "trainer.checkpoint_every=0"]
BERT = ("configs/bert/pretrain_tiny.yaml", [f"data.path={CORPUS}", "trainer.max_steps=60", "trainer.log_every=6",
                                            "trainer.micro_batch_size=16", "trainer.global_batch_size=32",
                                            "data.max_seq_length=128", *QUIET])
# (name, config, overrides): each trained on 1 and on 2 workers.
CASES = [
    ("tiny BERT, ZeRO-0", *BERT, ["engine.zero_stage=0"]),
    ("tiny BERT, ZeRO-2", *BERT, ["engine.zero_stage=2"]),
    ("tiny BERT, ZeRO-2, seq 32", *BERT, ["engine.zero_stage=2", "data.max_seq_length=32"]),
    ("ResNet-20 on CIFAR-10 shapes", "configs/resnet/cifar10_resnet56.yaml",
     ["model.name=cifar_resnet20", "data.dataset=synthetic", "data.synthetic_train_size=2048",
      "data.synthetic_eval_size=64", "data.loader_workers=0", "trainer.epochs=null", "trainer.max_steps=40",
      "trainer.log_every=5", "trainer.micro_batch_size=32", "trainer.global_batch_size=64",
      "scaling.use_gpu=false", *QUIET], []),
]
STUDY = ["data.dataset=digits", "model.hidden_sizes=[32]", "optimizer.lr=0.05", "trainer.log_every=2",
         "study.workers=[1]", "study.throughput_kinds=[strong]", "study.throughput_steps=4",
         "study.strong_batch_size=16", "study.target_loss=1.0", "study.max_steps=400", "study.seeds=[0,1,2]",
         "tracking.wandb_mode=disabled"]


def distdl(*args: str, cores: Optional[set[int]] = None) -> None:
    """A distdl command; `cores`: the CPU cores it and every process it starts (Ray's too) may use."""
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    done = subprocess.run([sys.executable, "-m", "distdl.cli", *args], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=pin)
    if done.returncode:
        raise SystemExit(f"distdl {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def gloo_cluster() -> ClusterSpec:
    fit = json.loads((REPO / "benchmarks/results/allreduce_gloo_cpu.json").read_text())["fit"]
    link = Link(fit["bandwidth_gb_s"], fit["latency_us"])
    return ClusterSpec(gpu="cpu", gpus_per_node=2, intra_node=link, inter_node=link, name="two-gloo-processes",
                       max_nodes=1, peak_tflops=0.1)


def measured_samples_per_s(run_dir: Path) -> float:
    rates = [json.loads(line).get("samples_per_s") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([rate for rate in rates if rate][1:])


def throughput_case(name: str, config: str, common: list[str], extra: list[str], storage: Path,
                    tokenizer: list[str], repeats: int) -> dict:
    """`repeats` sets of runs, each predicted and measured on its own: their spread is the machine's noise."""
    pairs = [prediction_pair(name, config, [*common, *extra], storage, tokenizer, repeat) for repeat in range(repeats)]
    return {"case": name, "pairs": pairs,
            **{f"median_error_{label}": statistics.median(pair[label]["error"] for pair in pairs)
               for label in ("alone", "one_core")}}


def prediction_pair(name: str, config: str, common: list[str], storage: Path, tokenizer: list[str],
                    repeat: int) -> dict:
    """Two profiles, one measurement: 1 worker with the machine to itself, 1 worker held to one core
    (its share, as each of the 2 workers has), then 2 workers."""
    runs = {}
    for label, workers, cores in (("alone", 1, None), ("one_core", 1, {0}), ("measured", 2, None)):
        run_name = f"{name.replace(' ', '_').replace(',', '')}-r{repeat}-{label}"
        vocabulary = tokenizer if "BERT" in name else []
        overrides = [*common, *vocabulary, f"run.storage_path={storage}", f"run.name={run_name}",
                     f"scaling.num_workers={workers}"]
        distdl("train", config, *overrides, cores=cores)
        runs[label] = (storage / run_name, overrides)
    planned = load_config(REPO / config, runs["measured"][1])
    measured = measured_samples_per_s(runs["measured"][0])
    pair = {"measured_samples_per_s": measured, "measured_step_s": planned.trainer.global_batch_size / measured}
    for label in ("alone", "one_core"):
        profile = read_profile(runs[label][0], planned)
        plan = make_plan(planned, gloo_cluster(), profile, None, PlanRequest(config, runs["measured"][1], gpus=[1, 2]))
        predicted = next(row for row in plan["rows"] if row["gpus"] == 2)
        pair[label] = {"profile_samples_per_s": profile.samples_per_s, "predicted_samples_per_s":
                       predicted["samples_per_s"], "predicted_step_s": predicted["step_s"],
                       "error": predicted["samples_per_s"] / measured - 1}
    sync = predicted["step_s"] - plan["step_model"]["compute_per_sample_s"] * (predicted["global_batch"] // 2)
    pair.update(trainable_parameters=profile.trainable_parameters, modelled_sync_s=sync)
    return pair


def traced_case(storage: Path, tokenizer: list[str]) -> dict:
    """The tiny BERT at ZeRO-2 on 2 workers, steps 4-5 traced on each rank: what its collectives took
    against the ring formula's synchronization time."""
    name, config, common, extra = CASES[1]
    distdl("train", config, *common, *extra, *tokenizer, f"run.storage_path={storage}", "run.name=traced",
           "scaling.num_workers=2", "trainer.profile_steps=[4,5]")
    ranks = []
    for rank in (0, 1):
        trace = read_step_trace(trace_files(storage / "traced", rank=rank)[-1])
        ranks.append({"rank": rank, "steps": trace.steps, "step_s": trace.step_s, "collectives_s": trace.collectives_s,
                      "exposed_collectives_s": trace.exposed_collectives_s, "optimizer_s": trace.optimizer_s})
    return {"case": name, "profile_steps": [4, 5], "ranks": ranks}


def timed_steps(barrier, steps: int, queue) -> None:
    """One process: the tiny BERT's training steps on one thread, timed after a warm-up and a barrier."""
    import time

    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                       intermediate_size=512, vocab_size=2000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 2000, (16, 128))

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    if barrier is not None:
        barrier.wait()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    queue.put(time.perf_counter() - started)


def side_by_side_control(steps: int = 30) -> dict:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()

    def run(processes: int) -> list[float]:
        barrier = context.Barrier(processes)
        started = [context.Process(target=timed_steps, args=(barrier, steps, queue)) for _ in range(processes)]
        for process in started:
            process.start()
        times = [queue.get() for _ in started]
        for process in started:
            process.join()
        return times

    alone, together = run(1), run(2)
    return {"steps": steps, "alone_s": alone, "side_by_side_s": together,
            "slowdown": statistics.mean(together) / alone[0]}


def steps_case(storage: Path) -> dict:
    distdl("study", "scaling", "configs/studies/scaling.yaml", *STUDY, "study.batch_sizes=[16,64]",
           "study.name=fit", f"run.storage_path={storage}")
    distdl("study", "scaling", "configs/studies/scaling.yaml", *STUDY, "study.batch_sizes=[32]",
           "study.name=held_out", f"run.storage_path={storage}")
    # The held-out study's own training config is the one planned: same model and data as the fit's.
    planned = config_from_dict(yaml.safe_load((storage / "held_out/study.yaml").read_text())["training"])
    fit = read_scaling(storage / "fit", planned)
    fit_results = json.loads((storage / "fit/results.json").read_text())
    held = json.loads((storage / "held_out/results.json").read_text())
    steps = [row["steps_to_target"] for row in held["entries"]]
    predicted = steps_to_target(32, fit.min_steps, fit.critical_batch)
    return {"fitted_batches": fit.measured_batches, "min_steps": fit.min_steps, "critical_batch_size":
            fit.critical_batch, "batch": 32, "predicted_steps": predicted, "measured_steps": steps,
            "measured_mean": statistics.mean(steps), "error": predicted / statistics.mean(steps) - 1,
            "fitted_runs": [{key: row[key] for key in ("batch_size", "seed", "steps_to_target")}
                            for row in fit_results["entries"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/plan_two_workers_cpu.json"))
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (1 worker, 2 workers) per config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distdl-plan-bench-") as tmp:
        storage = Path(tmp)
        results = {"cluster": dataclasses.asdict(gloo_cluster()), "side_by_side_control": side_by_side_control(),
                   "throughput": [], "traced": None, "steps_to_target": None}
        control = results["side_by_side_control"]
        print(f"control: tiny BERT steps take x{control['slowdown']:.3g} as long in two processes at once as in "
              "one alone", flush=True)
        tokenizer: list[str] = []
        for name, config, common, extra in CASES:
            case = throughput_case(name, config, common, extra, storage, tokenizer, args.repeats)
            results["throughput"].append(case)
            shown = "; ".join(f"measured {pair['measured_samples_per_s']:.4g}, predicted from a profile alone "
                              f"{pair['alone']['predicted_samples_per_s']:.4g} ({pair['alone']['error']:+.1%}), "
                              f"on one core {pair['one_core']['predicted_samples_per_s']:.4g} "
                              f"({pair['one_core']['error']:+.1%})" for pair in case["pairs"])
            print(f"{name}, samples/s on 2 workers: {shown}", flush=True)
            if "BERT" in name and not tokenizer:  # WordPiece training is not deterministic: one vocabulary for all
                first = name.replace(" ", "_").replace(",", "") + "-r0-alone"
                tokenizer = [f"tokenizer.name_or_path={storage / first / 'tokenizer'}"]
        traced = results["traced"] = traced_case(storage, tokenizer)
        print("traced, 2 workers, ZeRO-2: collectives " + ", ".join(
            f"rank {rank['rank']} {rank['collectives_s'] * 1e3:.1f} ms ({rank['exposed_collectives_s'] * 1e3:.1f} "
            f"exposed) of a {rank['step_s'] * 1e3:.0f} ms step" for rank in traced["ranks"]), flush=True)
        steps = results["steps_to_target"] = steps_case(storage)
        print(f"steps to loss 1.0 at batch 32: predicted {steps['predicted_steps']:.1f} from the fit at 16 and 64, "
              f"measured {steps['measured_steps']} (mean {steps['measured_mean']:.1f}; {steps['error']:+.1%})")
    write_results(Path(args.out), results)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
