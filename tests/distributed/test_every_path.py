"""Every workload at every precision and ZeRO stage, and every shipped config as shipped: a few steps
each on 2 gloo ranks of the real worker loop and DeepSpeed (tests/helpers/local_workers.py).

Each run must end with finite losses, a real (non-null, finite) gradient norm at every log step, and
identical weights on both ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from pathlib import Path

import pytest
import torch

from distdl.config import load_config, read_yaml
from distdl.registry import WORKLOADS
from distdl.rundir import RunSummary, read_metrics
from distdl.workloads.base import WorkerContext
from tests.helpers.shared import CORPUS, QUIET, REPO

# ----------------------------------------------------------------------------- the checks


@functools.cache
def reference_peak_tflops(precision: str, threads: int) -> float:
    """This machine's matmul peak at `precision` on `threads` threads, measured by the test itself (the
    best of a second of 1024x1024 matmuls), not by the run whose MFU it bounds."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = (torch.randn(1024, 1024).to(torch.bfloat16 if precision == "bf16" else torch.float32) for _ in range(2))
        torch.mm(a, b)
        best, started = 0.0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            begin = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * 1024**3 / (time.perf_counter() - begin) / 1e12)
        return best
    finally:
        torch.set_num_threads(saved)



def check_run(config, summary) -> list[dict]:
    assert summary["completed"] and summary["steps"] == config.trainer.max_steps, summary
    assert summary["world_size"] == 2
    # summary.json holds what RunSummary declares (W&B is off here), plus GLUE's own entries.
    declared = set(RunSummary.__annotations__) - {"wandb_run_dir", "wandb_run_id"}
    assert declared <= set(summary), f"missing: {declared - set(summary)}"
    assert set(summary) - declared <= {"task", "best", "submission_dir"}, set(summary) - declared
    assert summary["parameter_checksums"][0] == summary["parameter_checksums"][1], "the ranks' weights differ"
    logged = [m for m in read_metrics(config.run_dir) if any(k.startswith("loss") for k in m)]
    assert [m["step"] for m in logged] == list(range(1, config.trainer.max_steps + 1))
    for metrics in logged:
        losses = {k: v for k, v in metrics.items() if k.startswith("loss")}
        norms = {k: v for k, v in metrics.items() if k.startswith("grad_norm")}
        assert losses and all(isinstance(v, float) and math.isfinite(v) for v in losses.values()), metrics
        assert norms and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in norms.values()), metrics
        # CPU workers measure their matmul peak, so MFU is known here.
        assert metrics["mfu"] > 0 and metrics["tflops_per_device"] > 0, metrics
    # The evaluation at the last step gives what the workload declares a sweep may rank by.
    evaluated = {key for metrics in read_metrics(config.run_dir) for key in metrics if key.startswith("eval_")}
    assert evaluated == set(WORKLOADS.get(config.workload).evaluation_metrics(config.sections)), evaluated
    usage = summary["utilization"]
    assert usage["flops_per_step"] > 0 and usage["mean_mfu"] > 0, usage
    assert usage["peak_source"].startswith(f"measured {config.engine.precision} matmul"), usage
    # No step beats the machine's matmul peak as the test measures it (the run's MFU is against a peak
    # the run measured itself, which a busy machine can understate).
    threads = int(re.search(r"on (\d+) CPU thread", usage["peak_source"]).group(1))
    peak = reference_peak_tflops(config.engine.precision, threads)
    assert all(metrics["tflops_per_device"] / peak < 1 for metrics in logged), ([m["tflops_per_device"] for m in logged],
                                                                               peak)
    return logged


def short_run(*overrides: str) -> list[str]:
    """A few steps, a line and an evaluation at each, W&B off, nothing else changed."""
    return ["trainer.max_steps=3", "trainer.epochs=null", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", *QUIET, *overrides]


# ----------------------------------------------------------------------------- every workload x precision x stage

MATRIX_BASES = {
    "bert_pretrain": ("bert/pretrain_tiny.yaml", lambda f: [
        f"data.path={CORPUS}", f"tokenizer.name_or_path={f['minilm']}", "data.max_seq_length=32",
        "data.eval_fraction=0.01", "trainer.micro_batch_size=4", "trainer.global_batch_size=8"]),
    # STS-B: float regression labels, which reach the model in the compute dtype too.
    "glue_stsb": ("glue/stsb.yaml", lambda f: [
        f"model.name_or_path={f['tiny_bert']}", f"data.path={f['glue_dir']}", "data.max_seq_length=32",
        "trainer.micro_batch_size=4", "trainer.global_batch_size=8"]),
    "resnet": ("resnet/mnist_laptop.yaml", lambda f: [
        f"data.path={f['mnist_root']}", "data.train_subset=512", "trainer.micro_batch_size=8",
        "trainer.global_batch_size=16"]),
    # Noise, real images and the generator's update through the bare critic, in both objectives.
    "gan_dcgan": ("gan/dcgan_mnist.yaml", lambda f: [
        f"data.path={f['mnist_root']}", "data.train_subset=512", "model.generator_width=16",
        "model.discriminator_width=16", "trainer.micro_batch_size=8", "trainer.global_batch_size=16"]),
    "gan_wgan_gp": ("gan/wgan_gp_mnist.yaml", lambda f: [
        f"data.path={f['mnist_root']}", "data.train_subset=512", "model.generator_width=16",
        "model.discriminator_width=16", "objective.n_critic=1", "trainer.micro_batch_size=8",
        "trainer.global_batch_size=16"]),
}
# GANs step their generator outside its engine's step, which ZeRO-3 cannot (Gan.validate refuses it).
MATRIX = [(name, precision, stage) for name in MATRIX_BASES for precision in ("fp32", "bf16") for stage in (0, 2, 3)
          if not (name.startswith("gan") and stage == 3)]


@pytest.fixture(scope="module")
def data(minilm, tiny_bert, glue_dir, mnist_root, small_digits_folder) -> dict[str, Path]:
    return {"minilm": minilm, "tiny_bert": tiny_bert, "glue_dir": glue_dir, "mnist_root": mnist_root,
            "digits_folder": small_digits_folder}


@pytest.mark.parametrize("name, precision, stage", MATRIX, ids=[f"{n}-{p}-zero{s}" for n, p, s in MATRIX])
def test_every_workload_trains_at_every_precision_and_zero_stage(local_workers, data, tmp_path, name, precision,
                                                                 stage):
    if not CORPUS.is_dir() and name == "bert_pretrain":
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    file, overrides = MATRIX_BASES[name]
    config = load_config(REPO / "configs" / file, [
        f"run.storage_path={tmp_path}", *overrides(data), *short_run(), f"engine.precision={precision}",
        f"engine.zero_stage={stage}"])
    summary = local_workers.train(config)
    check_run(config, summary)
    if stage == 3:  # partitioned weights are counted whole
        assert summary["trainable_parameters"] == trainable_parameters(config)


def trainable_parameters(config) -> dict[str, int]:
    """Each of the workload's models' trainable weights, counted on models built in this process."""
    context = WorkerContext(rank=0, world_size=1, seed=0, micro_batch_size=1, run_dir=config.run_dir,
                            device=torch.device("cpu"))
    models = WORKLOADS.get(config.workload)(dict(config.sections), context).build_models()
    return {name: sum(p.numel() for p in model.parameters() if p.requires_grad) for name, model in models.items()}


# GANs: no ZeRO-3. WGAN-GP's double backward through the recomputation: tests/unit/test_gan_parts.py.
CHECKPOINTING = [(name, stage) for name in ("bert_pretrain", "glue_stsb", "resnet") for stage in (0, 3)] + [
    ("gan_dcgan", 2)]


@pytest.mark.parametrize("name, stage", CHECKPOINTING, ids=[f"{n}-zero{s}" for n, s in CHECKPOINTING])
def test_activation_checkpointing_gives_the_same_losses_and_weights(local_workers, data, tmp_path, name, stage):
    """Recomputed layers replay dropout's RNG state and leave batch norm's statistics alone, so
    training is unchanged, at ZeRO-3 too, and for a GAN's two engines."""
    if not CORPUS.is_dir() and name == "bert_pretrain":
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    file, overrides = MATRIX_BASES[name]
    model = ["model.name=cifar_resnet20"] if name == "resnet" else []  # the laptop config's MLP has no blocks
    runs = {}
    for checkpointing in ("false", "true"):
        config = load_config(REPO / "configs" / file, [
            f"run.storage_path={tmp_path}", f"run.name=checkpointing-{checkpointing}", *overrides(data),
            *short_run(), *model, f"engine.zero_stage={stage}", f"model.activation_checkpointing={checkpointing}"])
        summary = local_workers.train(config)
        runs[checkpointing] = (summary, check_run(config, summary))
    (plain_summary, plain), (checkpointed_summary, checkpointed) = runs["false"], runs["true"]
    losses = ("loss_d", "loss_g") if name.startswith("gan") else ("loss",)
    for loss in losses:
        assert [m[loss] for m in checkpointed] == pytest.approx([m[loss] for m in plain], rel=1e-6)
    # Recomputation runs the same kernels on the same inputs: the weights agree bit for bit.
    assert checkpointed_summary["parameter_checksums"] == plain_summary["parameter_checksums"]


# SAM around each single-model workload (the GANs refuse it), at a ZeRO stage and precision each.
SHARPNESS_AWARE = [("resnet", "fp32", 0, "false"), ("glue_stsb", "bf16", 2, "true"), ("bert_pretrain", "fp32", 1, "false")]


@pytest.mark.parametrize("name, precision, stage, adaptive", SHARPNESS_AWARE,
                         ids=[f"{n}-{p}-zero{s}-adaptive_{a}" for n, p, s, a in SHARPNESS_AWARE])
def test_sam_trains_every_workload_that_allows_it(local_workers, data, tmp_path, name, precision, stage, adaptive):
    """The loop logs the loss at the weights themselves as `loss` and the moved weights' as `sam_loss`:
    without dropout (the laptop MLP) the moved loss is the higher, since the move ascends the loss."""
    if not CORPUS.is_dir() and name == "bert_pretrain":
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    file, overrides = MATRIX_BASES[name]
    config = load_config(REPO / "configs" / file, [
        f"run.storage_path={tmp_path}", *overrides(data), *short_run(), f"engine.precision={precision}",
        f"engine.zero_stage={stage}", "optimizer.sam.rho=0.05", f"optimizer.sam.adaptive={adaptive}"])
    logged = check_run(config, local_workers.train(config))
    assert all(math.isfinite(m["sam_loss"]) for m in logged)
    if name == "resnet":
        assert all(m["sam_loss"] > m["loss"] for m in logged), logged


def test_injected_noise_changes_the_updates_but_not_the_loss_it_reports(local_workers, data, tmp_path):
    """bf16 at ZeRO-1. Langevin noise: each rank adds its own noise to its partition of the fp32
    weights, and the all-gather after the step gives both ranks the same weights. Minibatch noise:
    the per-example losses' mean is the workload's own loss (GLUE's: tests/unit/test_glue.py). Both
    leave the first step's loss, taken at the same weights, as it is."""
    file, overrides = MATRIX_BASES["resnet"]
    runs = {}
    for name, noise in (("plain", "null"), ("langevin", "{kind: isotropic, temperature: 1.0e-4}"),
                        ("minibatch", "{kind: minibatch, batch_size: 4}")):
        config = load_config(REPO / "configs" / file, [
            f"run.storage_path={tmp_path}", f"run.name={name}", *overrides(data), *short_run(),
            "engine.precision=bf16", "engine.zero_stage=1", f"optimizer.noise={noise}"])
        summary = local_workers.train(config)
        runs[name] = (summary, check_run(config, summary))
    plain_summary, plain = runs.pop("plain")
    for name, (summary, logged) in runs.items():
        assert logged[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5), name
        assert summary["parameter_checksums"] != plain_summary["parameter_checksums"], name
    assert runs["langevin"][0]["optimizers"] == {"model": "LangevinSGD"}
    assert runs["minibatch"][0]["optimizers"] == plain_summary["optimizers"] == {"model": "SGD"}


# ----------------------------------------------------------------------------- every shipped config

# A file holding only a sweep: section (configs/glue/search.yaml) is not a training config; its
# sweep runs, on a shipped task config, in tests/distributed/test_sweeps.py.
SHIPPED = sorted(path for path in (REPO / "configs").rglob("*.yaml") if set(read_yaml(path)) != {"sweep"})


def shipped_config(path: Path, storage: Path, data: dict[str, Path], *extra: str):
    """The config as shipped, and as run here: only its data source, its sizes (loader processes among
    them) and scaling.use_gpu changed
    (the gradient accumulation too, to 2 at most: the recipes reach their global batches through
    hundreds of accumulation steps)."""
    import copy

    import yaml

    from distdl.config import config_from_dict, parse_override, set_dotted
    from distdl.studies.base import read_study_file

    # A study file is a training config plus a study: section (its trials set their own batches).
    raw = read_study_file(path, []).training if path.parent.name == "studies" else yaml.safe_load(path.read_text())
    shipped = config_from_dict(copy.deepcopy(raw))
    accumulation = min(shipped.trainer.gradient_accumulation_steps, 2)
    sizes = ["scaling.num_workers=2", "scaling.use_gpu=false", "trainer.micro_batch_size=4",
             f"trainer.global_batch_size={4 * 2 * accumulation}"]
    # One loader process per rank, not the recipe's 6: the loader path runs, and 2 cores do not spend
    # 12 processes' start-up importing torch for 3 steps.
    if getattr(shipped.sections.get("data"), "loader_workers", 0) > 1:
        sizes.append("data.loader_workers=1")
    for override in [f"run.storage_path={storage}", *sizes, *short_run(), *data_source(shipped, data), *extra]:
        set_dotted(raw, *parse_override(override))
    return shipped, config_from_dict(raw)


def data_source(shipped, data: dict[str, Path]) -> list[str]:
    """Where each shipped config's data comes from here (no hub, no downloads), and sizes that must shrink."""
    if shipped.workload == "bert_pretrain":
        # bert-base-uncased's WordPiece vocabulary is the one MiniLM ships.
        tokenizer = [f"tokenizer.name_or_path={data['minilm']}"] if shipped.sections["tokenizer"].name_or_path else []
        return [f"data.path={CORPUS}", "data.max_seq_length=32", "data.eval_fraction=0.01", *tokenizer]
    if shipped.workload == "glue":  # bert-base-uncased from the hub: a 2-layer BERT with its tokenizer here
        return [f"model.name_or_path={data['tiny_bert']}", f"data.path={data['glue_dir']}", "data.max_seq_length=32"]
    dataset = shipped.sections["data"].dataset
    sources = {"mnist": [f"data.path={data['mnist_root']}", "data.train_subset=512"],
               "imagefolder": [f"data.path={data['digits_folder']}", "data.image_size=32"],
               "cifar10": ["data.dataset=synthetic", "data.synthetic_train_size=64", "data.synthetic_eval_size=16"]}
    return sources.get(dataset, [])  # digits, mnist5k: they ship inside installed packages


PHASE_1 = REPO / "configs/bert/pretrain_base_lamb_phase1.yaml"


@pytest.fixture(scope="module")
def lamb_phase1(local_workers, data, tmp_path_factory):
    """Phase 1 of the two-phase LAMB recipe, as this check runs it, keeping its final checkpoint:
    phase 2 starts from it."""
    if not CORPUS.is_dir():
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    shipped, config = shipped_config(PHASE_1, tmp_path_factory.mktemp("phase1"), data)
    return shipped, config, local_workers.train(config, keep_checkpoints=True)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_trains_as_shipped(local_workers, data, tmp_path, path, request):
    if not CORPUS.is_dir() and "bert" in path.parent.name:
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    from distdl.engine.checkpoints import checkpoint_name

    phase1 = request.getfixturevalue("lamb_phase1") if "lamb_phase" in path.name else None
    # Phase 2 starts from phase 1's run, made by this same check; phase 1 is that run.
    moved = [f"model.init_from={phase1[1].run_dir / checkpoint_name(3)}"] if path.name.endswith("phase2.yaml") else []
    shipped, config = phase1[:2] if path == PHASE_1 else shipped_config(path, tmp_path, data, *moved)
    # What the config is about stays as shipped (GLUE's hub model and phase 2's phase 1 aside).
    assert config.engine == shipped.engine and config.optimizer == shipped.optimizer
    assert config.workload == shipped.workload and config.scheduler == shipped.scheduler
    model, as_shipped = (dataclasses.asdict(c.sections["model"]) for c in (config, shipped))
    for moved_key in ("name_or_path", "init_from"):
        model.pop(moved_key, None), as_shipped.pop(moved_key, None)
    assert model == as_shipped
    summary = phase1[2] if path == PHASE_1 else local_workers.train(config)
    check_run(config, summary)


# ----------------------------------------------------------------------------- offloaded optimizer states


@pytest.mark.parametrize("name, reference", [("adamw", "AdamW"), ("adam", "Adam")])
def test_deepspeeds_cpu_adam_takes_torchs_steps(name, reference):
    """The offloaded optimizer distdl picks updates as torch's does, decoupled decay (AdamW) or L2 (Adam)."""
    import os

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from distdl.config import OptimizerSection
    from distdl.engine.engine import offload_adam_factory

    section = OptimizerSection(name=name, lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    ours, theirs = ([torch.nn.Parameter(p.clone()) for p in start] for _ in range(2))

    def groups(params):
        return [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]

    deepspeed_adam = offload_adam_factory(section, section.lr)(groups(ours))
    torch_adam = getattr(torch.optim, reference)(groups(theirs), lr=section.lr, betas=tuple(section.betas),
                                                 eps=section.eps)
    for step in range(5):
        gradients = [torch.randn_like(p) for p in start]
        for params, optimizer in ((ours, deepspeed_adam), (theirs, torch_adam)):
            for param, gradient in zip(params, gradients):
                param.grad = gradient.clone()
            optimizer.step()
    assert type(deepspeed_adam).__name__ == "DeepSpeedCPUAdam"
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_offloaded_optimizer_states_train_with_deepspeeds_cpu_adam(local_workers, data, tmp_path, precision):
    file, overrides = MATRIX_BASES["bert_pretrain"]
    config = load_config(REPO / "configs" / file, [
        f"run.storage_path={tmp_path}", *overrides(data), *short_run(), f"engine.precision={precision}",
        "engine.zero_stage=2", "engine.offload_optimizer=true"])
    summary = local_workers.train(config)
    check_run(config, summary)
    assert summary["optimizers"] == {"model": "DeepSpeedCPUAdam"}


def test_the_gpu_checks_prepared_runs_are_valid_configs(monkeypatch):
    """benchmarks/gpu_check.py runs these on a GPU machine; a typo must not wait for one to show."""
    import argparse

    from tests.helpers.benchmark_scripts import load_benchmark

    gpu_check = load_benchmark("gpu_check", monkeypatch)
    args = argparse.Namespace(bert_steps=60, resnet_steps=60, log_every=10, bert_batch=256, resnet_batch=128)
    runs = gpu_check.config_runs(args, str(CORPUS), "/tokenizer")
    assert set(runs) == {f"{model}{variant}" for model in ("bert_base", "resnet50")
                         for variant in ("", "_compile", "_checkpointing")} | {"zero3_bf16", "fp16_zero2"}
    for name, (config, overrides) in runs.items():
        loaded = load_config(REPO / config, ["scaling.num_workers=1", "scaling.use_gpu=true", *overrides])
        assert loaded.trainer.max_steps >= 4
        assert loaded.trainer.compile == name.endswith("_compile")
        assert loaded.sections["model"].activation_checkpointing == name.endswith("_checkpointing")


# ----------------------------------------------------------------------------- MFU and profiles


def test_a_profile_writes_traces_and_changes_no_weight(local_workers, tmp_path):
    """trainer.profile_steps traces rank 0 and the last rank; the logged FLOPs per step are the
    textbook count of the run's BERT (tests/unit/test_flops.py counts it exactly on one batch)."""
    import json

    from transformers import AutoTokenizer

    from distdl.data.text import TOKENIZER_DIRNAME
    from distdl.models.bert import BertForMaskedPositionsLM
    from distdl.workloads.bert_pretrain import bert_config
    from tests.unit.test_flops import textbook_flops

    if not CORPUS.is_dir():
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    summaries = {}
    # WordPiece training is not bit-reproducible (tokenizers#1794): the profiled run uses the plain run's.
    for name, profile, tokenizer in (("plain", "null", "null"), ("profiled", "[2,3]", tmp_path / "plain" / "tokenizer")):
        config = load_config(REPO / "configs/bert/pretrain_tiny.yaml", [
            f"run.storage_path={tmp_path}", f"run.name={name}", f"data.path={CORPUS}", "tokenizer.vocab_size=2000",
            f"tokenizer.name_or_path={tokenizer}",
            "data.max_seq_length=64", "data.eval_fraction=0.01", "trainer.micro_batch_size=8",
            "trainer.global_batch_size=16", *short_run("trainer.max_steps=4"), f"trainer.profile_steps={profile}",
            "trainer.profile_memory=true"])
        summaries[name] = local_workers.train(config)
        check_run(config, summaries[name])
    assert summaries["profiled"]["parameter_checksums"] == summaries["plain"]["parameter_checksums"]
    profiles = tmp_path / "profiled" / "profiles"
    assert sorted(p.name for p in profiles.iterdir()) == [
        "rank0_steps2-3.pt.trace.json", "rank0_steps2-3.txt", "rank1_steps2-3.pt.trace.json", "rank1_steps2-3.txt"]
    for rank in (0, 1):
        events = json.loads((profiles / f"rank{rank}_steps2-3.pt.trace.json").read_text())["traceEvents"]
        names = {event.get("name") for event in events}
        assert {"ProfilerStep#2", "ProfilerStep#3", "aten::mm"} <= names
        assert "ProfilerStep#1" not in names and "ProfilerStep#4" not in names
        assert any(event.get("name") == "[memory]" for event in events), "profile_memory records allocations"
    # The textbook count at the collator's 15% masking (the masks' spread moves it by well under 1%).
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "plain" / TOKENIZER_DIRNAME)
    model = BertForMaskedPositionsLM(bert_config(config.sections["model"], tokenizer, 64))
    ids = torch.zeros(16, 64, dtype=torch.long)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.15, 1, -100)
    assert summaries["plain"]["utilization"]["flops_per_step"] == pytest.approx(
        textbook_flops(model, {"input_ids": ids, "labels": labels}, model.config), rel=0.10)
