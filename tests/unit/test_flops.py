"""MFU accounting: the FLOPs counted on a real step against the textbook count, the peaks, the ratios."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import BertConfig

from distdl.flops import (
    ModelFlops,
    Peak,
    Utilization,
    WorldPeak,
    counted_flops,
    datasheet_tflops,
    device_peak,
    measured_matmul_tflops,
)
from distdl.models.activation_checkpointing import checkpoint_transformer_layers
from distdl.models.bert import BertForMaskedPositionsLM
from distdl.tracking import ProgressLine

BERT = BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=512)


def masked_batch(batch: int, length: int, masked_fraction: float = 0.15) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, BERT.vocab_size, (batch, length), generator=generator)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape, generator=generator) < masked_fraction
    labels[masked] = ids[masked]
    return {"input_ids": ids, "labels": labels}


def textbook_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], config: BertConfig = BERT) -> float:
    """6 N tokens for the encoder's weights, 6 x 2 L s d tokens for attention's two matmuls
    (Kaplan et al. 2020, Narayanan et al. 2021), and 6 x (d^2 + d V) per masked token for the MLM
    head, which distdl runs at the masked positions only."""
    tokens = batch["input_ids"].numel()
    length = batch["input_ids"].shape[1]
    masked = int((batch["labels"] != -100).sum())
    encoder = sum(p.numel() for name, p in model.named_parameters()
                  if name.startswith("bert.encoder.") and p.dim() == 2)
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    return 6 * encoder * tokens + 12 * layers * length * d * tokens + 6 * (d * d + d * vocab) * masked


@pytest.mark.parametrize("length", [64, 256])
def test_a_bert_steps_counted_flops_match_6_n_tokens_plus_attention(length):
    torch.manual_seed(0)
    model = BertForMaskedPositionsLM(BERT).train()
    batch = masked_batch(8, length)
    with counted_flops() as count:
        model(**batch).loss.backward()
    assert count.recomputed == 0
    assert count.model == pytest.approx(textbook_flops(model, batch), rel=1e-3)


def test_activation_checkpointings_recomputation_is_counted_apart():
    """MFU counts model FLOPs: the recomputed forward (PaLM's "hardware FLOPs") is left out."""
    torch.manual_seed(0)
    model = BertForMaskedPositionsLM(BERT).train()
    checkpointed = checkpoint_transformer_layers(copy.deepcopy(model))
    batch = masked_batch(8, 64)
    counts = []
    for each in (model, checkpointed):
        torch.manual_seed(1)
        with counted_flops() as count:
            each(**batch).loss.backward()
        counts.append(count)
    plain, recomputing = counts
    assert recomputing.model == plain.model
    # One more forward of every layer: a third of the layers' forward-and-backward count.
    layers_forward = (textbook_flops(model, batch) - 6 * (BERT.hidden_size**2 + BERT.hidden_size * BERT.vocab_size)
                      * int((batch["labels"] != -100).sum())) / 3
    assert recomputing.recomputed == pytest.approx(layers_forward, rel=0.10)


def test_counting_lets_a_gradient_penalty_differentiate_twice():
    """WGAN-GP's penalty takes torch.autograd.grad of the critic at leaf inputs, which the counter's
    per-module attribution hooks would break (RuntimeError: a leaf node passed to
    _will_engine_execute_node)."""
    critic = torch.nn.Linear(4, 5, bias=False)
    between = torch.randn(3, 4, requires_grad=True)
    with counted_flops() as count:
        (gradient,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
        (gradient.norm() + critic(between).mean()).backward()
    assert count.model > 0 and critic.weight.grad is not None


def test_datasheet_peaks_by_gpu_name_and_precision():
    assert datasheet_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert datasheet_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert datasheet_tflops("NVIDIA H200", "tf32") == 494.7
    assert datasheet_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert datasheet_tflops("NVIDIA A10", "bf16") == 125.0
    assert datasheet_tflops("NVIDIA L40S", "bf16") == 362.1
    assert datasheet_tflops("NVIDIA L4", "fp16") == 121.0
    assert datasheet_tflops("Tesla V100-SXM2-32GB", "fp16") == 125.0
    # No bf16 on Volta; a model the table does not know: unknown, never a guess.
    assert datasheet_tflops("Tesla V100-SXM2-32GB", "bf16") is None
    assert datasheet_tflops("NVIDIA GeForce RTX 3060", "bf16") is None


def test_the_peak_comes_from_the_config_or_a_measured_cpu_matmul():
    assert device_peak(torch.device("cpu"), "bf16", True, 123.0) == Peak(123.0, "trainer.peak_tflops")
    measured = device_peak(torch.device("cpu"), "fp32", True, None)
    assert measured.tflops > 0 and measured.source.startswith("measured fp32 matmul on")
    assert measured_matmul_tflops(torch.float32, size=256, budget_s=0.05) > 0


def test_measuring_the_peak_leaves_the_runs_random_stream_alone():
    """Each session measures its CPU peak; drawing from torch's generator would make a resumed run's
    dropout and masks differ from an uninterrupted run's."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    device_peak(torch.device("cpu"), "bf16", True, None)
    assert torch.equal(torch.get_rng_state(), before)


def test_mfu_is_achieved_flops_over_the_summed_peaks():
    """One process here (world size 1); across ranks the peak is the sum of theirs (WorldPeak.of)."""
    usage = Utilization(ModelFlops(per_token=6e9, per_step=6e12), WorldPeak(Peak(100.0, "test"), 100.0))
    window = usage.window(tokens_per_s=2_500, seconds=2.0)
    # 6e9 x 2.5e3 = 1.5e13 FLOP/s: 15 TFLOP/s, 15% of 100.
    assert window["tflops_per_device"] == pytest.approx(15.0)
    assert window["mfu"] == pytest.approx(0.15)
    usage.window(tokens_per_s=7_500, seconds=2.0)
    summary = usage.summary()
    assert summary["mean_mfu"] == pytest.approx(0.30)  # time-weighted: (0.15 x 2 + 0.45 x 2) / 4
    assert summary["mean_tflops_per_device"] == pytest.approx(30.0)
    assert summary["flops_per_step"] == 6e12 and summary["peak_source"] == "test"


def test_an_unknown_peak_gives_an_unknown_mfu_not_a_wrong_one():
    source = "unknown: no bf16 datasheet figure for 'NVIDIA GeForce RTX 3060'; set trainer.peak_tflops"
    usage = Utilization(ModelFlops(per_token=1e9, per_step=1e12), WorldPeak(Peak(None, source), None))
    window = usage.window(tokens_per_s=1000, seconds=1.0)
    assert window["mfu"] is None and window["tflops_per_device"] == pytest.approx(1.0)
    assert usage.summary()["mean_mfu"] is None and "trainer.peak_tflops" in usage.summary()["peak_source"]
    assert "mfu=?" in ProgressLine(0, 10).line(5, {"loss": 1.0, **window})
    assert "mfu=12.5%" in ProgressLine(0, 10).line(5, {"loss": 1.0, "mfu": 0.125})


def test_a_step_left_out_of_the_rate_keeps_its_loss_but_not_its_time_or_samples():
    """The first compiled step: its compilation must not read as a slow step."""
    from distdl.loop import Window

    window = Window()
    counts = {"samples": 4, "tokens": 400}
    seconds = window.left_out(lambda: (window.add({"loss": 3.0}, counts), time.sleep(0.2)))
    assert seconds >= 0.2
    alone = window.reduce(torch.device("cpu"))
    assert alone["loss"] == 3.0 and alone["samples_per_s"] is None and alone["tokens_per_s"] is None
    window = Window()
    window.left_out(lambda: (window.add({"loss": 3.0}, counts), time.sleep(0.2)))
    window.add({"loss": 1.0}, counts)
    rates = window.reduce(torch.device("cpu"))
    assert rates["loss"] == 2.0 and rates["samples_per_s"] > 4 / 0.2  # only the uncompiled step's time
    assert Utilization(ModelFlops(1.0, 1.0), WorldPeak(Peak(1.0, "test"), 1.0)).window(None, 0.0) == {
        "tflops_per_device": None, "mfu": None}
