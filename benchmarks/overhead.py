"""What does distdl cost? Training throughput and start-up time against bare baselines.

One process starts one local Ray instance and trains the same tiny BERT masked-LM
(model preset tiny, corpus /usr/share/common-licenses, sequence length 128, the same
micro batch, one torch thread per worker, fp32, the same ZeRO stage) four ways:

  distdl_1w  distdl's real path, distdl.driver.train(load_config(...), connect_ray), 1 Ray worker
  distdl_2w  the same with 2 Ray workers
  bare_2w    a hand-written Ray Train + DeepSpeed loop with 2 workers (benchmarks/bare_loop.py):
             no checkpoints, logging, metrics, evaluation or LR schedule
  plain_1p   a plain single-process PyTorch loop (no Ray, no DeepSpeed), torch.set_num_threads(1)

ratio_vs_bare = distdl_2w / bare_2w is what distdl's own loop costs (per-step metrics,
tracking, logging) on top of Ray Train + DeepSpeed; ratio_vs_plain = distdl_1w / plain_1p
is what the whole stack (Ray Train, DeepSpeed engine with ZeRO, distdl) costs on one
worker, where no gradients need to be exchanged.

All four use one WordPiece tokenizer, trained once (untimed) before the first setup
and passed to distdl as tokenizer.name_or_path, so they train on identical blocks with
identically sized models; that untimed step also fills the tokenization cache.
distdl runs with eval_every=0 and checkpoint_every=0, so its one evaluation and
checkpoint come after the last step, outside every timed window.

Throughput is measured the same way for every setup: samples per second over the
steady-state steps skip+1..steps (the first `skip` steps are warm-up), timed inside
the training loop with time.perf_counter on rank 0. For distdl these are the
samples_per_s of its metrics.jsonl windows (distdl logs every `skip` steps, timing
each window with perf_counter), combined over every window but the first as
total samples / total time.

Start-up is measured as wall time (time.time) from the moment the setup is called on
the driver (for distdl: distdl.driver.train(); for the bare loop: the driver's data
preparation, which mirrors distdl's workload.prepare, then TorchTrainer.fit()):
  seconds_to_first_step   until step `skip` (distdl's first logged step) has finished:
                          start-up plus `skip` warm-up steps. distdl records no wall time
                          per step, so this is the write time (mtime) of the first line of
                          metrics.jsonl, which a watcher thread catches before the second
                          line is written; the bare loop records the same moment itself.
  seconds_to_loop_start   until the first step starts: for distdl, seconds_to_first_step
                          minus the first window's duration (its samples / samples_per_s).
The bare loop also reports the exact end of step 1 (details.bare_2w[i].seconds_to_step_1).

On a shared machine, --repeats N runs all setups N times round-robin and reports the
median of each measure; details holds every repeat's raw numbers (with distdl's
per-window samples/s).

Usage: .venv/bin/python benchmarks/overhead.py --out /tmp/overhead.json [--steps 60] [--micro-batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bare_loop

SETUPS = ("distdl_1w", "distdl_2w", "bare_2w", "plain_1p")
SEED = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per setup (a multiple of --skip)")
    parser.add_argument("--skip", type=int, default=10,
                        help="warm-up steps left out of the throughput (also distdl's trainer.log_every)")
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per worker per step")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2), help="ZeRO stage, distdl and bare")
    parser.add_argument("--config", type=Path, default=REPO / "configs/bert/pretrain_tiny.yaml")
    parser.add_argument("--corpus", default="/usr/share/common-licenses")
    parser.add_argument("--num-cpus", type=int, default=4,
                        help="logical CPUs of the local Ray (two 1-CPU workers plus Ray Train's controller)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run all setups this many times, round-robin, and report medians (a noisy machine)")
    parser.add_argument("--only", nargs="+", choices=SETUPS, default=list(SETUPS), help="run only these setups")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    args = parser.parse_args()
    if args.steps <= args.skip or args.steps % args.skip:
        parser.error(f"--steps={args.steps} must be a multiple of --skip={args.skip} and larger than it")
    return args


# ----------------------------------------------------------------------------- shared data


def data_spec(args: argparse.Namespace, tokenizer: Path | None, run_dir: Path) -> dict[str, Any]:
    """What bare_loop.load_shard needs: the data and tokenizer sections of the distdl runs.

    tokenizer=None trains a WordPiece vocabulary into run_dir/tokenizer (done once, untimed);
    every setup then uses that one, so all train on identical token blocks and model sizes.
    """
    return {"data": {"path": args.corpus, "max_seq_length": 128},
            "tokenizer": {"name_or_path": str(tokenizer) if tokenizer else None, "vocab_size": 8000},
            "run_dir": str(run_dir), "seed": SEED}


def prepare_data(spec: dict[str, Any]) -> None:
    """Driver-side tokenizer loading (or training) and tokenization into the datasets cache, as distdl's prepare."""
    from distdl.data import text

    data = text.TextDataSection(**spec["data"])
    raw = text.load_raw_corpus(data)
    tokenizer = text.prepare_tokenizer(raw, text.TokenizerSection(**spec["tokenizer"]), Path(spec["run_dir"]))
    text.tokenized_blocks(raw, tokenizer, data, spec["seed"])


# ----------------------------------------------------------------------------- distdl


class FirstLineWatcher(threading.Thread):
    """Catches the moment rank 0 writes the first line of metrics.jsonl (the file's mtime then)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.written_at, self.done = path, None, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                stat = self.path.stat()
                if stat.st_size > 0:  # one write() per line, so the first line is whole
                    self.written_at = stat.st_mtime
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.02)


def run_distdl(args: argparse.Namespace, workers: int, storage: Path, tokenizer: Path) -> dict[str, Any]:
    from distdl.cluster.connect import connect_ray
    from distdl.config import load_config
    from distdl.driver import train
    from distdl.rundir import read_metrics

    name = f"distdl_{workers}w"
    config = load_config(args.config, [
        f"run.name={name}", f"run.storage_path={storage}", f"run.seed={SEED}",
        f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1", "scaling.use_gpu=false",
        f"engine.zero_stage={args.zero_stage}", "engine.precision=fp32",
        f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.micro_batch * workers}",  # no gradient accumulation
        f"trainer.log_every={args.skip}",
        # Evaluation and checkpoints then happen only after the last step, outside every timed window.
        "trainer.eval_every=0", "trainer.checkpoint_every=0",
        f"model.preset={getattr(args, 'preset', 'tiny')}", f"data.path={args.corpus}", "data.max_seq_length=128",
        f"tokenizer.name_or_path={tokenizer}", "tracking.wandb_mode=disabled", "tracking.progress_bar=false",
        *getattr(args, "extra_overrides", ()),
    ])
    watcher = FirstLineWatcher(config.run_dir / "metrics.jsonl")
    watcher.start()
    started = time.time()
    summary = train(config, connect_ray)
    watcher.done.set()
    if not summary.get("completed"):
        raise RuntimeError(f"{name} did not complete: {summary}")
    metrics = read_metrics(config.run_dir)
    per_step = args.micro_batch * workers
    windows, previous = [], 0
    for record in metrics:
        if "samples_per_s" in record:
            samples = (record["step"] - previous) * per_step
            windows.append({"step": record["step"], "samples": samples, "seconds": samples / record["samples_per_s"]})
            previous = record["step"]
    if windows[0]["step"] != args.skip:
        raise RuntimeError(f"{name}: first logged step is {windows[0]['step']}, expected {args.skip}")
    steady = windows[1:]
    result = {"samples_per_s": sum(w["samples"] for w in steady) / sum(w["seconds"] for w in steady),
              "timed_steps": args.steps - args.skip,
              "window_samples_per_s": [round(w["samples"] / w["seconds"], 2) for w in windows],
              "final_loss": summary["final"].get("loss"), "total_wall_s": time.time() - started}
    if watcher.written_at is not None:
        result["seconds_to_first_step"] = watcher.written_at - started
        result["seconds_to_loop_start"] = result["seconds_to_first_step"] - windows[0]["seconds"]
    return result


# ----------------------------------------------------------------------------- bare Ray Train + DeepSpeed


def run_bare(args: argparse.Namespace, workers: int, storage: Path, tokenizer: Path) -> dict[str, Any]:
    import bare_loop
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = storage / f"bare_{workers}w"
    run_dir.mkdir(parents=True)
    spec = {**data_spec(args, tokenizer, run_dir), "threads": 1, "micro_batch": args.micro_batch,
            "zero_stage": args.zero_stage, "steps": args.steps, "skip": args.skip,
            "result_file": str(run_dir / "result.json")}
    started = time.time()
    prepare_data(spec)
    TorchTrainer(
        bare_loop.train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bare_{workers}w", storage_path=str(storage / "ray")),
    ).fit()
    out = json.loads((run_dir / "result.json").read_text())
    marks = out.pop("marks")
    return {**out, "total_wall_s": time.time() - started,
            "seconds_to_first_step": marks[f"step_{args.skip}"] - started,
            "seconds_to_loop_start": marks["loop_start"] - started,
            "seconds_to_step_1": marks["step_1"] - started}


# ----------------------------------------------------------------------------- plain PyTorch


def run_plain(args: argparse.Namespace, storage: Path, tokenizer: Path) -> dict[str, Any]:
    import bare_loop
    import torch
    from transformers import DataCollatorForLanguageModeling

    spec = data_spec(args, tokenizer, storage / "plain")
    prepare_data(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer, shard = bare_loop.load_shard(spec, rank=0, world_size=1)
        torch.manual_seed(SEED)
        model = bare_loop.build_model(tokenizer, 128)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        torch.manual_seed(SEED + 1)
        data = bare_loop.batches(shard, args.micro_batch, DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15), 0)
        model.train()
        for step in range(1, args.steps + 1):
            loss = model(**next(data)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as DeepSpeed's gradient_clipping
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == args.skip:
                timed_from = time.perf_counter()
        elapsed = time.perf_counter() - timed_from
    finally:
        torch.set_num_threads(threads)
    return {"samples_per_s": (args.steps - args.skip) * args.micro_batch / elapsed,
            "timed_steps": args.steps - args.skip, "final_loss": loss.item()}


# ----------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="distdl-overhead-") as tmp:
        storage = Path(tmp)
        # A private datasets cache, as the tests use; Ray's workers get the driver's environment.
        os.environ.setdefault("HF_DATASETS_CACHE", str(storage / "hf-datasets"))
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(key, "1")
        os.environ.setdefault("WANDB_SILENT", "true")
        import ray
        import ray.train.torch  # noqa: F401  (imported before any timing)

        from distdl.cluster.connect import FORWARDED_ENV

        # Untimed: train the one tokenizer, fill the tokenization cache and import the data stack.
        prepare_data(data_spec(args, None, storage))
        tokenizer = storage / "tokenizer"
        env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=args.verbose,
                 runtime_env={"env_vars": env_vars})
        results: dict[str, list[dict[str, Any]]] = {setup: [] for setup in args.only}
        try:
            for repeat in range(1, args.repeats + 1):  # round-robin, so slow phases of a shared machine hit all
                for setup in args.only:
                    print(f"overhead: running {setup} ({repeat}/{args.repeats}) ...", flush=True)
                    name = f"{setup}_r{repeat}"
                    if setup.startswith("distdl_"):
                        result = run_distdl(args, int(setup[len("distdl_"):-1]), storage / name, tokenizer)
                    elif setup.startswith("bare_"):
                        result = run_bare(args, int(setup[len("bare_"):-1]), storage / name, tokenizer)
                    else:
                        result = run_plain(args, storage / name, tokenizer)
                    results[setup].append(result)
                    print(f"overhead: {setup}: {result['samples_per_s']:.1f} samples/s", flush=True)
        finally:
            ray.shutdown()
    report = summarize(args, results)
    print_table(report)
    if args.out:
        write_results(args.out, report)
        print(f"overhead: wrote {args.out}")


def summarize(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per setup, the median over the repeats of each measure (with one repeat: its value)."""

    def median(key: str) -> dict[str, float]:
        return {name: statistics.median(r[key] for r in runs) for name, runs in results.items()
                if runs and all(key in r for r in runs)}

    rate = median("samples_per_s")

    def ratio(a: str, b: str) -> float | None:
        return rate[a] / rate[b] if a in rate and b in rate else None

    return {
        "samples_per_s": rate,
        "ratio_vs_bare": ratio("distdl_2w", "bare_2w"),
        "ratio_vs_plain": ratio("distdl_1w", "plain_1p"),
        "seconds_to_first_step": median("seconds_to_first_step"),
        "seconds_to_loop_start": median("seconds_to_loop_start"),
        "settings": {"steps": args.steps, "skip": args.skip, "micro_batch": args.micro_batch, "repeats": args.repeats,
                     "zero_stage": args.zero_stage, "seq_len": 128, "precision": "fp32", "threads_per_worker": 1,
                     "model_preset": "tiny", "corpus": args.corpus, "ray_num_cpus": args.num_cpus,
                     "machine_cpus": os.cpu_count()},
        "definitions": {
            "samples_per_s": f"global samples / rank-0 perf_counter seconds over steps {args.skip + 1}..{args.steps}; "
                             "distdl: combined over its metrics.jsonl windows after the first",
            "seconds_to_first_step": f"wall seconds from calling the setup's driver until step {args.skip} "
                                     "(distdl's first logged step) has finished",
            "seconds_to_loop_start": "wall seconds from calling the setup's driver until step 1 starts "
                                     "(distdl: seconds_to_first_step minus the first window's duration)",
            "details": "every repeat's raw measurements, per setup",
            "ratio_vs_bare": "distdl_2w / bare_2w", "ratio_vs_plain": "distdl_1w / plain_1p",
        },
        "details": results,
    }


def print_table(report: dict[str, Any]) -> None:
    first, start = report["seconds_to_first_step"], report["seconds_to_loop_start"]

    def cell(value: float | None, fmt: str) -> str:
        width = fmt.split(".")[0]
        return format(value, fmt) if value is not None else format("-", f">{width or 0}")

    skip = report["settings"]["skip"]
    print(f"\n{'setup':<11}{'samples/s':>11}{'to loop start s':>17}{f'to step {skip} s':>15}")
    for name, value in report["samples_per_s"].items():
        print(f"{name:<11}{value:>11.1f}{cell(start.get(name), '17.1f')}{cell(first.get(name), '15.1f')}")
    for key in ("ratio_vs_bare", "ratio_vs_plain"):
        print(f"{key:<15} {cell(report[key], '.3f')}   ({report['definitions'][key]})")


if __name__ == "__main__":
    main()
