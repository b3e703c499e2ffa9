"""The baseline for benchmarks/overhead.py: a bare Ray Train + DeepSpeed masked-LM loop.

What a person would write by hand without distdl: a TorchTrainer whose workers build
BertForMaskedLM, mask with DataCollatorForLanguageModeling, wrap a torch AdamW with
`deepspeed.initialize` and step over their shard. No checkpoints, logging, metrics,
evaluation, LR schedule or resume. The data comes from distdl.data.text so that every
setup trains on identical blocks; `build_model` and `batches` are shared with the
plain PyTorch loop in overhead.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch

# distdl's "tiny" preset: (layers, hidden, heads) = (2, 128, 2), intermediate 4 x hidden.
TINY = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}


def build_model(tokenizer: Any, max_seq_length: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(**TINY, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        max_position_embeddings=max(512, max_seq_length))
    config._attn_implementation = "sdpa"  # as distdl's default model.attn_implementation
    return BertForMaskedLM(config)


def load_shard(spec: dict[str, Any], rank: int, world_size: int) -> tuple[Any, Any]:
    """The tokenizer the driver prepared and this rank's shard of the (cached) training blocks."""
    from distdl.data import shards, text

    data, tokenizer_section = text.TextDataSection(**spec["data"]), text.TokenizerSection(**spec["tokenizer"])
    tokenizer = text.load_tokenizer(tokenizer_section, Path(spec["run_dir"]))
    blocks = text.tokenized_blocks(text.load_raw_corpus(data), tokenizer, data, spec["seed"])
    return tokenizer, shards.shard_for_rank(blocks["train"], rank, world_size)


def batches(shard: Any, micro_batch: int, collate: Any, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches, reshuffled every epoch."""
    for epoch in range(10**9):
        order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(0, len(order) - micro_batch + 1, micro_batch):
            yield collate([{"input_ids": ids} for ids in shard[order[i : i + micro_batch]]["input_ids"]])


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from transformers import DataCollatorForLanguageModeling

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(spec["threads"])
    tokenizer, shard = load_shard(spec, rank, world)
    torch.manual_seed(spec["seed"])  # the same initial weights on every rank
    model = build_model(tokenizer, spec["data"]["max_seq_length"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    mb = spec["micro_batch"]
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config={
        "train_batch_size": mb * world, "train_micro_batch_size_per_gpu": mb, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": spec["zero_stage"]}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1})
    torch.manual_seed(spec["seed"] + 1 + rank)
    data = batches(shard, mb, DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15), seed=rank)
    marks = {"loop_start": time.time()}  # wall clock, comparable with the driver's
    engine.train()
    for step in range(1, spec["steps"] + 1):
        loss = engine(**next(data)).loss
        engine.backward(loss)
        engine.step()
        if step == 1:
            marks["step_1"] = time.time()
        if step == spec["skip"]:
            marks[f"step_{step}"], timed_from = time.time(), time.perf_counter()
    elapsed = time.perf_counter() - timed_from
    if rank == 0:
        samples = (spec["steps"] - spec["skip"]) * mb * world
        Path(spec["result_file"]).write_text(json.dumps(
            {"samples_per_s": samples / elapsed, "timed_steps": spec["steps"] - spec["skip"],
             "final_loss": loss.item(), "marks": marks}))
