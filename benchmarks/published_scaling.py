"""`distdl plan`'s step model against published multi-node figures, on paper.

For each case the model takes one published single-node (or single-GPU) figure and the
interconnect the source states (or the hardware's datasheet where it does not), and predicts the
published multi-node figures; the error is prediction / published - 1. The compute per sample is
calibrated on the single-node figure the way `distdl plan` treats a profile from several workers:
that figure's step less the synchronization the model gives for it on the node. No overlap of
communication with the backward pass is assumed (plan's default, --overlap 0).

Cases (sources in docs/plan.md, "Against published numbers"):
- NVIDIA DeepLearningExamples, PyTorch BERT-large pretraining on DGX A100 (8x A100 80GB), 1-32
  nodes at a fixed global batch (65,536 at 128 tokens, 32,768 at 512): throughput, mixed precision
  and TF32.
- DeepSpeed's BERT-large record (2020): time to train on 1, 4, 16 and 64 DGX-2 (16 V100 each),
  and NVIDIA's own BERT on 1, 4, 16 and 64 DGX-2H, the run DeepSpeed compares with (44 and 144
  minutes against 67 and 236 on 1,024 and 256 GPUs).
- Horovod's first benchmarks (2017): Inception V3, ResNet-101 and VGG-16 on 16 GPUs (4 servers,
  25 Gbit/s RoCE) and 64 GPUs (16 servers, 40 Gbit/s TCP) against one GPU, 64 images per GPU.

    .venv/bin/python benchmarks/published_scaling.py [--out benchmarks/results/published_scaling.json]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from provenance import write_results

from distdl.planning.cluster import ClusterSpec, Link, read_cluster
from distdl.planning.model import BatchPolicy, StepModel, gradient_sync_seconds

REPO = Path(__file__).resolve().parents[1]

# BERT-large as NVIDIA and DeepSpeed train it (vocabulary padded to 30,528), with its NSP head: the
# parameters of transformers' BertForPreTraining at that size.
BERT_LARGE = 336_232_258
# DGX-2 / DGX-2H: 16 V100 SXM3 on NVSwitch (6 NVLink 2 links per GPU, 25 GB/s each way: 150), eight
# 100 Gb/s EDR InfiniBand ports for compute per node (NVIDIA's SuperPOD: "Eight connections per
# DGX-2H node"): 100 GB/s per node, 6.25 per GPU.
DGX2 = ClusterSpec(gpu="V100", gpus_per_node=16, intra_node=Link(150.0, 3.0), inter_node=Link(6.25, 8.0),
                   name="dgx-2-edr", max_nodes=96)
DGX_A100 = read_cluster(REPO / "clusters/dgx_a100_hdr.yaml")  # as shipped: NVLink 3, one HDR NIC per GPU


def horovod_servers(gbit_per_s: float, latency_us: float) -> ClusterSpec:
    """Uber's 2017 servers: 4 Pascal GPUs on PCIe 3 x16 (about 10 GB/s each way, an assumption: the
    README names no intra-server link) and one NIC per server, shared by its 4 GPUs."""
    return ClusterSpec(gpu="P100", gpus_per_node=4, intra_node=Link(10.0, 10.0),
                       inter_node=Link(gbit_per_s / 8 / 4, latency_us), name=f"4xP100-{gbit_per_s:g}gbit",
                       max_nodes=32, peak_tflops=18.7)


@dataclass(frozen=True)
class Phase:
    """A stretch of training at one shape: its global batch, micro-batch and gradient bytes."""

    global_batch: int
    micro_batch: int
    gradient_bytes: float
    steps: float = 1.0  # for time to train; a throughput case has one phase of one step


def calibrated(phase: Phase, cluster: ClusterSpec, gpus: int, step_s: float, policy: BatchPolicy) -> StepModel:
    """The step model whose step at `gpus` is the published `step_s`: its compute per sample is that
    step less the modelled synchronization, over the samples a GPU takes."""
    sync = gradient_sync_seconds(phase.gradient_bytes, 0, gpus, cluster)
    per_gpu = policy.global_batch(gpus) // gpus
    return StepModel(compute_per_sample_s=(step_s - sync) / per_gpu, micro_batch=phase.micro_batch,
                     gradient_bytes=phase.gradient_bytes)


def step_seconds(model: StepModel, cluster: ClusterSpec, policy: BatchPolicy, gpus: int) -> float:
    return model.step_seconds(gpus, policy.global_batch(gpus) // gpus, cluster)


def throughput_case(name: str, cluster: ClusterSpec, phase: Phase, policy: BatchPolicy,
                    published: dict[int, float], source: str) -> dict:
    """Published samples/s at several GPU counts; the first is the calibration point."""
    base = next(iter(published))
    model = calibrated(phase, cluster, base, policy.global_batch(base) / published[base], policy)
    rows = []
    for gpus, rate in published.items():
        batch = policy.global_batch(gpus)
        predicted = batch / step_seconds(model, cluster, policy, gpus)
        rows.append({**row(gpus, cluster, rate, predicted, per_gpu=lambda x, g=gpus: x / g, base=(published[base] / base)),
                     **step_gap(batch / rate, batch / predicted, gradient_sync_seconds(phase.gradient_bytes, 0, gpus,
                                                                                       cluster))})
    return {"case": name, "kind": "samples/s", "cluster": asdict(cluster), "calibrated_on_gpus": base,
            "phase": asdict(phase), "policy": asdict(policy), "source": source, "rows": rows}


def time_to_train_case(name: str, cluster: ClusterSpec, phases: list[Phase], per_gpu_rates: list[float],
                       published_s: dict[int, float], source: str) -> dict:
    """Published time to train at several GPU counts over phases of fixed global batch and steps.
    `per_gpu_rates`: each phase's published samples/s per GPU on one node, which set the phases'
    shares of the compute; one factor then scales both to the published single-node time."""
    base = min(published_s)
    policies = [BatchPolicy("global", phase.global_batch) for phase in phases]
    models = [calibrated(phase, cluster, base, phase.global_batch / (rate * base), policy)
              for phase, rate, policy in zip(phases, per_gpu_rates, policies)]

    def total(gpus: int, models: list[StepModel]) -> float:
        return sum(phase.steps * step_seconds(model, cluster, policy, gpus)
                   for phase, model, policy in zip(phases, models, policies))

    from_rates = total(base, models)
    # The rest of the published single-node time (data, evaluation, checkpoints, start-up) is taken
    # as compute: one factor on every phase's compute per sample.
    sync_s = sum(phase.steps * gradient_sync_seconds(phase.gradient_bytes, 0, base, cluster) for phase in phases)
    factor = (published_s[base] - sync_s) / (from_rates - sync_s)
    scaled = [replace(model, compute_per_sample_s=model.compute_per_sample_s * factor) for model in models]
    steps = sum(phase.steps for phase in phases)
    rows = [{**row(gpus, cluster, seconds / 60, total(gpus, scaled) / 60,
                   per_gpu=lambda minutes, g=gpus: 1 / (minutes * g), base=1 / (published_s[base] / 60 * base)),
             **step_gap(seconds / steps, total(gpus, scaled) / steps,
                        sum(phase.steps * gradient_sync_seconds(phase.gradient_bytes, 0, gpus, cluster)
                            for phase in phases) / steps)}
            for gpus, seconds in published_s.items()]
    return {"case": name, "kind": "minutes to train", "cluster": asdict(cluster), "calibrated_on_gpus": base,
            "phases": [asdict(phase) for phase in phases], "per_gpu_rates": per_gpu_rates,
            "single_node_from_rates_min": from_rates / 60, "source": source, "rows": rows}


def row(gpus: int, cluster: ClusterSpec, published: float, predicted: float, per_gpu, base: float) -> dict:
    """One GPU count: published and predicted figures, the error, and both scaling efficiencies
    (per-GPU rate against the calibration point's)."""
    return {"gpus": gpus, "nodes": -(-gpus // cluster.gpus_per_node), "published": published, "predicted": predicted,
            "error": predicted / published - 1, "published_efficiency": per_gpu(published) / base,
            "predicted_efficiency": per_gpu(predicted) / base}


def step_gap(published_step_s: float, predicted_step_s: float, sync_s: float) -> dict:
    """The step the published figure implies against the predicted one (a mean over phases for time
    to train): the gap is what the model misses (positive) or counts too much of (negative), such
    as synchronization the backward pass hides."""
    return {"published_step_ms": published_step_s * 1e3, "predicted_step_ms": predicted_step_s * 1e3,
            "modelled_sync_ms": sync_s * 1e3, "gap_ms": (published_step_s - predicted_step_s) * 1e3}


def nvidia_bert_a100() -> list[dict]:
    source = ("NVIDIA DeepLearningExamples, PyTorch/LanguageModeling/BERT/README.md (commit a07d20a), "
              "'Pre-training NVIDIA DGX A100 (8x A100 80GB) Multi-node Scaling'")
    nodes = [1, 2, 4, 8, 16, 32]
    tables = [  # (precision, tokens, global batch, micro-batch, bytes per gradient, sequences/s)
        ("mixed", 128, 65536, 256, 2, [4553, 9191, 18119, 35774, 70555, 138294]),
        ("mixed", 512, 32768, 32, 2, [1648, 3291, 6464, 13005, 25570, 49663]),
        ("TF32", 128, 65536, 128, 4, [2486, 4979, 9859, 19815, 38866, 75706]),
        ("TF32", 512, 32768, 16, 4, [854, 1684, 3293, 6515, 12131, 21298]),
    ]
    return [{**throughput_case(f"BERT-large pretraining, {tokens} tokens, {precision}, DGX A100 + HDR", DGX_A100,
                               Phase(batch, micro, BERT_LARGE * width), BatchPolicy("global", batch),
                               {8 * n: rate for n, rate in zip(nodes, rates)}, source),
             "label": f"{tokens} tokens, {precision}"}
            for precision, tokens, batch, micro, width, rates in tables]


def bert_time_to_train() -> list[dict]:
    hours = 3600.0
    deepspeed = time_to_train_case(
        "DeepSpeed BERT-large record, time to train, DGX-2 + EDR", DGX2,
        # LAMB, 403 M samples at 128 tokens in batches of 64K, about 20 M (18-22 M) at 512 in 32K.
        [Phase(65536, 64, BERT_LARGE * 2, 403e6 / 65536), Phase(32768, 8, BERT_LARGE * 2, 20e6 / 32768)],
        [272.0, 52.0],  # DeepSpeed's single-V100 samples/s at 128 and 512 tokens
        {16: 33 * hours + 13 * 60, 64: 8 * hours + 41 * 60, 256: 144 * 60, 1024: 44 * 60},
        "deepspeed.ai/2020/05/27/fastest-bert-training.html, Table 1; microsoft/DeepSpeed "
        "docs/_tutorials/bert-pretraining.md (recipe and sample counts)")
    nvidia = time_to_train_case(
        "NVIDIA BERT-large (what DeepSpeed compares with), time to train, DGX-2H + EDR", DGX2,
        # NVIDIA's recipe: 7,038 steps of 64K at 128 tokens, 1,563 of 32K at 512.
        [Phase(65536, 64, BERT_LARGE * 2, 7038), Phase(32768, 8, BERT_LARGE * 2, 1563)],
        [3379.2 / 16, 625.66 / 16],  # its one-DGX-2H sequences/s at 128 and 512 tokens, per GPU
        {16: 58.4 * hours, 64: 15.35 * hours, 256: 3.94 * hours, 1024: 1.124 * hours},
        "NVIDIA DeepLearningExamples, PyTorch/LanguageModeling/BERT/README.md at commit 78ec680 "
        "('Pre-training loss results' and 'multiple NVIDIA DGX-2H' tables)")
    return [{**deepspeed, "label": "DeepSpeed (its record)"}, {**nvidia, "label": "NVIDIA BERT"}]


def horovod() -> list[dict]:
    source = "horovod/horovod README.md at commit d54e3a8 (2017-09-05), the two benchmark tables"
    # torchvision's counts of the three (Inception V3 without its auxiliary head, which is not trained here).
    parameters = {"Inception V3": 23_834_568, "ResNet-101": 44_549_160, "VGG-16": 138_357_544}
    rdma_16 = {"Inception V3": (134.4, 2022.6), "ResNet-101": (119.4, 1746.2), "VGG-16": (130.9, 1787.4)}
    tcp_64 = {"Inception V3": (148.8, 7932.1), "ResNet-101": (136.0, 7741.6), "VGG-16": (149.6, 6084.2)}
    cases = []
    for gpus, cluster, table, network in ((16, horovod_servers(25, 5.0), rdma_16, "25 Gbit/s RoCE"),
                                          (64, horovod_servers(40, 25.0), tcp_64, "40 Gbit/s TCP")):
        for model, (one, many) in table.items():
            case = throughput_case(f"Horovod {model}, {gpus} GPUs over {network}", cluster,
                                   Phase(64, 64, parameters[model] * 4), BatchPolicy("per_gpu", 64),
                                   {1: one, gpus: many}, source)
            cases.append({**case, "label": f"{model}, {network}"})
    return cases


def markdown(cases: list[dict]) -> str:
    lines = ["| case | GPUs | published | predicted | error | published eff. | predicted eff. | step (ms) | "
             "modelled sync (ms) | gap (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        for r in case["rows"][1:]:
            lines.append(f"| {case['case']} ({case['kind']}) | {r['gpus']} | {r['published']:.4g} | "
                         f"{r['predicted']:.4g} | {r['error']:+.1%} | {r['published_efficiency']:.1%} | "
                         f"{r['predicted_efficiency']:.1%} | {r['published_step_ms']:.4g} | "
                         f"{r['modelled_sync_ms']:.3g} | {r['gap_ms']:+.3g} |")
    return "\n".join(lines)


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"NVIDIA BERT, DGX A100": [c for c in cases if "DGX A100" in c["case"]],
              "BERT time to train, DGX-2": [c for c in cases if "time to train" in c["case"]],
              "Horovod, 1 GPU to 16 and 64": [c for c in cases if c["case"].startswith("Horovod")]}
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (title, members) in zip(axes, groups.items()):
        for i, case in enumerate(members):
            gpus = [r["gpus"] for r in case["rows"]]
            color = f"C{i}"
            axis.plot(gpus, [r["predicted_efficiency"] for r in case["rows"]], "-", color=color, alpha=0.7)
            axis.plot(gpus, [r["published_efficiency"] for r in case["rows"]], "o", color=color, label=case["label"])
        axis.set_xscale("log", base=2)
        axis.set_ylim(0.4, 1.1)
        axis.set_title(title)
        axis.set_xlabel("GPUs")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("scaling efficiency (dots: published, lines: predicted)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/published_scaling.json"))
    args = parser.parse_args()
    cases = [*nvidia_bert_a100(), *bert_time_to_train(), *horovod()]
    out = Path(args.out)
    write_results(out, {"overlap": 0.0, "cases": cases})
    plot(cases, out.with_suffix(".png"))
    print(markdown(cases))
    for case in cases:
        if "single_node_from_rates_min" in case:
            published = case["rows"][0]["published"]
            print(f"{case['case']}: the single node from the per-GPU rates alone: "
                  f"{case['single_node_from_rates_min']:.0f} min, published {published:.0f} "
                  f"({case['single_node_from_rates_min'] / published - 1:+.1%})")


if __name__ == "__main__":
    main()
