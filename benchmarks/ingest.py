"""Does the input keep the step fed? Per-core ingest from prepared shards against the training step's
consumption, and images/s from an ImageFolder against from its packed shards; all in one run, one
core (torch threads = 1, as a CPU worker here has one).

1. Tiny BERT (the quickstart's model, 8,000-token WordPiece trained on the corpus) at 128 tokens,
   micro-batch 32. Ingest: `shards.micro_batches` over the prepared shards of 20,000 lines of this
   Python's standard library sources (rows read from the memory-mapped shards, then masked by
   transformers' `DataCollatorForLanguageModeling`). Consumption: the forward pass, the backward pass
   and AdamW's step of the same model.
2. ResNet-20 (CIFAR's) on 32x32 colour images, micro-batch 64. Ingest: a packed ImageFolder of 2,000
   PNGs, decoded and augmented (random-resized crop, flip, normalize). Consumption: forward, backward
   and SGD's step.
3. Images decoded and augmented per second per core, from the folder and from its packed shards, for
   the 32x32 PNGs above and for 300 ImageNet-sized JPEGs (500x375, quality 90, RandomResizedCrop 224).
   Both read from the page cache here (every file read once first). This measures the CPU cost of
   opening small files against reading a memory-mapped shard. On NFS, each file open is also a
   network round trip that packing removes.

The synthetic images are smooth random fields (bicubically upsampled noise), which JPEG and PNG
compress like photographs rather than like white noise.

    .venv/bin/python benchmarks/ingest.py
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]


def rate(work: Callable[[], int], seconds: float = 6.0) -> float:
    """Items per second of `work` (which returns how many it did), after one warm-up call."""
    work()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        done += work()
    return done / (time.perf_counter() - began)


def write_images(root: Path, count: int, size: tuple[int, int], suffix: str) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        for split in ("train", "val"):
            folder = root / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "val" and (i // 10) % 10:
                continue  # a small val split: the benchmark reads train
            coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
            noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i}{suffix}", quality=90)


def pack(folder: Path, root: Path) -> None:
    from distdl.data import packed_images, prepared

    listings = {split: packed_images.listing(folder, split) for split in packed_images.SPLITS}
    records = [packed_images.make_image_shard(root, split, 0, 0, str(folder / split), samples)
               for split, (_, samples) in listings.items()]
    manifest = {"source": packed_images.source_fingerprint(folder, listings), "settings": {}, "shards": records}
    prepared.write_manifest(root, manifest, "images")


def image_rates(folder: Path, packed: Path, image_size: int) -> dict[str, float]:
    import numpy as np

    from distdl.data import vision

    rates = {}
    for name, extra in {"folder": {}, "packed": {"prepared_path": str(packed)}}.items():
        section = vision.VisionDataSection(dataset="imagefolder", path=str(folder), image_size=image_size, **extra)
        train = vision.load_vision(section).train
        order = np.random.default_rng(1).permutation(len(train))
        for i in order:
            train[int(i)]  # into the page cache, both
        position = [0]

        def some(train: Any = train, order: Any = order) -> int:
            for i in order[position[0] % len(order) :][:50]:
                train[int(i)]
            position[0] += 50
            return 50

        rates[name] = rate(some)
    return {"folder_images_per_s": round(rates["folder"], 1), "packed_images_per_s": round(rates["packed"], 1),
            "packed_vs_folder": round(rates["packed"] / rates["folder"], 3)}


def bert_rates(tmp: Path) -> dict[str, float]:
    import torch
    from transformers import DataCollatorForLanguageModeling

    from distdl.data import prepared, shards, text
    from distdl.models.bert import BertForMaskedPositionsLM
    from distdl.workloads.bert_pretrain import BertModelSection, bert_config

    corpus = tmp / "stdlib.txt"
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:400]
    corpus.write_text("\n".join(source.read_text(encoding="utf-8", errors="replace") for source in sources))
    data = text.TextDataSection(path=str(corpus), max_seq_length=128, lines_per_shard=10_000)
    tokenizer = text.train_tokenizer(text.corpus_line_batches(data), text.TokenizerSection(vocab_size=8000),
                                     tmp / "tokenizer")
    lines = [line for batch in text.corpus_line_batches(data) for line in batch][:20_000]
    records = [prepared.make_text_shard(tmp / "prepared", i, first, lines[first : first + 10_000], tokenizer, data, 0)
               for i, first in enumerate(range(0, len(lines), 10_000))]
    train = text.split_train_eval(prepared.load_rows(tmp / "prepared", records), data, 0, tmp / "split")["train"]
    plan = shards.BatchPlan(micro_batch_size=32, accumulation_steps=1, world_size=1, rank=0, seed=0)
    batches = shards.micro_batches(train, plan, DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15))
    ingest = rate(lambda: len(next(batches)["input_ids"]))
    model = BertForMaskedPositionsLM(bert_config(BertModelSection(preset="tiny"), tokenizer, 128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = next(batches)

    def step() -> int:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return len(batch["input_ids"])

    consume = rate(step)
    return {"ingest_samples_per_s": round(ingest, 1), "step_samples_per_s": round(consume, 1),
            "ingest_vs_step": round(ingest / consume, 2), "train_examples": len(train)}


def resnet_rates(folder: Path, packed: Path) -> dict[str, float]:
    import torch

    from distdl.data import shards, vision
    from distdl.models.classifiers import build_classifier

    section = vision.VisionDataSection(dataset="imagefolder", path=str(folder), image_size=32,
                                       prepared_path=str(packed))
    data = vision.load_vision(section)
    plan = shards.BatchPlan(micro_batch_size=64, accumulation_steps=1, world_size=1, rank=0, seed=0)
    batches = vision.train_batches(data.train, plan, 0, loader_workers=0)
    ingest = rate(lambda: len(next(batches)["labels"]))
    model = build_classifier("cifar_resnet20", 3, 32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = next(batches)

    def step() -> int:
        torch.nn.functional.cross_entropy(model(batch["images"]), batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        return len(batch["labels"])

    consume = rate(step)
    return {"ingest_samples_per_s": round(ingest, 1), "step_samples_per_s": round(consume, 1),
            "ingest_vs_step": round(ingest / consume, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/ingest_cpu.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory(prefix="distdl-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        write_images(tmp / "small", 2000, (32, 32), ".png")
        write_images(tmp / "large", 300, (500, 375), ".jpg")
        for name in ("small", "large"):
            pack(tmp / name, tmp / f"{name}-packed")
        result = {
            "machine": f"{os.cpu_count()} cores, 1 thread",
            "tiny_bert_seq128": bert_rates(tmp),
            "resnet20_32px": resnet_rates(tmp / "small", tmp / "small-packed"),
            "images_32px_png": image_rates(tmp / "small", tmp / "small-packed", 32),
            "images_500x375_jpeg_crop224": image_rates(tmp / "large", tmp / "large-packed", 224),
        }
    write_results(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
