"""The figures the docs quote from benchmarks/results/, each pinned to its results file.

A pin is (doc, results file, render): `render(record)` gives the text as the doc must show it,
with its neighbours, so that a figure is pinned where it stands. tests/unit/test_results_files.py
checks that every rendering is in its doc. After a benchmark is rerun,

    .venv/bin/python -m tests.helpers.doc_figures HEAD

replaces each figure rendered from the file at HEAD with the one rendered from the file in the
working tree; prose that interprets the figures still needs reading again.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import re
import statistics
import subprocess
import sys
from typing import Any, Callable, Optional

from tests.helpers.shared import REPO

Render = Callable[[dict[str, Any]], str]


def per_round_efficiency(record: dict[str, Any], setup: str) -> list[float]:
    """Each round's efficiency; the docs speak of two rounds, so another count renders nothing they hold."""
    details = record["details"]
    assert len(details[setup]) == 2, f"{len(details[setup])} rounds"
    return [two["samples_per_s"] / (2 * one["samples_per_s"]) for one, two in zip(details["1w"], details[setup])]


def mib(value: float) -> str:
    return f"{value:,.0f} MiB"


def slower_two_cpu_run(record: dict[str, Any]) -> float:
    return min(run["tokens_per_s"] for run in record["runs"] if run["ray_cpus"] == 2)


def ratio_range(ratios: list[float]) -> str:
    low, high = f"{min(ratios):.2f}", f"{max(ratios):.2f}"
    return low if low == high else f"{low}-{high}"


def peak_rss(record: dict[str, Any], checkpointing: str, rank: int) -> float:
    """A rank's peak resident memory; the GAN records it per network, both the process's."""
    memory = record["runs"][checkpointing]["memory_per_rank"][rank]
    return memory["generator"]["peak_rss_mib"] if "generator" in memory else memory["peak_rss_mib"]


CHECKPOINTING = ("activation_checkpointing_cpu.json", "activation_checkpointing_gan_cpu.json")


BENCH = "docs/benchmarks.md"
PREPARATION = "docs/data-preparation.md"
PLAN = "docs/plan.md"
SWEEPS = "docs/sweeps.md"
PINS: list[tuple[str, str, Render]] = [
    # overhead.py
    (BENCH, "overhead_cpu.json", lambda r: f"| distdl, 1 worker | {r['samples_per_s']['distdl_1w']:.1f} | "
                                           f"{r['seconds_to_first_step']['distdl_1w']:.1f} (includes"),
    (BENCH, "overhead_cpu.json", lambda r: f"| distdl, 2 workers | {r['samples_per_s']['distdl_2w']:.1f} | "
                                           f"{r['seconds_to_first_step']['distdl_2w']:.1f} |"),
    (BENCH, "overhead_cpu.json", lambda r: f"(`benchmarks/bare_loop.py`) | {r['samples_per_s']['bare_2w']:.1f} | "
                                           f"{r['seconds_to_first_step']['bare_2w']:.1f} |"),
    (BENCH, "overhead_cpu.json", lambda r: f"| plain single-process PyTorch loop | {r['samples_per_s']['plain_1p']:.1f} |"),
    (BENCH, "overhead_cpu.json", lambda r: f"distdl / bare loop (2 workers each): **{r['ratio_vs_bare']:.2f}**; "
                                           f"distdl 1 worker / plain loop: **{r['ratio_vs_plain']:.2f}**"),
    (BENCH, "overhead_cpu.json", lambda r: f"(medians of {r['settings']['repeats']} rounds; samples/s over steps "
                                           f"{r['settings']['skip'] + 1}-{r['settings']['steps']})"),
    # scaling.py
    (BENCH, "scaling_cpu.json", lambda r: f"| 1 worker | {r['samples_per_s']['1w']:.1f} | - |"),
    (BENCH, "scaling_cpu.json", lambda r: "between rounds of one: {:.1f} and {:.1f} samples/s for 1 worker".format(
        *(run["samples_per_s"] for run in r["details"]["1w"]))),
    (BENCH, "scaling_cpu.json", lambda r: "(DeepSpeed's default, and distdl's on CPU workers) | "
     f"{r['samples_per_s']['2w_overlap_off']:.1f} | **{r['efficiency']['2w_overlap_off']:.2f}** "
     "({:.2f} and {:.2f} in the two rounds) |".format(*per_round_efficiency(r, "2w_overlap_off"))),
    (BENCH, "scaling_cpu.json", lambda r: "(distdl's default on GPU workers) | "
     f"{r['samples_per_s']['2w_overlap_on']:.1f} | {r['efficiency']['2w_overlap_on']:.2f} "
     "({:.2f} and {:.2f}) |".format(*per_round_efficiency(r, "2w_overlap_on"))),
    # offload_adam.py
    (BENCH, "offload_adam_cpu.json", lambda r: f"BERT-base ({r['parameters'] / 1e6:.1f}M) with the same gradients, "
                                               f"all optimizers round-robin in one invocation, {r['threads']} threads, "
                                               f"medians of {len(r['step_s']['torch_adamw'])} rounds"),
    (BENCH, "offload_adam_cpu.json", lambda r: f"before) | {r['median_step_s']['torch_adamw'] * 1e3:.0f} ms | 1.00 |"),
    (BENCH, "offload_adam_cpu.json", lambda r: f"as Accelerate's) | {r['median_step_s']['deepspeed_cpu_adam'] * 1e3:.0f} "
                                               f"ms | **{r['speedup_over_torch_adamw']['deepspeed_cpu_adam']:.1f}x** |"),
    (BENCH, "offload_adam_cpu.json", lambda r: f"on CPU | {r['median_step_s']['torch_adamw_fused'] * 1e3:.0f} ms | "
                                               f"{r['speedup_over_torch_adamw']['torch_adamw_fused']:.1f}x |"),
    # activation_checkpointing.py
    *[(BENCH, name, lambda r, rank=rank: f"| peak resident memory, rank {rank} | {mib(peak_rss(r, 'off', rank))} | "
       f"{mib(peak_rss(r, 'on', rank))} | **{r['peak_memory_ratio_on_to_off'][rank]:.2f}** |")
      for name in CHECKPOINTING for rank in (0, 1)],
    *[(BENCH, name, lambda r, digits=digits: f"| samples/s | {r['runs']['off']['samples_per_s']:.{digits}f} | "
       f"{r['runs']['on']['samples_per_s']:.{digits}f} | **{r['samples_per_s_ratio_on_to_off']:.2f}** |")
      for name, digits in zip(CHECKPOINTING, (2, 1))],
    ("docs/performance.md", "activation_checkpointing_cpu.json",
     lambda r: f"{r['peak_memory_ratio_on_to_off'][0]:.2f}x, at {r['samples_per_s_ratio_on_to_off']:.2f}x the samples/s"),
    ("docs/performance.md", "activation_checkpointing_gan_cpu.json",
     lambda r: f"{ratio_range(r['peak_memory_ratio_on_to_off'])}x, at {r['samples_per_s_ratio_on_to_off']:.2f}x"),
    # optimizer_step.py
    (BENCH, "optimizer_step_cpu.json", lambda r: f"MiniLM-L6's {r['parameters'] / 1e6:.1f}M parameters, "
     f"{r['threads']} threads, the median of {len(r['step_ms_each']['adamw_fused'])} interleaved rounds: distdl's "
     f"LAMB {r['step_ms_median']['distdl_lamb']:.1f} ms and timm's {r['step_ms_median']['timm_lamb']:.1f} ms "
     f"(**{r['ratios']['distdl_lamb_to_timm_lamb']:.2f}x**); distdl's LARS {r['step_ms_median']['distdl_lars']:.1f} ms "
     f"and timm's {r['step_ms_median']['timm_lars']:.1f} ms (**{r['ratios']['distdl_lars_to_timm_lars']:.2f}x**); "
     f"torch's fused AdamW {r['step_ms_median']['adamw_fused']:.1f} ms and fused SGD "
     f"{r['step_ms_median']['sgd_fused']:.1f} ms"),
    # compile.py
    *[(BENCH, "compile_cpu.json", lambda r, model=model, label=label: f"| {label}, samples/s | "
       f"{r['models'][model]['eager']['samples_per_s']:.1f} | {r['models'][model]['compiled']['samples_per_s']:.1f} | "
       f"**{r['models'][model]['samples_per_s_ratio_compiled_to_eager']:.2f}** | "
       f"{r['models'][model]['compiled']['compile_s']:.1f} |")
      for model, label in (("bert_tiny", "tiny BERT"), ("resnet20", "ResNet-20"))],

    # elastic_resume.py
    (BENCH, "elastic_resume_cpu.json", lambda r: f"2 ZeRO partitions) | {r['checkpoint_mib']:,.0f} MiB |"),
    (BENCH, "elastic_resume_cpu.json", lambda r: f"written beside it | {r['universal_mib']:,.0f} MiB |"),
    (BENCH, "elastic_resume_cpu.json", lambda r: f"(`torch.load`) | {r['read_checkpoint_s']:.2f} s |"),
    (BENCH, "elastic_resume_cpu.json", lambda r: f"| conversion | {r['convert_s']:.1f} s, "
                                                 f"**{r['convert_to_read_ratio']:.1f}x** the read |"),
    (BENCH, "elastic_resume_cpu.json", lambda r: "(about 4 GB with Adam's state) would take about {:.0f} s at this "
     "machine's rate".format(4e9 / (r["checkpoint_mib"] * 2**20) * r["convert_s"])),
    # prepare_scaling.py
    *[(doc, "prepare_scaling_cpu.json", lambda r: f"{r['corpus_mb']:.1f} MB of text: this Python's standard library "
       f"sources, {r['lines'] / 1e6:.2f} million non-empty lines") for doc in (BENCH, PREPARATION)],
    (BENCH, "prepare_scaling_cpu.json", lambda r: f"blocks, for {r['tokens'] / 1e6:.1f} million tokens"),
    (PREPARATION, "prepare_scaling_cpu.json", lambda r: f"giving {r['tokens'] / 1e6:.1f} million tokens"),
    *[(doc, "prepare_scaling_cpu.json", lambda r: f"| 1 Ray CPU | {r['tokens_per_s_1_worker']:,} |")
      for doc in (BENCH, PREPARATION)],
    (BENCH, "prepare_scaling_cpu.json", lambda r: f"| 2 Ray CPUs | {r['tokens_per_s_2_workers']:,}, "
                                                  f"**{r['speedup_2_vs_1']:.2f}x** |"),
    (BENCH, "prepare_scaling_cpu.json", lambda r: "the other 2-CPU run gave {:,.0f} tokens/s ({:.2f}x)".format(
        slower_two_cpu_run(r), slower_two_cpu_run(r) / r["tokens_per_s_1_worker"])),
    (PREPARATION, "prepare_scaling_cpu.json", lambda r: f"| 2 Ray CPUs | {r['tokens_per_s_2_workers']:,} "
                                                        f"(**{r['speedup_2_vs_1']:.2f}x**) |"),
    (BENCH, "prepare_scaling_cpu.json", lambda r: f"One task tokenizes and writes {r['one_task_tokens_per_s']:,} "
     f"tokens/s. The driver reads {r['driver_read_lines_per_s'] / 1e6:.2f} million lines/s, enough for about "
     f"{r['cores_one_driver_feeds']} such tasks."),
    (PREPARATION, "prepare_scaling_cpu.json", lambda r: f"| one task, tokenizing and writing | "
     f"{r['one_task_tokens_per_s']:,} | | the driver, reading lines | {r['driver_read_lines_per_s'] / 1e6:.2f} million "
     f"lines/s | The driver reads about {r['cores_one_driver_feeds']} tasks' worth"),
    # ingest.py
    (BENCH, "ingest_cpu.json", lambda r: "(rows read, then MLM-masked) | {ingest_samples_per_s:,.0f} | "
     "{step_samples_per_s:.0f} | **{ingest_vs_step:.0f}x** |".format(**r["tiny_bert_seq128"])),
    (BENCH, "ingest_cpu.json", lambda r: "(decoded, crop, flip, normalize) | {ingest_samples_per_s:,.0f} | "
     "{step_samples_per_s:.0f} | **{ingest_vs_step:.0f}x** |".format(**r["resnet20_32px"])),
    (BENCH, "ingest_cpu.json", lambda r: "random-resized crop 32 | {folder_images_per_s:,.0f} | "
     "{packed_images_per_s:,.0f} | **{packed_vs_folder:.2f}x** |".format(**r["images_32px_png"])),
    (BENCH, "ingest_cpu.json", lambda r: "random-resized crop 224 | {folder_images_per_s:,.0f} | "
     "{packed_images_per_s:,.0f} | **{packed_vs_folder:.2f}x** |".format(**r["images_500x375_jpeg_crop224"])),
    (BENCH, "ingest_cpu.json", lambda r: f"is {4700 / r['tiny_bert_seq128']['ingest_samples_per_s']:.1f} of one "
                                         "core's ingest"),  # BERT-base's 4,700 sequences/s on an H100 at 40% MFU
    (BENCH, "ingest_cpu.json", lambda r: "gives about {:.0f} images/s".format(
        round(r["images_500x375_jpeg_crop224"]["packed_images_per_s"], -1))),
    *[(doc, "ingest_cpu.json", lambda r, text=text: text.format(*(round(gpu / r["images_500x375_jpeg_crop224"][
        "packed_images_per_s"]) for gpu in (2500, 5000))))  # images/s an A100 and an H100 train
      for doc, text in ((BENCH, "that is about {} cores per GPU. At twice that on an H100, it is about {} cores"),
                        (PREPARATION, "about {} cores per A100, or about {} per H100"))],
    (PREPARATION, "ingest_cpu.json", lambda r: f"masking them runs at {r['tiny_bert_seq128']['ingest_vs_step']:.0f}x"),
    (PREPARATION, "ingest_cpu.json", lambda r: f"32x32 images runs at {r['resnet20_32px']['ingest_vs_step']:.0f}x"),
    (PREPARATION, "ingest_cpu.json", lambda r: "decode and augment at {:.2f}-{:.2f}x".format(*sorted(
        r[images]["packed_vs_folder"] for images in ("images_32px_png", "images_500x375_jpeg_crop224")))),
    # glue_real_text.py
    ("docs/glue.md", "glue_real_text.json", lambda r: f"{r['sizes']['train']:,} train, {r['sizes']['dev']} dev"),
    ("docs/glue.md", "glue_real_text.json", lambda r: f"builds a CoLA-format acceptability task from "
                                                      f"{r['sizes']['train'] + r['sizes']['dev']:,}"),
    ("docs/glue.md", "glue_real_text.json", lambda r: f"for {r['epochs']} epochs ({r['pretrained']['steps']} steps, "
     f"{r['pretrained']['train_wall_time_s']:.0f} s of training) reached a dev Matthews correlation of "
     f"**{r['pretrained']['best_dev_mcc']:.3f}**"),
    ("docs/glue.md", "glue_real_text.json", lambda r: f"(best {r['random_init']['best_dev_mcc']:.3f}, "
                                                      f"final {r['random_init']['final_dev_mcc']:.3f}"),
    # zero_memory.py
    *[("docs/vision.md", "zero_memory_cpu.json", lambda r, stage=stage: zero_row(r, stage)) for stage in "0123"],
    # slurm_startup.py
    ("docs/cluster.md", "slurm_startup.json", lambda r: "2-core machine): {}. Of that, {} is the submit command and "
     "the queue, {} is bringing up the Ray nodes, and {} is the driver".format(*(seconds_range(r["jobs"], key) for key in (
         "submit_to_first_step_s", "queued_s", "ray_up_s", "driver_and_workers_to_first_step_s")))),
    # optimizer_step.py, in large-batch.md
    ("docs/large-batch.md", "optimizer_step_cpu.json", lambda r: f"MiniLM-L6's {r['parameters'] / 1e6:.1f}M parameters "
     f"({r['threads']} CPU threads, the median of {len(r['step_ms_each']['adamw_fused'])} interleaved rounds"),
    ("docs/large-batch.md", "optimizer_step_cpu.json", lambda r: f"distdl's LAMB takes "
     f"{r['step_ms_median']['distdl_lamb']:.0f} ms, {r['ratios']['distdl_lamb_to_timm_lamb']:.2f}x timm's; its LARS "
     f"{r['step_ms_median']['distdl_lars']:.0f} ms, {r['ratios']['distdl_lars_to_timm_lars']:.2f}x timm's."),
    ("docs/large-batch.md", "optimizer_step_cpu.json", lambda r: f"LAMB costs "
     f"{r['ratios']['distdl_lamb_to_adamw_fused']:.0f}x a fused AdamW step there "
     f"({r['step_ms_median']['adamw_fused']:.0f} ms), LARS {r['ratios']['distdl_lars_to_sgd_fused']:.0f}x a fused SGD"),

    # allreduce_gloo.py
    (PLAN, "allreduce_gloo_cpu.json", lambda r: f"2-core machine, {r['repeats']} repeats each"),
    (PLAN, "allreduce_gloo_cpu.json", lambda r: f"gives β = {r['fit']['bandwidth_gb_s']:.2f} GB/s and α = "
     f"{r['fit']['latency_us']:.0f} µs. For {within(r)} of the {len(r['sizes'])} sizes the fitted time lies within "
     "the measured interquartile range; the largest error is {:.0%} of the median.".format(
         max(abs(size["relative_error"]) for size in r["sizes"]))),
    (PLAN, "allreduce_gloo_cpu.json", lambda r: "(1 MiB: {:.1f}-{:.1f} ms between the quartiles)".format(
        *(seconds * 1e3 for seconds in r["sizes"][0]["iqr_s"]))),
    # plan_two_workers.py
    *[(PLAN, "plan_two_workers_cpu.json", lambda r, index=index: plan_row(r["throughput"][index])) for index in range(4)],
    (PLAN, "plan_two_workers_cpu.json", lambda r: "**The plan over-predicts** (median {:+.0%} from a profile alone, "
     "{:+.0%} from one on one core)".format(*plan_medians(r))),
    (PLAN, "plan_two_workers_cpu.json", lambda r: "the median error falls from {:+.0%} to {:+.0%}".format(
        *plan_medians(r))),
    (PLAN, "plan_two_workers_cpu.json", lambda r: "(the one-core errors, {:+.0%} to {:+.0%})".format(
        min(one_core_errors(r)), max(one_core_errors(r)))),
    (PLAN, "plan_two_workers_cpu.json", lambda r: "(seq 32, the shortest step: {:+.0%})".format(
        r["throughput"][2]["median_error_one_core"])),
    (PLAN, "plan_two_workers_cpu.json", lambda r: f"ran two at once at x{r['side_by_side_control']['slowdown']:.2f} "
                                                  "the time of one"),
    (PLAN, "plan_two_workers_cpu.json", lambda r: "The modelled synchronization of the tiny BERT's {:.2f} M fp32 "
     "gradients is {:.1f} ms of a ~{:.0f} ms step".format(
         r["throughput"][1]["pairs"][0]["trainable_parameters"] / 1e6,
         r["throughput"][1]["pairs"][0]["modelled_sync_s"] * 1e3, r["throughput"][1]["pairs"][0]["measured_step_s"] * 1e3)),
    (PLAN, "plan_two_workers_cpu.json", lambda r: "its gloo collectives took {:.1f} ms a step on rank 0 and {:.1f} ms "
     "on rank 1, {:.1f} and {:.1f} ms of it beside no computation".format(
         *(rank["collectives_s"] * 1e3 for rank in r["traced"]["ranks"]),
         *(rank["exposed_collectives_s"] * 1e3 for rank in r["traced"]["ranks"]))),
    (PLAN, "plan_two_workers_cpu.json", lambda r: "The AdamW step took {:.1f} and {:.1f} ms on the two ranks".format(
        *(rank["optimizer_s"] * 1e3 for rank in r["traced"]["ranks"]))),
    (PLAN, "plan_two_workers_cpu.json", lambda r: steps_text(r["steps_to_target"])),
    (PLAN, "plan_two_workers_cpu.json", lambda r: "({}-{} steps at batch 16)".format(*(f(
        run["steps_to_target"] for run in r["steps_to_target"]["fitted_runs"] if run["batch_size"] == 16)
        for f in (min, max)))),
    # vs_hf_hyperparameter_search.py
    *[(SWEEPS, "vs_hf_hyperparameter_search_cpu.json", lambda r, side=side, label=label: search_row(r, side, label))
      for side, label in (("distdl", "distdl sweep + ASHA"), ("hf_trainer", "HF Trainer + Optuna pruner"))],
    (SWEEPS, "vs_hf_hyperparameter_search_cpu.json", lambda r: "| trial-steps (of {}) |".format(
        r["distdl"]["trial_steps_without_stopping"])),
    (SWEEPS, "vs_hf_hyperparameter_search_cpu.json", lambda r: "**distdl's wall time is {:.0f} s {} for four "
     "trials:**".format(abs(r["distdl"]["wall_s"] - r["hf_trainer"]["wall_s"]),
                        "longer" if r["distdl"]["wall_s"] > r["hf_trainer"]["wall_s"] else "shorter")),
    (SWEEPS, "vs_hf_hyperparameter_search_cpu.json", lambda r: "DeepSpeed's engine), about {:.0f} s on 2 cores".format(
        (r["distdl"]["wall_s"] - r["hf_trainer"]["wall_s"]) / len(r["distdl"]["trials"]))),
    # vs_hf_trainer.py
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "| GLUE samples/s, 2 threads (per seed) | {} | {} | **{:.3f}** ({}) |"
     .format(*(", ".join(f"{rate:.1f}" for rate in r["glue"][side]["samples_per_s"]["each"])
               for side in ("distdl", "hf_trainer")), r["glue"]["samples_per_s_ratio_distdl_to_hf"],
             ", ".join(f"{mine / theirs:.2f}" for mine, theirs in zip(r["glue"]["distdl"]["samples_per_s"]["each"],
                                                                      r["glue"]["hf_trainer"]["samples_per_s"]["each"])))),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "| GLUE samples/s, 1 thread | {:.1f} | {:.1f} | **{:.2f}** |".format(
        *(r["glue_one_thread"][side]["samples_per_s"]["mean"] for side in ("distdl", "hf_trainer")),
        r["glue_one_thread"]["samples_per_s_ratio_distdl_to_hf"])),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "| GLUE dev accuracy (per seed) | {} | {} | {:+.1f} points, standard "
     "error {:.1f} |".format(*(", ".join(f"{accuracy:.3f}" for accuracy in r["glue"][side]["dev_accuracy"]["each"])
                               for side in ("distdl", "hf_trainer")),
                             r["glue"]["dev_accuracy_gap_points"], r["glue"]["dev_accuracy_gap_standard_error"])),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "| GLUE without dropout: dev accuracy, dev loss | {:.4f}, {:.7f} | "
     "{:.4f}, {:.7f} |".format(*(value for side in ("distdl", "hf_trainer") for value in (
         r["glue_without_dropout"][side]["dev_accuracy"]["mean"], r["glue_without_dropout"][side]["dev_loss"]["mean"])))),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "the invocation took {:.0f} minutes".format(r["wall_s"] / 60)),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "distdl is {:.0%} ahead".format(
        r["glue_one_thread"]["samples_per_s_ratio_distdl_to_hf"] - 1)),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "distdl's mean is {:.1f} points above HF Trainer's, about one "
     "standard error ({:.1f}) from zero".format(r["glue"]["dev_accuracy_gap_points"],
                                                r["glue"]["dev_accuracy_gap_standard_error"])),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "pair's speed, {:.2f}x in this invocation".format(
        r["glue_without_dropout"]["samples_per_s_ratio_distdl_to_hf"])),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "HF Trainer (transformers {}, one process".format(
        ".".join(r["provenance"]["versions"]["transformers"].split(".")[:2]))),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "| MLM samples/s (per seed) | {} | {} | **{:.2f}** |".format(
        *(", ".join(f"{rate:.1f}" for rate in r["mlm"][side]["samples_per_s"]["each"]) for side in ("distdl", "hf_trainer")),
        r["mlm"]["samples_per_s_ratio_distdl_to_hf"])),
    (BENCH, "vs_hf_trainer_cpu.json", lambda r: "| MLM held-out loss | {:.3f} | {:.3f} | {:.3f} |".format(
        *(r["mlm"][side]["heldout_mlm_loss"]["mean"] for side in ("distdl", "hf_trainer")),
        r["mlm"]["heldout_mlm_loss_ratio_distdl_to_hf"])),
    ("docs/performance.md", "vs_hf_trainer_cpu.json", lambda r: "leaving Ray the second core, and distdl is {:.0%} "
     "ahead of HF Trainer".format(r["glue_one_thread"]["samples_per_s_ratio_distdl_to_hf"] - 1)),
    ("docs/performance.md", "vs_hf_trainer_cpu.json", lambda r: "| GLUE, samples/s on 2 threads | {:.1f} | {:.1f} | "
     "**{:.3f}** |".format(*(r["glue"][side]["samples_per_s"]["mean"] for side in ("distdl", "hf_trainer")),
                            r["glue"]["samples_per_s_ratio_distdl_to_hf"])),
    ("docs/performance.md", "vs_hf_trainer_cpu.json", lambda r: "| GLUE, samples/s on 1 thread | {:.1f} | {:.1f} | "
     "**{:.2f}** |".format(*(r["glue_one_thread"][side]["samples_per_s"]["mean"] for side in ("distdl", "hf_trainer")),
                           r["glue_one_thread"]["samples_per_s_ratio_distdl_to_hf"])),
    ("docs/performance.md", "vs_hf_trainer_cpu.json", lambda r: "| GLUE, dev accuracy (mean of 3) | {:.3f} | {:.3f} | "
     "{:+.1f} points (standard error {:.1f}) |".format(
         *(r["glue"][side]["dev_accuracy"]["mean"] for side in ("distdl", "hf_trainer")),
         r["glue"]["dev_accuracy_gap_points"], r["glue"]["dev_accuracy_gap_standard_error"])),
    ("docs/performance.md", "vs_hf_trainer_cpu.json", lambda r: "| MLM, samples/s | {:.1f} | {:.1f} | **{:.2f}** |"
     .format(*(r["mlm"][side]["samples_per_s"]["mean"] for side in ("distdl", "hf_trainer")),
             r["mlm"]["samples_per_s_ratio_distdl_to_hf"])),
    ("docs/performance.md", "vs_hf_trainer_cpu.json", lambda r: "| MLM, held-out loss (same masks) | {:.3f} | {:.3f} | "
     "{:.3f} |".format(*(r["mlm"][side]["heldout_mlm_loss"]["mean"] for side in ("distdl", "hf_trainer")),
                       r["mlm"]["heldout_mlm_loss_ratio_distdl_to_hf"])),
]


PINS += [
    # stop_question.py
    (BENCH, "stop_question_cpu.json", lambda r: "rounds with and without the question (medians of {} rounds of {} steps): {:.2f} ms "
     "a step without it, {:.2f} ms with it, ratio {:.3f}; the rounds themselves spread over {:.1f}-{:.1f} ms.".format(
         r["settings"]["rounds"], r["settings"]["steps_per_round"], r["step_ms"]["without_question"],
         r["step_ms"]["with_question"], r["ratio_with_to_without"],
         min(min(rounds) for rounds in r["rounds_ms"].values()), max(max(rounds) for rounds in r["rounds_ms"].values()))),
]
STUDIES_DOC = "docs/studies.md"
SCALING = "studies/scaling-mnist5k/results.json"
PINS += [
    # studies.py: scaling-mnist5k
    (STUDIES_DOC, "studies/scaling-mnist5k.json", lambda r: f"lr 0.01 at batch 32; 2 CPU cores, {r['wall_minutes']:.0f} "
                                                         "minutes; `python benchmarks/studies.py scaling-mnist5k`)"),
    (STUDIES_DOC, SCALING, lambda r: "Strong scaling (batch 256): {} samples/s on 1 worker, {} on 2, efficiency {:.2f}."
     .format(*(tens(row["samples_per_s"]) for row in throughput(r, "strong")), throughput(r, "strong")[1]["efficiency"])),
    (STUDIES_DOC, SCALING, lambda r: f"Weak scaling (128 per worker): efficiency {throughput(r, 'weak')[1]['efficiency']:.2f}."),
    (STUDIES_DOC, SCALING, lambda r: "(5-step windows): {} steps at batch {}.".format(
        *(listed([entry[key] for entry in r["entries"]]) for key in ("steps_to_target", "batch_size")))),
    (STUDIES_DOC, SCALING, lambda r: f"The fit on log S gives B_crit = {r['critical_batch_size']:.0f} (R² {r['fit_r2_log']:.2f})."),
    (STUDIES_DOC, SCALING, lambda r: f"gives B_simple = {r['noise_scale_batch']:,.0f}: "
                                     f"{r['noise_scale_batch'] / r['critical_batch_size']:.1f}x larger."),
]


LARS = "studies/scaling-sgd-vs-lars/results.json"
PINS += [
    # studies.py: scaling-sgd-vs-lars
    (STUDIES_DOC, "studies/scaling-sgd-vs-lars.json", lambda r: f"2 seeds (2 CPU cores, {r['wall_minutes']:.0f} minutes; "
                                                            "`python benchmarks/studies.py scaling-sgd-vs-lars`)"),
    (STUDIES_DOC, LARS, lambda r: "| SGD | " + " | ".join(map(str, mean_steps(r, "sgd").values())) + " |"),
    (STUDIES_DOC, LARS, lambda r: "| LARS | " + " | ".join(map(str, mean_steps(r, "lars").values())) + " |"),
    (STUDIES_DOC, LARS, lambda r: "Fitted B_crit: **{:,.0f} for SGD** (R² {:.2f} on log S), **{:,.0f} for LARS** (R² {:.2f}), "
     "{:.1f}x.".format(*fit(r, "sgd"), *fit(r, "lars"), r["by_optimizer"]["lars"]["critical_batch_size"]
                       / r["by_optimizer"]["sgd"]["critical_batch_size"])),
    (STUDIES_DOC, LARS, lambda r: "LARS pays for it at small batches: {:.1f}x SGD's steps at batch 32.".format(
        mean_steps(r, "lars")[32] / mean_steps(r, "sgd")[32])),
    (STUDIES_DOC, LARS, lambda r: "B_simple, the noise scale measured in the same runs: {:,.0f} (SGD) and {:,.0f} (LARS)."
     .format(*(r["by_optimizer"][name]["noise_scale_batch"] for name in ("sgd", "lars")))),
]


OVERPARAM = "studies/overparam-digits/results.json"
PINS += [
    # studies.py: overparam-digits
    (STUDIES_DOC, "studies/overparam-digits.json", lambda r: f"2 CPU workers, {r['wall_minutes']:.0f} minutes; "
                                                          "`python benchmarks/studies.py overparam-digits`):"),
    *((STUDIES_DOC, OVERPARAM, lambda r, index=index: width_row(r["entries"][index])) for index in range(5)),
    (STUDIES_DOC, OVERPARAM, lambda r: f"**Distance exponent:** −{-r['distance_exponent']:.3f}, against Du et al.'s −1/2."),
]


TEMPERATURE = "studies/temperature-mnist5k/results.json"
MEASURES = {"test accuracy": "test_accuracy", "top Hessian eigenvalue": "hessian_top_eigenvalue",
            "Hessian trace": "hessian_trace", "adaptive sharpness ε=1e-3": "adaptive_sharpness_eps1e-3",
            "ε-sharpness ε=1e-3": "sharpness_eps1e-3"}
PINS += [
    # studies.py: temperature-mnist5k
    (STUDIES_DOC, "studies/temperature-mnist5k.json", lambda r: f"2 CPU workers, {r['wall_minutes']:.0f} minutes in "
                                                             "all (`python benchmarks/studies.py temperature-mnist5k`)."),
    *((STUDIES_DOC, TEMPERATURE, lambda r, label=label: fit_row(r, label) + f" {r['fits'][MEASURES[label]]['r2']:.3f} |")
      for label in MEASURES),
    (STUDIES_DOC, TEMPERATURE, lambda r: "test accuracy ({:.3f} to {:.3f}) and a flatter solution (top eigenvalue "
     "{:.0f} to {:.1f}).".format(*spread(r, "test_accuracy"), cell(r, 0.02, 512)["hessian_top_eigenvalue"],
                                 cell(r, 0.2, 32)["hessian_top_eigenvalue"])),
    (STUDIES_DOC, TEMPERATURE, lambda r: "The training loss varies with it, from {:.3f} to {:.2f} across the grid."
     .format(*spread(r, "train_loss"))),
    (STUDIES_DOC, TEMPERATURE, lambda r: f"Keskar's ε-sharpness fits no exponent (R² {r['fits']['sharpness_eps1e-3']['r2']:.2f})."),
]


EQUAL_LOSS = "studies/temperature-mnist5k-equal-loss/results.json"
RANGE_FORMATS = {"test accuracy": ".3f", "top Hessian eigenvalue": ".1f", "Hessian trace": ".0f",
                 "adaptive sharpness ε=1e-3": ".2f"}
PINS += [
    # studies.py: temperature-mnist5k-equal-loss
    (STUDIES_DOC, "studies/temperature-mnist5k-equal-loss.json", lambda r: f"loss of 0.1 ({r['wall_minutes']:.0f} minutes, "
                                                                        "`python benchmarks/studies.py temperature-mnist5k-equal-loss`;"),
    (STUDIES_DOC, EQUAL_LOSS, lambda r: "every cell got there, in {} to {} steps):".format(*spread(r, "steps"))
     if all(entry["reached_target"] for entry in r["entries"]) else "some cells never got there"),
    *((STUDIES_DOC, EQUAL_LOSS, lambda r, label=label: fit_row(r, label) + " {:.3f} | {:{form}} to {:{form}} |".format(
        r["fits"][MEASURES[label]]["r2"], *spread(r, MEASURES[label]), form=RANGE_FORMATS[label]))
      for label in RANGE_FORMATS),
    (STUDIES_DOC, TEMPERATURE, lambda r: "the grid's {:.0f}-point spread".format(100 * (spread(r, "test_accuracy")[1]
                                                                                      - spread(r, "test_accuracy")[0]))),
    (STUDIES_DOC, EQUAL_LOSS, lambda r: "spread shrinks to {:.1f} points".format(
        100 * (spread(r, "test_accuracy")[1] - spread(r, "test_accuracy")[0]))),
    (STUDIES_DOC, EQUAL_LOSS, lambda r: "eigenvalue falls {:.1f}x from the coldest cell to the hottest".format(
        cell(r, 0.02, 512)["hessian_top_eigenvalue"] / cell(r, 0.2, 32)["hessian_top_eigenvalue"])),
    (STUDIES_DOC, EQUAL_LOSS, lambda r: "Its exponent k = {:.2f} excludes 1, and so does the trace's ({:.2f}).".format(
        r["fits"]["hessian_top_eigenvalue"]["exponent"], r["fits"]["hessian_trace"]["exponent"])
     if not r["fits"]["hessian_top_eigenvalue"]["follows_lr_over_b"] and not r["fits"]["hessian_trace"]["follows_lr_over_b"]
     else "k = 1 is inside an interval now"),
]


VARIANTS = "studies/sharpness-variants-mnist5k/results.json"
SAM_RHO = "studies/sharpness-sam-rho-mnist5k/results.json"
PINS += [
    # studies.py: sharpness-variants-mnist5k and sharpness-sam-rho-mnist5k
    (STUDIES_DOC, "studies/sharpness-variants-mnist5k.json", lambda r: f"2 CPU workers, {r['wall_minutes']:.0f} minutes in "
     "all (`python benchmarks/studies.py sharpness-variants-mnist5k`)."),
    (STUDIES_DOC, VARIANTS, lambda r: f"at the matched temperature, T = {r['matched_temperature']['equal_loss']:.2e}"
     .replace("e-0", "e-")),
    (STUDIES_DOC, VARIANTS, lambda r: f"| (batch 32 itself) | {arm_steps(r, 'batch32-seed')} | 0 | 1 | 1 | 1 | 1 |"),
    (STUDIES_DOC, VARIANTS, lambda r: "| plain | " + arm_row(r, "batch 512", "batch512-seed", " points")),
    (STUDIES_DOC, VARIANTS, lambda r: "| + SAM, ρ = 0.05 | " + arm_row(r, "batch 512 + sam", "batch512-sam-seed")),
    (STUDIES_DOC, SAM_RHO, lambda r: "| + SAM, ρ = 0.2 (second run) | " + arm_row(r, "batch 512 + sam", "batch512-sam-seed")),
    (STUDIES_DOC, VARIANTS, lambda r: "| + minibatch noise (batch 32's) | "
     + arm_row(r, "batch 512 + minibatch noise", "batch512-minibatch_noise-seed")),
    (STUDIES_DOC, VARIANTS, lambda r: "| + isotropic noise, same size | "
     + arm_row(r, "batch 512 + isotropic noise", "batch512-isotropic_noise-seed")),
]


PINS += [
    (STUDIES_DOC, VARIANTS, lambda r: "(eigenvalue ratio {} → {}, trace {} → {}).".format(
        arm_mean(r, "batch 512", "hessian_top_eigenvalue_ratio"), arm_mean(r, "batch 512 + minibatch noise", "hessian_top_eigenvalue_ratio"),
        arm_mean(r, "batch 512", "hessian_trace_ratio"), arm_mean(r, "batch 512 + minibatch noise", "hessian_trace_ratio"))),
    (STUDIES_DOC, VARIANTS, lambda r: "({} → {}; each seed within {:.0f}% of its plain arm)".format(
        arm_mean(r, "batch 512", "hessian_top_eigenvalue_ratio"), arm_mean(r, "batch 512 + isotropic noise", "hessian_top_eigenvalue_ratio"),
        math.ceil(100 * max(abs(noisy["hessian_top_eigenvalue_ratio"] / plain["hessian_top_eigenvalue_ratio"] - 1)
                            for plain, noisy in zip(arm_measures(r, "batch 512"), arm_measures(r, "batch 512 + isotropic noise")))))),
    (STUDIES_DOC, VARIANTS, lambda r: "The shaped noise also slows training: {} steps to the target against {}.".format(
        arm_steps(r, "batch512-minibatch_noise-seed"), arm_steps(r, "batch512-seed"))),
    (STUDIES_DOC, VARIANTS, lambda r: "(eigenvalue ratio {} → {}, trace {} → {}) at the plain arm's {} steps.".format(
        arm_mean(r, "batch 512", "hessian_top_eigenvalue_ratio"), arm_mean(r, "batch 512 + sam", "hessian_top_eigenvalue_ratio"),
        arm_mean(r, "batch 512", "hessian_trace_ratio"), arm_mean(r, "batch 512 + sam", "hessian_trace_ratio"),
        arm_steps(r, "batch512-seed"))),
    (STUDIES_DOC, "studies/sharpness-sam-rho-mnist5k.json", lambda r: f"study.sam_rho=0.2`, {r['wall_minutes']:.0f} "
                                                                   "minutes; `sharpness-sam-rho-mnist5k/`)"),
    (STUDIES_DOC, SAM_RHO, lambda r: "eigenvalue ratio {} ({:.1f}-{:.1f}), trace {}, adaptive sharpness {}, in {} steps.".format(
        arm_mean(r, "batch 512 + sam", "hessian_top_eigenvalue_ratio"),
        *spread_of(arm_measures(r, "batch 512 + sam"), "hessian_top_eigenvalue_ratio"),
        arm_mean(r, "batch 512 + sam", "hessian_trace_ratio"), arm_mean(r, "batch 512 + sam", "adaptive_sharpness_eps1e-3_ratio"),
        arm_steps(r, "batch512-sam-seed"))),
]


SHARPNESS = "studies/sharpness-mnist5k/results.json"
SHARPNESS_COLUMNS = ("sharpness_eps1e-3_ratio", "sharpness_eps5e-4_ratio", "subspace_sharpness_eps1e-3_ratio",
                     "hessian_top_eigenvalue_ratio", "hessian_trace_ratio", "adaptive_sharpness_eps1e-3_ratio")
PINS += [
    # studies.py: sharpness-mnist5k
    (STUDIES_DOC, "studies/sharpness-mnist5k.json", lambda r: f"**Time:** {r['wall_minutes']:.0f} minutes in all on 2 "
                                                           "cores (`python benchmarks/studies.py sharpness-mnist5k`)"),
    (STUDIES_DOC, SHARPNESS, lambda r: "| equal_epochs ({:,} vs {:,} steps) | ".format(
        steps_of(r, "equal_epochs", 1000), steps_of(r, "equal_epochs", 32)) + protocol_row(r, "equal_epochs")),
    (STUDIES_DOC, SHARPNESS, lambda r: "| equal_steps ({:,} each) | ".format(steps_of(r, "equal_steps", 32))
     + protocol_row(r, "equal_steps")),
    (STUDIES_DOC, SHARPNESS, lambda r: "**Noise scale B_simple** (second half of training): {} at batch 32; {} at batch "
     "1,000 after {} steps; {} after {:,} steps.".format(
         noise_scales(r, "equal_epochs", 32), noise_scales(r, "equal_epochs", 1000), steps_of(r, "equal_epochs", 1000),
         noise_scales(r, "equal_steps", 1000), steps_of(r, "equal_steps", 1000))),
]


def sig2(value: float) -> str:
    """Two significant figures, as the sharpness table prints them (1.9e-5, 0.013, 2.3, 14)."""
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:#.2g}".replace("e-0", "e-")


def protocol_row(record: dict[str, Any], protocol: str) -> str:
    """A protocol's ratios of the large batch over the small, seed by seed."""
    rows = [row for row in record["ratios"].values() if row["protocol"] == protocol]
    cells = [", ".join(sig2(row[key]) for row in rows) for key in SHARPNESS_COLUMNS]
    cells.append(", ".join(f"{100 * row['test_accuracy_difference']:+.1f}" for row in rows) + " points")
    cells.append(", ".join(f"{sig2(row['train_loss_large'])} / {sig2(row['train_loss_small'])}" for row in rows))
    return " | ".join(cells) + " |"


def steps_of(record: dict[str, Any], protocol: str, batch: int) -> int:
    steps = {entry["steps"] for entry in record["entries"] if entry["protocol"] == protocol and entry["batch_size"] == batch}
    assert len(steps) == 1, steps
    return steps.pop()


def noise_scales(record: dict[str, Any], protocol: str, batch: int) -> str:
    """Each seed's B_simple, to the hundred: '1,500 and 2,500', or one figure where the seeds agree."""
    scales = [f"{round(entry['noise_scale'], -2):,.0f}" for entry in record["entries"]
              if entry["protocol"] == protocol and entry["batch_size"] == batch]
    return scales[0] if len(set(scales)) == 1 else " and ".join(scales)


ADAM = "studies/sharpness-variants-adam-equal-epochs-mnist5k/results.json"
PINS += [
    # studies.py: sharpness-variants-adam-equal-epochs-mnist5k
    (STUDIES_DOC, "studies/sharpness-variants-adam-equal-epochs-mnist5k.json", lambda r: f"model; {r['wall_minutes']:.0f} "
     "minutes, `python benchmarks/studies.py sharpness-variants-adam-equal-epochs-mnist5k`)"),
    (STUDIES_DOC, ADAM, lambda r: "stayed under-trained (train loss {:.2f}, sharper)".format(
        statistics.mean(row["train_loss"] for row in arm_measures(r, "batch 1000 + minibatch noise")))),
    (STUDIES_DOC, ADAM, lambda r: "({:.1e}) changed nothing there either: top eigenvalue ratios {} and {}, as the plain arm's "
     "{} and {}.".format(r["matched_temperature"]["equal_epochs"],
                        *(f"{row['hessian_top_eigenvalue_ratio']:.1f}" for row in arm_measures(r, "batch 1000 + isotropic noise")),
                        *(f"{row['hessian_top_eigenvalue_ratio']:.1f}" for row in arm_measures(r, "batch 1000")))),
]


def arm_mean(record: dict[str, Any], arm: str, key: str) -> str:
    return f"{statistics.mean(row[key] for row in arm_measures(record, arm)):.1f}"


def spread_of(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    return min(row[key] for row in rows), max(row[key] for row in rows)


def arm_measures(record: dict[str, Any], arm: str) -> list[dict[str, Any]]:
    return [row for row in record["variants"] if row["arm"] == arm]


def arm_steps(record: dict[str, Any], prefix: str) -> str:
    """The steps an arm's trials took to the target: '60', or '210-270' where they differ."""
    steps = sorted(entry["steps"] for entry in record["entries"] if entry["trial"].startswith(prefix))
    return str(steps[0]) if steps[0] == steps[-1] else f"{steps[0]}-{steps[-1]}"


def arm_row(record: dict[str, Any], arm: str, prefix: str, unit: str = "") -> str:
    """A large-batch arm's row of the variants table: steps, the test-accuracy gap (mean ± sample
    standard deviation, points), and the mean curvature ratios (the eigenvalue's with its range)."""
    rows = arm_measures(record, arm)

    def mean(key: str) -> str:
        return f"{statistics.mean(row[key] for row in rows):.1f}"

    gaps = [100 * row["test_accuracy_gap"] for row in rows]
    eigen = [row["hessian_top_eigenvalue_ratio"] for row in rows]
    gap = f"{statistics.mean(gaps):.1f}".replace("-", "−")  # the docs' minus sign
    return (f"{arm_steps(record, prefix)} | {gap} ± {statistics.stdev(gaps):.1f}{unit} | "
            f"{mean('hessian_top_eigenvalue_ratio')} ({min(eigen):.1f}-{max(eigen):.1f}) | "
            f"{mean('hessian_trace_ratio')} | {mean('sharpness_eps1e-3_ratio')} | "
            f"{mean('adaptive_sharpness_eps1e-3_ratio')} |")


def fit_row(record: dict[str, Any], label: str) -> str:
    """A measure's row of a temperature table, up to its R²: k and its 95% interval."""
    fitted = record["fits"][MEASURES[label]]
    low, high = fitted["interval"]
    return f"| {label} | {fitted['exponent']:.2f} | [{low:.2f}, {high:.2f}] |"


def spread(record: dict[str, Any], measure: str) -> tuple[float, float]:
    values = [entry[measure] for entry in record["entries"]]
    return min(values), max(values)


def cell(record: dict[str, Any], lr: float, batch: int) -> dict[str, Any]:
    return next(entry for entry in record["entries"] if entry["lr"] == lr and entry["batch_size"] == batch)


def width_row(entry: dict[str, Any]) -> str:
    """A width's row of the overparam table: distance, patterns changed, rate (R²), losses and errors."""
    def share(value: float) -> str:
        return f"{value:.1%}" if value else "0"

    rate = f"{entry['convergence_rate']:.1e}".replace("e-0", "e-")
    return (f"| {entry['width']} | {entry['relative_distance']:.3f} | {entry['activation_change']:.1%} | "
            f"{rate} ({entry['convergence_fit_r2']:.2f}) | {entry['train_loss']:.3f} | {share(entry['train_error'])} | "
            f"{share(entry['test_error'])} |")


def mean_steps(record: dict[str, Any], optimizer: str) -> dict[int, int]:
    """Steps to the target by batch, the mean over seeds rounded half up (192.5 -> 193)."""
    steps = collections.defaultdict(list)
    for entry in record["entries"]:
        if entry.get("kind") == "target" and entry["optimizer"] == optimizer:
            steps[entry["batch_size"]].append(entry["steps_to_target"])
    return {batch: int(statistics.mean(runs) + 0.5) for batch, runs in sorted(steps.items())}


def fit(record: dict[str, Any], optimizer: str) -> tuple[float, float]:
    fitted = record["by_optimizer"][optimizer]
    return fitted["critical_batch_size"], fitted["fit_r2_log"]


def tens(value: float) -> str:
    return f"{round(value, -1):,.0f}"


def throughput(record: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return sorted((row for row in record["throughput"] if row["kind"] == kind), key=lambda row: row["workers"])


def listed(values: list[Any]) -> str:
    """'1, 2 and 3'."""
    return ", ".join(f"{value:,}" for value in values[:-1]) + f" and {values[-1]:,}"


def within(record: dict[str, Any]) -> int:
    return sum(size["within_iqr"] for size in record["sizes"])


def plan_row(case: dict[str, Any]) -> str:
    """A config's row of docs/plan.md's 2-worker table: measured samples/s, then each profile's errors."""
    pairs = case["pairs"]
    measured = " / ".join(f"{pair['measured_samples_per_s']:.1f}" for pair in pairs)
    errors = [" / ".join(f"{pair[label]['error']:+.1%}" for pair in pairs) for label in ("alone", "one_core")]
    return f"| {measured} | {errors[0]} | {errors[1]} |"


def one_core_errors(record: dict[str, Any]) -> list[float]:
    return [pair["one_core"]["error"] for case in record["throughput"] for pair in case["pairs"]]


def plan_medians(record: dict[str, Any]) -> list[float]:
    return [statistics.median(pair[label]["error"] for case in record["throughput"] for pair in case["pairs"])
            for label in ("alone", "one_core")]


def steps_text(steps: dict[str, Any]) -> str:
    fitted = {batch: statistics.mean(run["steps_to_target"] for run in steps["fitted_runs"] if run["batch_size"] == batch)
              for batch in steps["fitted_batches"]}
    return ("The fit (S_min = {:.2f}, B_crit = {:.1f}, from {:.1f} mean steps at batch 16 and {:.3g} at 64) gives "
            "{:.1f} steps at batch 32; its three seeds took {} (mean {:.1f}): {:+.1%}.").format(
        steps["min_steps"], steps["critical_batch_size"], fitted[16], fitted[64], steps["predicted_steps"],
        ", ".join(map(str, steps["measured_steps"][:-1])) + f" and {steps['measured_steps'][-1]}",
        steps["measured_mean"], steps["error"])


def search_row(record: dict[str, Any], side: str, label: str) -> str:
    """A search's row of docs/sweeps.md: the order, trial-steps, best rate and accuracy, wall time."""
    search = record[side]
    order = ", ".join(f"{trial['lr']:.0e}".replace("e-05", "e-5") for trial in search["trials"])
    return (f"| {label} | {order} | {stopped_early(search['trials'])} | {search['trial_steps']} | {search['best_lr']:.0e} | {search['best_accuracy']:.3f} | "
            f"{search['wall_s']:.0f} s |").replace("e-05", "e-5")


def stopped_early(trials: list[dict[str, Any]]) -> str:
    """'3 (at step 15)', or '3 (two at 15, one at 30)' where they stopped at different steps."""
    steps = [trial["steps"] for trial in trials if trial["status"] == "stopped early"]
    counts = collections.Counter(steps)
    if len(counts) <= 1:
        return f"{len(steps)} (at step {steps[0]})" if steps else "0"
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    return f"{len(steps)} (" + ", ".join(f"{words.get(count, count)} at {step}"
                                         for step, count in sorted(counts.items())) + ")"


def zero_row(record: dict[str, Any], stage: str) -> str:
    """A ZeRO stage's row of docs/vision.md: rank 0's MiB, with the ratio to ZeRO-0 where it is not 1."""
    held, baseline = record["stages"][stage][0], record["stages"]["0"][0]
    ratios = {key: f"{held[key] / baseline[key]:.2f}" for key in held}  # not the file's ratios, rounded to 3 places
    cells = [f"{held[key]:.0f}" + (f" ({ratios[key]})" if ratios[key] != "1.00" else "")
             for key in ("parameters_mib", "optimizer_state_mib", "peak_rss_mib")]
    return f"| {stage} | " + " | ".join(cells) + " |"


def seconds_range(jobs: list[dict[str, float]], key: str) -> str:
    low, high = min(job[key] for job in jobs), max(job[key] for job in jobs)
    return f"{low:.0f} s" if round(low) == round(high) else f"{low:.0f}-{high:.0f} s"


def rendering(render: Render, record: dict[str, Any]) -> tuple[Optional[str], str]:
    """(the text, "") or (None, why it cannot be rendered: the file lacks a key the pin reads)."""
    try:
        return render(record), ""
    except (KeyError, IndexError) as lacking:
        return None, f"the results file lacks {lacking}: rerun its script"
    except AssertionError as differs:
        return None, f"the results file differs in shape from what the docs say ({differs})"


def missing(record_of: Callable[[str], dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(doc, results file, rendering or why none) for every pin whose rendering its doc does not hold
    (line breaks and runs of spaces count as one space: the docs wrap their prose)."""
    docs: dict[str, str] = {}
    found = []
    for doc, name, render in PINS:
        text = docs.setdefault(doc, " ".join((REPO / doc).read_text().split()))
        rendered, why = rendering(render, record_of(name))
        if rendered is None or " ".join(rendered.split()) not in text:
            found.append((doc, name, rendered or why))
    return found


def spaced(rendered: str) -> re.Pattern:
    """The rendering wherever the doc wraps it (the whitespace between its words captured)."""
    return re.compile(r"(\s+)".join(map(re.escape, rendered.split())))


def rewrapped(new: str, match: re.Match) -> str:
    """`new` with the doc's own line breaks where the words match one for one."""
    words, gaps = new.split(), match.groups()
    if len(words) != len(gaps) + 1:
        return new
    return "".join(word + gap for word, gap in zip(words, (*gaps, "")))


@functools.cache
def committed_record(revision: str, name: str) -> Optional[dict[str, Any]]:
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:benchmarks/results/{name}"],
                           capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else None  # None: new since `revision`


def working_record(name: str) -> dict[str, Any]:
    return json.loads((REPO / "benchmarks/results" / name).read_text())


def update(revision: str) -> None:
    """Replace each rendering from `revision`'s results with the working tree's, where it stands once."""
    for doc, name, render in PINS:
        new, why = rendering(render, working_record(name))
        if new is None:
            print(f"{doc}: {name}: {why}")
            continue
        before = committed_record(revision, name)
        old = (rendering(render, before)[0] if before is not None else None) or new
        path = REPO / doc
        text = path.read_text()
        replaced, count = spaced(old).subn(lambda match: rewrapped(new, match), text)
        if old != new and count == 1:
            path.write_text(replaced)
            print(f"{doc}: {old!r} -> {new!r}")
        elif old != new and count > 1:
            print(f"{doc}: {old!r} stands {count} times; edit by hand")
        elif not spaced(new).search(text):
            print(f"{doc}: neither {old!r} nor {new!r} found; edit by hand")


if __name__ == "__main__":
    update(sys.argv[1] if len(sys.argv) > 1 else "HEAD")
