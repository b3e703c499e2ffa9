"""`distdl plan`'s model, without a cluster: the ring and hierarchical all-reduce against their
formulas, ZeRO's volumes, the model's limits, cluster files and plan flags refused naming the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest

from distdl.errors import ConfigError
from distdl.planning.cluster import ClusterSpec, Link, read_cluster
from distdl.planning.model import (
    BatchPolicy,
    ScalingFit,
    StepModel,
    allreduce_seconds,
    gradient_sync_seconds,
    knee,
    predict,
    ring_allreduce_seconds,
    steps_to_target,
)
from tests.helpers.shared import REPO

SHIPPED = sorted((REPO / "clusters").glob("*.yaml"))
NODE = ClusterSpec(gpu="A100", gpus_per_node=8, intra_node=Link(300.0, 3.0), inter_node=Link(25.0, 8.0))
BERT_LARGE = 340e6 * 2  # bf16 gradients of BERT-large


def test_the_ring_all_reduce_sends_2_n_minus_1_over_n_of_the_message_and_pays_2_n_minus_1_latencies():
    link = Link(bandwidth_gb_s=10.0, latency_us=5.0)
    assert ring_allreduce_seconds(1e9, 1, link) == 0.0, "one rank has no one to talk to"
    assert ring_allreduce_seconds(1e9, 4, link) == pytest.approx(2 * 3 / 4 * 1e9 / 10e9 + 6 * 5e-6, rel=1e-12)
    # Bandwidth-bound, it tends to twice the message over the bandwidth, whatever the rank count.
    assert ring_allreduce_seconds(1e9, 1024, Link(10.0, 0.0)) == pytest.approx(0.2, rel=2e-3)


def _timed_all_reduces(rank: int, world: int, port: int, sizes_mib: list[int], repeats: int, out: dict) -> None:
    import time

    import torch
    import torch.distributed as dist

    from tests.helpers.gloo import torchrun_group

    with torchrun_group(rank, world, port):
        times = {}
        for size in sizes_mib:
            tensor = torch.ones(size * 2**20 // 4)
            for _ in range(2):  # warm-up: gloo's buffers for this size
                dist.all_reduce(tensor)
            times[size] = []
            for _ in range(repeats):
                dist.barrier()
                started = time.perf_counter()
                dist.all_reduce(tensor)
                times[size].append(time.perf_counter() - started)
        out[rank] = times


def test_the_ring_formula_fitted_on_some_sizes_predicts_the_all_reduces_of_others():
    """Real gloo all-reduces between 2 processes, measured here: the ring formula with the link fitted to
    the smallest and largest messages predicts the fastest all-reduces of the sizes between them, within
    the spread of this 2-core machine (single sizes vary by up to 60% from run to run). What this checks
    is the formula's shape, affine in the message; its factors, 2 (n-1)/n of the message and 2 (n-1)
    latencies, are pinned on known numbers by the test above, which a wrong factor fails outright."""
    import numpy as np

    from tests.helpers.gloo import spawn_gloo

    fitted, held_out = [1, 2, 64], [8, 16, 32]  # held out where the message, not the latency, dominates
    ranks = spawn_gloo(_timed_all_reduces, 2, fitted + held_out, 15)
    # An all-reduce ends for both ranks together: each repeat's time is the slower rank's. The fastest
    # repeat is the link's own time (a busy machine only adds to it), steadier than the median here.
    best = {size: min(map(max, ranks[0][size], ranks[1][size])) for size in fitted + held_out}
    slope, intercept = np.polyfit([size * 2**20 for size in fitted], [best[size] for size in fitted], 1,
                                  w=[1 / best[size] for size in fitted])
    # For n = 2: t = 2 (n-1)/n M / bandwidth + 2 (n-1) latency = M / bandwidth + 2 latency.
    link = Link(bandwidth_gb_s=1 / slope / 1e9, latency_us=max(intercept, 0.0) / 2 * 1e6)
    errors = {size: ring_allreduce_seconds(size * 2**20, 2, link) / best[size] - 1 for size in held_out}
    # Within a factor of 2: single sizes have strayed by 57% here (8 MiB, 2026-12-08, a quiet machine), while a
    # wrong shape (no latency term, or time growing faster than the message) misses by far more.
    assert all(abs(error) < 1.0 for error in errors.values()), (errors, best)


def test_one_node_is_a_ring_and_several_are_hierarchical():
    assert allreduce_seconds(BERT_LARGE, 8, NODE) == ring_allreduce_seconds(BERT_LARGE, 8, NODE.intra_node)
    # 4 nodes: reduce-scatter and all-gather in the node, a ring over the nodes for each GPU's eighth.
    in_node = ring_allreduce_seconds(BERT_LARGE, 8, NODE.intra_node)
    across = ring_allreduce_seconds(BERT_LARGE / 8, 4, NODE.inter_node)
    assert allreduce_seconds(BERT_LARGE, 32, NODE) == pytest.approx(in_node + across, rel=1e-12)
    # Crossing nodes costs more than staying in one: the network is the slower link.
    assert allreduce_seconds(BERT_LARGE, 16, NODE) > allreduce_seconds(BERT_LARGE, 8, NODE)


def test_zero_3_moves_half_as_much_again_as_stages_0_to_2():
    stages = [gradient_sync_seconds(BERT_LARGE, stage, 64, NODE) for stage in range(4)]
    assert stages[0] == stages[1] == stages[2] and stages[3] == pytest.approx(1.5 * stages[0], rel=1e-12)


MODEL = StepModel(compute_per_sample_s=0.25 / 16, micro_batch=16, gradient_bytes=BERT_LARGE, overlap=0.0,
                  optimizer_s=0.01)


def test_one_gpu_communicates_nothing_and_is_perfectly_efficient():
    (row,) = predict(MODEL, NODE, BatchPolicy("per_gpu", 64), [1])
    assert row["step_s"] == pytest.approx(4 * 0.25 + 0.01) and row["efficiency"] == 1.0
    assert row["samples_per_s"] == pytest.approx(64 / 1.01)


def test_efficiency_falls_as_the_network_slows_and_rises_with_overlap():
    def efficiency(bandwidth: float, overlap: float = 0.0) -> float:
        cluster = ClusterSpec(gpu="A100", gpus_per_node=8, intra_node=Link(300.0, 3.0),
                              inter_node=Link(bandwidth, 8.0))
        model = StepModel(0.25 / 16, 16, BERT_LARGE, overlap=overlap)
        return predict(model, cluster, BatchPolicy("per_gpu", 64), [256])[0]["efficiency"]

    falling = [efficiency(bandwidth) for bandwidth in (100.0, 50.0, 25.0, 12.5, 1.0)]
    assert all(a > b for a, b in zip(falling, falling[1:])), falling
    assert 0 < falling[-1] < falling[0] < 1
    assert efficiency(25.0, overlap=0.8) > efficiency(25.0)


def test_steps_fall_to_s_min_far_above_the_critical_batch():
    assert steps_to_target(1e9, min_steps=1000, critical_batch=500) == pytest.approx(1000, rel=1e-6)
    # At B = B_crit it takes twice S_min (McCandlish et al.'s trade-off point).
    assert steps_to_target(500, min_steps=1000, critical_batch=500) == 2000


def test_a_fixed_global_batch_splits_where_it_can_and_the_knee_is_where_gpu_hours_start_to_climb():
    policy = BatchPolicy("global", 4096)
    rows = predict(MODEL, NODE, policy, [1, 2, 3, 8, 64, 256, 512, 8192],
                   ScalingFit(min_steps=5000, critical_batch=2000))
    assert [row["gpus"] for row in rows] == [1, 2, 8, 64, 256, 512], "3 GPUs cannot split 4096, nor can 8192"
    assert [row["accumulation"] for row in rows] == [256, 128, 32, 4, 1, 1]
    assert [row["micro_batch"] for row in rows] == [16] * 5 + [8], "512 GPUs take 8 samples each, in one micro-batch"
    # The global batch, and so the steps to the target, stay; the time falls, then communication wins.
    assert len({row["steps_to_target"] for row in rows}) == 1
    times = [row["time_to_target_s"] for row in rows]
    assert times[1] < times[0] and all(row["gpu_hours"] >= rows[0]["gpu_hours"] for row in rows)
    chosen = knee(rows, gpu_hours_tolerance=0.1)
    assert chosen["fastest_gpus"] == min(rows, key=lambda row: row["time_to_target_s"])["gpus"] == 512
    within = [row["gpus"] for row in rows if row["gpu_hours"] <= rows[0]["gpu_hours"] * 1.1]
    assert chosen["knee_gpus"] == max(within)
    assert knee(predict(MODEL, NODE, policy, [8]), 0.1) == {"fastest_gpus": None, "knee_gpus": None}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_cluster_file_reads_with_a_known_gpu(path):
    cluster = read_cluster(path)
    assert cluster.peak("bf16") > 100 and cluster.intra_node.bandwidth_gb_s > cluster.inter_node.bandwidth_gb_s
    # fp32 runs on TF32 tensor cores unless engine.tf32 is off.
    assert cluster.peak("fp32") > cluster.peak("fp32", tf32=False) > 0
    assert cluster.peak_kind("fp32") == "tf32" and cluster.peak_kind("fp32", tf32=False) == "fp32"
    volta = ClusterSpec(gpu="V100", gpus_per_node=8, intra_node=Link(150.0, 3.0), inter_node=Link(12.5, 8.0))
    assert volta.peak_kind("fp32") == "fp32" and volta.peak("fp32") == 15.7  # no TF32 tensor cores


@pytest.mark.parametrize("text, expected", [
    ("gpu: H100\ngpus_per_node: 8\nintra_node: {latency_us: 3}\ninter_node: {bandwidth_gb_s: 50, latency_us: 8}\n",
     "missing intra_node.bandwidth_gb_s"),
    ("gpu: H100\ngpus_per_node: 8\n", "missing intra_node, inter_node"),
    ("gpu: H100\ngpus_per_node: 8\nintra_node: {bandwidth_gb_s: 0, latency_us: 3}\n"
     "inter_node: {bandwidth_gb_s: 50, latency_us: 8}\n", "cluster.intra_node.bandwidth_gb_s=0"),
    ("gpu: TPU v5\ngpus_per_node: 4\nintra_node: {bandwidth_gb_s: 100, latency_us: 3}\n"
     "inter_node: {bandwidth_gb_s: 50, latency_us: 8}\n", "gpu='TPU v5' is not in distdl.flops's datasheet table; "
                                                          "set peak_tflops"),
    ("gpu: H100\ngpus_per_node: 8\nintra_node: {bandwidth_gb_s: 450, latency_us: 3}\n"
     "inter_node: {bandwidth_gb_s: 50, latency_us: 8}\nnics: 8\n", "unknown key cluster.nics"),
    ("- a list\n", "must be a mapping of keys"),
])
def test_bad_cluster_files_are_refused_naming_the_file_and_key(tmp_path, text, expected):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_cluster(path)
    assert expected in str(refused.value) and str(path) in str(refused.value)


@pytest.mark.parametrize("flags, expected", [
    (["--overlap", "1.5"], "--overlap 1.5: a share of the synchronization, from 0 to 1"),
    (["--mfu", "0"], "--mfu 0.0: a share of the GPU's peak FLOP/s, above 0 and at most 1"),
    (["--mfu", "40"], "--mfu 40.0: a share of the GPU's peak FLOP/s, above 0 and at most 1"),
    (["--mfu", "0.4", "--profile", "run"], "argument --profile: not allowed with argument --mfu"),
    ([], "one of the arguments --profile --mfu is required"),
    (["--tolerance", "-0.1"], "--tolerance -0.1: a share of the least GPU-hours, 0 or more"),
    (["--gpus", "8,many"], "--gpus 8,many: comma-separated whole GPU counts"),
    (["--batch", "weak"], "argument --batch: invalid choice: 'weak' (choose from 'global', 'per_gpu')"),
])
def test_bad_plan_flags_are_refused_naming_the_flag_and_what_is_allowed(tmp_path, capsys, flags, expected):
    from distdl import cli

    compute = [] if "--mfu" in flags or not flags else ["--profile", str(tmp_path)]
    args = ["plan", str(REPO / "configs/bert/pretrain_tiny.yaml"), "--cluster", str(SHIPPED[0]),
            *compute, "--out", str(tmp_path / "plan"), *flags]
    try:
        code = cli.main(args)
    except SystemExit as exited:  # argparse's own refusal of a choice
        code = exited.code
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "plan").exists()


def test_without_a_profile_resnet50_is_counted_as_torchvision_states_it():
    """ResNet-50 at 224 pixels: torchvision's published 4.089 GMACs forward (2 FLOPs each, three
    passes for forward and backward) and its parameter count."""
    from torchvision.models import ResNet50_Weights

    from distdl.config import load_config
    from distdl.planning.estimate import estimate_compute

    config = load_config(REPO / "configs/resnet/imagenet_resnet50.yaml",
                         ["data.dataset=synthetic", "data.synthetic_classes=1000", "data.image_size=224"])
    estimate = estimate_compute(config, mfu=0.5, peak_tflops=312.0)
    published = ResNet50_Weights.IMAGENET1K_V1.meta
    assert estimate.trainable_parameters == published["num_params"] == 25_557_032
    # Measured: 0.96% below; torchvision's count takes in the layers' additions and pooling too.
    assert estimate.flops_per_sample == pytest.approx(3 * 2 * published["_ops"] * 1e9, rel=0.015)
    assert estimate.compute_per_sample_s == pytest.approx(estimate.flops_per_sample / (0.5 * 312e12), rel=1e-12)



def test_without_a_profile_an_image_folders_classes_are_its_class_folders_and_no_image_is_read(tmp_path):
    from distdl.config import load_config
    from distdl.planning.estimate import estimate_compute

    for name in ("cat", "dog", "eel"):
        (tmp_path / "train" / name).mkdir(parents=True)  # no images, no val/: only the names are read
    config = load_config(REPO / "configs/resnet/imagenet_resnet50.yaml", [f"data.path={tmp_path}"])
    estimate = estimate_compute(config, mfu=0.5, peak_tflops=312.0)
    assert estimate.trainable_parameters == 25_557_032 - 2049 * 1000 + 2049 * 3  # the head: 2048 x classes + bias
    missing = load_config(REPO / "configs/resnet/imagenet_resnet50.yaml", [f"data.path={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match=f"data.path: {tmp_path / 'none' / 'train'} has no class folders"):
        estimate_compute(missing, mfu=0.5, peak_tflops=312.0)


def test_without_a_profile_bert_base_is_counted_above_kaplans_6nd_by_attention_and_the_masked_head():
    """BERT-base at 128 tokens against Kaplan et al.'s 6 x non-embedding parameters x tokens: the
    count adds the attention scores (12 layers x 4 x 128 x 768 per token, forward) and the vocabulary
    head at the masked positions, and leaves out the biases and layer norms (elementwise, not matmuls);
    nothing else differs."""
    from distdl.config import load_config
    from distdl.planning.estimate import estimate_compute
    from distdl.registry import WORKLOADS

    config = load_config(REPO / "configs/bert/pretrain_base.yaml", ["tokenizer.name_or_path=null"])
    estimate = estimate_compute(config, mfu=0.4, peak_tflops=989.4)
    model = WORKLOADS.get("bert_pretrain").example_step(config).models["model"]
    assert estimate.trainable_parameters == model.num_parameters()
    kaplan = 6 * 128 * model.num_parameters(exclude_embeddings=True)
    attention = 3 * 12 * 4 * 128 * 768 * 128
    masked_head = 3 * round(0.15 * 128) * 2 * 768 * 8000  # the decoder, tied to the word embeddings
    transform_saved = 3 * (128 - round(0.15 * 128)) * 2 * 768 * 768  # the head's dense layer at masked positions only
    elementwise = 6 * 128 * sum(p.numel() for name, p in model.named_parameters()
                                if name.endswith("bias") or "LayerNorm" in name)
    assert estimate.flops_per_sample == pytest.approx(
        kaplan + attention + masked_head - transform_saved - elementwise, rel=1e-6)


def test_without_a_profile_a_glue_model_is_its_architecture_and_a_gan_is_refused(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from distdl.config import load_config
    from distdl.planning.estimate import estimate_compute

    config = load_config(REPO / "configs/glue/rte.yaml", [f"model.name_or_path={tiny_bert}"])
    estimate = estimate_compute(config, mfu=0.3, peak_tflops=312.0)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert estimate.trainable_parameters == classifier.num_parameters()
    # Forward FLOPs of the 2-layer, 32-wide BERT on 128 tokens: each layer's projections (4 h^2) and
    # feed-forward (2 h x 64) per token, its attention scores (4 x 128 x h per token), then the pooler and
    # the 2-way classifier on one token; the backward pass twice that.
    h, tokens = 32, 128
    layer = tokens * (2 * (4 * h * h + 2 * h * 64) + 4 * tokens * h)
    assert estimate.flops_per_sample == 3 * (2 * layer + 2 * h * h + 2 * h * 2)
    assert "data.max_seq_length" in estimate.caveat
    too_long = load_config(REPO / "configs/glue/rte.yaml", [f"model.name_or_path={tiny_bert}", "data.max_seq_length=256"])
    with pytest.raises(ConfigError, match="data.max_seq_length=256 exceeds the model's max_position_embeddings=128"):
        estimate_compute(too_long, mfu=0.3, peak_tflops=312.0)
    with pytest.raises(ConfigError, match="cannot count its FLOPs without a measured run; give --profile"):
        estimate_compute(load_config(REPO / "configs/gan/dcgan_mnist.yaml"), mfu=0.3, peak_tflops=312.0)


def trace_file(tmp_path: Path, events: list[tuple], world_size: int = 2) -> Path:
    """A Chrome trace as torch.profiler writes it: (name, start µs, duration µs, thread[, category])."""
    import json

    def category(name: str) -> str:
        return "user_annotation" if "#" in name else "cpu_op"

    path = tmp_path / "rank0_steps1-2.pt.trace.json"
    path.write_text(json.dumps({"distributedInfo": {"backend": "gloo", "rank": 0, "world_size": world_size},
                                "traceEvents": [{"ph": "X", "name": e[0], "ts": e[1], "dur": e[2], "tid": e[3],
                                                 "cat": e[4] if len(e) > 4 else category(e[0])} for e in events]}))
    return path


def test_a_cpu_trace_gives_the_optimizer_the_collectives_and_their_overlap_with_the_steps_thread(tmp_path):
    from distdl.planning.trace import read_step_trace

    path = trace_file(tmp_path, [
        ("ProfilerStep#1", 0, 100, 1), ("ProfilerStep#2", 100, 100, 1),
        ("aten::mm", 0, 60, 1), ("aten::mm", 100, 50, 1),
        ("Optimizer.step#AdamW.step", 80, 10, 1), ("Optimizer.step#AdamW.step", 180, 10, 1),
        ("gloo:all_reduce", 50, 20, 2),  # 10 of its 20 µs beside the first mm
        ("gloo:all_reduce", 160, 10, 3),  # alone: exposed
        ("gloo:all_reduce", 182, 4, 2),  # inside the optimizer step (LAMB's norms): the optimizer's time
        ("aten::add", 155, 20, 4),  # another thread's op is not the steps' computation
        ("gloo:all_reduce", 300, 10, 2),  # outside the traced steps
    ])
    trace = read_step_trace(path)
    assert trace.steps == 2 and trace.world_size == 2 and trace.step_s == pytest.approx(100e-6)
    assert trace.optimizer_s == pytest.approx(10e-6) and trace.collectives_s == pytest.approx(17e-6)
    assert trace.exposed_collectives_s == pytest.approx(10e-6) and trace.overlap == pytest.approx(10 / 34)


def test_a_gpu_trace_counts_its_steps_once_and_nccl_kernels_against_the_others_in_the_gpus_ranges(tmp_path):
    """Kineto writes each range twice on a GPU: as the CPU ran it, and later as the GPU ran it."""
    from distdl.planning.trace import read_step_trace

    gpu = "gpu_user_annotation"
    path = trace_file(tmp_path, [
        ("ProfilerStep#7", 0, 30, 1), ("ProfilerStep#8", 30, 30, 1),  # the CPU runs ahead
        ("Optimizer.step#AdamW.step", 20, 5, 1), ("Optimizer.step#AdamW.step", 50, 5, 1),
        ("ProfilerStep#7", 10, 100, 9, gpu), ("ProfilerStep#8", 110, 100, 9, gpu),
        ("Optimizer.step#AdamW.step", 90, 20, 9, gpu), ("Optimizer.step#AdamW.step", 190, 20, 9, gpu),
        ("ampere_sgemm_128x64_tn", 10, 60, 7, "kernel"), ("ampere_sgemm_128x64_tn", 110, 60, 7, "kernel"),
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 50, 40, 8, "kernel"),  # 20 µs beside the sgemm
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 170, 20, 8, "kernel"),  # exposed
        ("gloo:all_reduce", 0, 100, 2),  # a GPU trace: only kernels count
    ])
    trace = read_step_trace(path)
    assert trace.steps == 2 and trace.step_s == pytest.approx(100e-6) and trace.optimizer_s == pytest.approx(20e-6)
    assert trace.collectives_s == pytest.approx(30e-6) and trace.overlap == pytest.approx(20 / 60)
    assert trace.exposed_collectives_s == pytest.approx(20e-6)  # (70-90 and 170-190)/2, none in the optimizer
    alone = read_step_trace(trace_file(tmp_path, [("ProfilerStep#1", 0, 100, 1), ("aten::mm", 0, 90, 1)]))
    assert alone.overlap is None and alone.collectives_s == 0


def test_a_profile_trace_that_is_not_one_is_refused_naming_the_file(tmp_path):
    from distdl.planning.trace import read_step_trace

    for text, expected in (("{not json", "not a readable torch.profiler trace"),
                           ('{"traceEvents": [{"ph": "X", "name": "aten::mm", "ts": 0, "dur": 5}]}',
                            "no ProfilerStep#N range")):
        path = tmp_path / "rank0_steps1-2.pt.trace.json"
        path.write_text(text)
        with pytest.raises(ConfigError, match=expected) as refused:
            read_step_trace(path)
        assert str(path) in str(refused.value)


def test_zero_splits_the_optimizer_step_over_the_gpus_and_stage_0_repeats_it():
    for stage, expected in ((0, 0.1), (1, 0.1 / 8), (3, 0.1 / 8)):
        model = StepModel(compute_per_sample_s=0.0, micro_batch=1, gradient_bytes=0.0, zero_stage=stage,
                          optimizer_s=0.1)
        latency = gradient_sync_seconds(0.0, stage, 8, NODE)  # the ring's hops, with nothing to send
        assert model.step_seconds(8, 1, NODE) - latency == pytest.approx(expected, rel=1e-12)


def a_profile(trace=None, world_size: int = 2, zero_stage: int = 0):
    from distdl.planning.inputs import Profile

    # 64 samples a step at 400 samples/s: a 160 ms step, 32 samples on each of 2 workers.
    return Profile(run_dir=Path("runs/profile"), world_size=world_size, micro_batch=32, global_batch=64,
                   precision="fp32", zero_stage=zero_stage, trainable_parameters=1_000_000, samples_per_s=400.0,
                   windows=3, mfu=None, flops_per_sample=None, device=None, trace=trace)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_traced_profile_gives_compute_less_its_measured_optimizer_and_exposed_collectives(zero_stage):
    from distdl.config import load_config
    from distdl.planning.plan import step_model
    from distdl.planning.trace import StepTrace

    config = load_config(REPO / "configs/bert/pretrain_tiny.yaml", [f"engine.zero_stage={zero_stage}"])
    # Traced at 200 ms a step (the profiler's own cost): 20 ms optimizer, 40 ms collectives, a quarter
    # beside computation, 30 exposed.
    trace = StepTrace(Path("rank0_steps4-5.pt.trace.json"), 2, 2, 0.200, 0.020, 0.040, 0.030, 0.25)
    model, notes = step_model(config, a_profile(trace, zero_stage=zero_stage), NODE, overlap=None)
    # Shares of the traced step, applied to the profile's 160 ms: 16 ms optimizer, 24 ms exposed.
    assert model.overlap == 0.25
    assert model.optimizer_s == pytest.approx(0.016 * (2 if zero_stage else 1), rel=1e-12)
    assert model.compute_per_sample_s == pytest.approx((0.160 - 0.016 - 0.024) / 32, rel=1e-12)
    assert any("25% of the collectives beside computation" in note for note in notes)
    # A stated overlap is for the planned runs: the profile's step is split by what it measured.
    stated, _ = step_model(config, a_profile(trace, zero_stage=zero_stage), NODE, overlap=0.0)
    assert stated.overlap == 0.0 and stated.compute_per_sample_s == model.compute_per_sample_s
    # A trace of 2 workers without collectives (a torch that records them otherwise): the modelled ones.
    silent = StepTrace(Path("rank0_steps4-5.pt.trace.json"), 2, 2, 0.200, 0.020, 0.0, 0.0, None)
    fallback, notes = step_model(config, a_profile(silent, zero_stage=zero_stage), NODE, overlap=None)
    synced = gradient_sync_seconds(4e6, zero_stage, 2, NODE)
    assert fallback.compute_per_sample_s == pytest.approx((0.160 - 0.016 - synced) / 32, rel=1e-12)
    assert any("its trace shows no collectives" in note for note in notes)


def test_an_untraced_profile_on_several_workers_gives_compute_less_the_modelled_synchronization():
    from distdl.config import load_config
    from distdl.planning.plan import step_model

    config = load_config(REPO / "configs/bert/pretrain_tiny.yaml", ["engine.zero_stage=0"])
    model, notes = step_model(config, a_profile(), NODE, overlap=None)
    synced = gradient_sync_seconds(4e6, 0, 2, NODE)
    assert model.overlap == 0.0 and model.optimizer_s == 0.0
    assert model.compute_per_sample_s == pytest.approx((0.160 - synced) / 32, rel=1e-12)
    alone, _ = step_model(config, a_profile(world_size=1), NODE, overlap=None)
    assert alone.compute_per_sample_s == pytest.approx(0.160 / 64, rel=1e-12)
    assert any("optimizer step is inside the profiled compute" in note for note in notes)


def test_the_profiles_latest_steps_trace_is_read_and_one_of_another_world_size_refused(tmp_path):
    import os
    import shutil

    from distdl.planning.inputs import rank_zero_trace

    (tmp_path / "profiles").mkdir()
    steps = [("ProfilerStep#1", 0, 100, 1), ("aten::mm", 0, 90, 1)]
    later = trace_file(tmp_path, steps, world_size=4)
    shutil.move(later, tmp_path / "profiles" / "rank0_steps10-11.pt.trace.json")
    earlier = shutil.move(trace_file(tmp_path, steps + [("ProfilerStep#2", 100, 100, 1)], world_size=2),
                          tmp_path / "profiles" / "rank0_steps2-3.pt.trace.json")
    os.utime(earlier, (2e9, 2e9))  # copied last: the newest file, not the latest steps
    with pytest.raises(ConfigError) as refused:
        rank_zero_trace(tmp_path, world_size=2)
    assert "rank0_steps10-11.pt.trace.json: traced on 4 workers" in str(refused.value)
    assert f"{tmp_path / 'summary.json'} has world_size=2" in str(refused.value)
    assert rank_zero_trace(tmp_path, world_size=4).steps == 1


def test_the_published_comparison_in_the_docs_is_what_its_benchmark_computes(monkeypatch):
    """benchmarks/published_scaling.py rerun (arithmetic only) gives its committed results, and every
    error the docs' table states."""
    import json

    from tests.helpers.benchmark_scripts import load_benchmark

    benchmark = load_benchmark("published_scaling", monkeypatch)
    cases = [*benchmark.nvidia_bert_a100(), *benchmark.bert_time_to_train(), *benchmark.horovod()]
    committed = json.loads((REPO / "benchmarks/results/published_scaling.json").read_text())["cases"]
    assert [case["case"] for case in cases] == [case["case"] for case in committed]
    docs = (REPO / "docs/plan.md").read_text()
    for case, saved in zip(cases, committed):
        for row, saved_row in zip(case["rows"], saved["rows"]):
            assert row["error"] == pytest.approx(saved_row["error"], abs=1e-12)
            if row is not case["rows"][0]:
                assert f"{row['error']:+.1%}" in docs, (case["case"], row["gpus"])
