"""Real Ray Train with 2 CPU workers and real DeepSpeed (gloo): training, ranks, resume, export, W&B."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distdl.engine.checkpoints import latest_checkpoint
from distdl.rundir import read_metrics
from tests.helpers.bert_runs import QUICKSTART, run
from tests.helpers.shared import QUIET

pytestmark = pytest.mark.distributed


def assert_trained(config, summary):
    metrics = read_metrics(config.run_dir)
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)), "rank 0 alone writes one line per logged step"
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3, [m["loss"] for m in metrics]
    assert summary["steps"] == config.trainer.max_steps and summary["completed"]
    assert summary["world_size"] == 2
    checksums = summary["parameter_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "ranks hold identical parameters"
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "grad_norm"):
        assert all(key in m for m in metrics), key
    assert 0 < summary["final"]["eval_mlm_accuracy"] <= 1


def weights_checksum(model):
    """The same digest as Engine.parameter_checksum: every parameter's fp32 bytes in module order."""
    import hashlib

    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ZeRO-0 is the bf16 test's and GLUE's stage; ZeRO-2 the resume tests' (same export path as stage 1).
@pytest.mark.parametrize("stage", [1, 3])
def test_each_zero_stage_trains_ranks_agree_and_exports_exactly(ray_local, tmp_path, corpus, stage):
    from transformers import BertForMaskedLM

    from distdl.cli import main

    steps = 8 if stage == 3 else 16  # ZeRO-3 over gloo gathers every layer: ~5x slower here
    # Stage 1 also covers gradient accumulation (2 micro-batches of 4) and optimizer CPU offload.
    extra = ("trainer.micro_batch_size=4", "engine.offload_optimizer=true") if stage == 1 else ()
    config, summary = run(tmp_path, corpus, f"engine.zero_stage={stage}", f"trainer.max_steps={steps}", *extra)
    assert config.trainer.gradient_accumulation_steps == (2 if stage == 1 else 1)
    assert_trained(config, summary)
    # The exported HF model holds exactly the weights the engines held at the end (fp32 run).
    assert main(["export", str(config.run_dir), str(tmp_path / "export")]) == 0
    exported = BertForMaskedLM.from_pretrained(tmp_path / "export")
    assert weights_checksum(exported) == summary["parameter_checksums"][0]
    if stage == 1:
        check_export_runs_like_the_engine(config, tmp_path / "export")
    assert main(["export", str(config.run_dir), str(tmp_path / "export")]) == 2, "never overwrites a non-empty folder"


def check_export_runs_like_the_engine(config, out: Path) -> None:
    """The export loads in transformers with its tokenizer and computes what the engine's own copy of
    the module weights computes (read from DeepSpeed's files, not via zero_to_fp32)."""
    from transformers import AutoTokenizer, BertForMaskedLM

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    exported = BertForMaskedLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    checkpoint = latest_checkpoint(config.run_dir)
    states = torch.load(next(checkpoint.glob("global_step*/mp_rank_00_model_states.pt")), map_location="cpu",
                        weights_only=False)
    engine_model = BertForMaskedLM(exported.config).eval()
    engine_model.load_state_dict(states["module"], strict=False)
    batch = tokenizer(["the licensee may copy and distribute the program"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, engine_model(**batch).logits)


def test_lamb_pretrains_bert_and_phase_2_starts_from_it_far_below_random_weights(ray_local, local_workers, tmp_path,
                                                                                   corpus):
    """Two-phase pretraining as configs/bert/pretrain_base_lamb_phase*.yaml runs it, on tiny BERT: LAMB
    at length 64 on Ray Train, then length 128 from its run directory's latest checkpoint, weights and
    optimizer state (on the local workers)."""
    from transformers import BertForMaskedLM

    from distdl.cli import main
    from distdl.config import load_config
    from tests.helpers.bert_runs import overrides

    lamb = ("optimizer.name=lamb", "optimizer.lr=2e-2", "scheduler.name=polynomial", "scheduler.power=0.5")
    phase1, summary = run(tmp_path, corpus, *lamb, "run.name=phase1", "trainer.max_steps=48")
    assert_trained(phase1, summary)

    def phase2(name: str, train, *extra: str):
        config = load_config(QUICKSTART, overrides(tmp_path, corpus, *lamb, f"run.name={name}", "data.max_seq_length=128",
                                                   "trainer.max_steps=2", "trainer.log_every=1", *extra))
        return config, train(config), read_metrics(config.run_dir)[0]["loss"]

    # No tokenizer named: phase 2 takes phase 1's, whose vocabulary its embeddings were trained for.
    started, started_summary, started_loss = phase2(
        "phase2", lambda config: local_workers.train(config, keep_checkpoints=True),
        f"model.init_from={phase1.run_dir}", "model.init_optimizer=true")
    _, _, random_loss = phase2("random", local_workers.train, f"tokenizer.name_or_path={phase1.run_dir / 'tokenizer'}")
    trained_loss = read_metrics(phase1.run_dir)[-1]["loss"]
    assert started_loss < random_loss - 1.0, (started_loss, random_loss, [m["loss"] for m in read_metrics(phase1.run_dir)])
    # Where phase 1 ended, give or take the longer sequences' harder predictions.
    assert abs(started_loss - trained_loss) < 0.5, (started_loss, trained_loss)
    # The local workers keep the checkpoint folder but not Ray Train's record of it: named directly.
    assert main(["export", str(started.run_dir), str(tmp_path / "export"), "--checkpoint", "checkpoint_00000002"]) == 0
    exported = BertForMaskedLM.from_pretrained(tmp_path / "export")
    assert weights_checksum(exported) == started_summary["parameter_checksums"][0]


def test_bf16_trains_logs_to_wandb_offline_once_and_exports_fp32_master_weights(ray_local, tmp_path, corpus):
    from transformers import BertForMaskedLM

    from distdl.cli import main

    config, summary = run(tmp_path, corpus, "engine.zero_stage=0", "engine.precision=bf16", "optimizer.lr=3e-3",
                          "tracking.wandb_mode=offline")
    assert_trained(config, summary)
    runs = list((config.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one W&B run per training run, not per rank"
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0
    assert summary["wandb_run_id"] in records[0].name
    assert main(["export", str(config.run_dir), str(tmp_path / "export")]) == 0
    exported = BertForMaskedLM.from_pretrained(tmp_path / "export")
    assert all(p.dtype == torch.float32 for p in exported.parameters())
    states = torch.load(next((latest_checkpoint(config.run_dir) / "global_step16").glob("*model_states.pt")),
                        map_location="cpu", weights_only=False)
    bf16_weights = states["module"]["bert.embeddings.word_embeddings.weight"]
    assert bf16_weights.dtype == torch.bfloat16
    # The fp32 masters round to the bf16 weights the engine computed with.
    torch.testing.assert_close(exported.bert.embeddings.word_embeddings.weight.bfloat16(), bf16_weights)


def test_next_sentence_prediction_trains_exports_and_a_corrupted_checkpoint_is_named(ray_local, tmp_path, corpus,
                                                                                    capsys):
    from transformers import BertForPreTraining

    from distdl.cli import main

    config, summary = run(tmp_path, corpus, "data.next_sentence_prediction=true", "trainer.max_steps=12")
    metrics = read_metrics(config.run_dir)
    assert metrics[-1]["loss"] < metrics[0]["loss"] and all("nsp_accuracy" in m for m in metrics)
    assert 0 <= summary["final"]["eval_nsp_accuracy"] <= 1
    out = tmp_path / "export"
    assert main(["export", str(config.run_dir), str(out)]) == 0
    model = BertForPreTraining.from_pretrained(out)
    assert model.cls.seq_relationship.out_features == 2
    # The same run, its only checkpoint then cut short as by a crash during the save: named before workers start.
    shard = next((latest_checkpoint(config.run_dir) / "global_step12").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    metrics_before = (config.run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    # Resuming with the run's own saved config and a larger budget.
    assert main(["train", str(config.run_dir / "config.yaml"), "trainer.max_steps=16"]) == 2
    said = capsys.readouterr().err
    assert f"checkpoint {shard.parent.parent} is corrupted: global_step12/{shard.name} does not match the sha256" \
           in said and "No earlier checkpoint of the run verifies" in said, said
    assert (config.run_dir / "metrics.jsonl").read_bytes() == metrics_before, "nothing the run had is touched"


def test_worker_error_is_one_clear_line(ray_local, tmp_path, corpus, capsys):
    from distdl.cli import main

    args = ["train", str(QUICKSTART), f"run.storage_path={tmp_path}", f"data.path={corpus}",
            "workload=bert_pretrain_broken_node", "trainer.max_steps=2", "tokenizer.vocab_size=1000",
            "data.max_seq_length=32", *QUIET]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "distdl: error: worker 1 failed:" in err and "corpus shard unreadable on this node" in err
