"""`distdl prepare`: a text corpus tokenized into shards by Ray tasks spread over the cluster's nodes.

The driver reads the corpus's lines once, in order (a local file at ~4 million lines a second here, a
hub corpus as a stream, never landing whole on a disk), and hands out chunks of whole line groups;
each Ray task, on whichever node Ray's SPREAD placement gives it, tokenizes its chunk, makes the
examples and writes them as one shard into `data.prepared_path`. At most a window of chunks is in
flight, so the driver's memory stays bounded however large the corpus. The manifest comes last.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from distdl.config import Config
from distdl.data import prepared, text
from distdl.errors import ConfigError

# Chunks in flight per CPU of the cluster: one being tokenized and one waiting, so no core idles
# between tasks; capped so a large cluster does not queue gigabytes of text in the object store.
IN_FLIGHT_PER_CPU = 2
MAX_IN_FLIGHT = 256


def prepare(config: Config, connect: Callable[[Config], None]) -> dict[str, Any]:
    """Prepare (or finish preparing, or verify) the shards of `config`'s corpus; the manifest."""
    data = _text_data(config)
    root = prepared.prepared_root(data)
    if data.lines_per_shard % text.GROUP_LINES:
        raise ConfigError(f"data.lines_per_shard={data.lines_per_shard} must be a multiple of {text.GROUP_LINES}")
    _refuse_foreign_folder(root)
    tokenizer = _tokenizer(config, root)
    expected = {"source": text.source_fingerprint(data), "settings": prepared.settings(data, tokenizer, config.run.seed)}
    if (root / prepared.MANIFEST).exists():
        return _verify_existing(root, expected)
    _claim(root, expected)
    connect(config)
    started = time.perf_counter()
    records = _make_shards(root, tokenizer, data, config.run.seed)
    manifest = {**expected, "lines_per_shard": data.lines_per_shard, "counts": _counts(records),
                "nodes": _nodes(records), "seconds": round(time.perf_counter() - started, 2), "shards": records}
    prepared.write_manifest(root, manifest)
    (root / prepared.IN_PROGRESS).unlink()
    return prepared.read_manifest(root)


def _text_data(config: Config) -> text.TextDataSection:
    data = config.sections.get("data")
    if not isinstance(data, text.TextDataSection):
        raise ConfigError(f"distdl prepare: workload {config.workload!r} has no preparation step; it prepares the "
                          "text corpora of bert_pretrain")
    if data.prepared_path is None:
        raise ConfigError("data.prepared_path is required: the folder (shared by the cluster's nodes) to write "
                          "the shards to")
    if data.path is None:
        raise ConfigError("data.path is required: the corpus to prepare (a text file, a folder of text files, "
                          "or a hub dataset name)")
    return data


def _tokenizer(config: Config, root: Path) -> Any:
    """The named tokenizer, or the one an earlier run of this preparation saved, or one trained on the
    corpus now; kept in the prepared folder, where training takes it from."""
    section = config.sections["tokenizer"]
    saved = root / text.TOKENIZER_DIRNAME
    if section.name_or_path is None and not (saved / "tokenizer.json").is_file():
        if (root / prepared.MANIFEST).exists() or (root / prepared.IN_PROGRESS).exists():
            raise ConfigError(f"data.prepared_path: {root} holds shards but not the tokenizer that made them "
                              f"({saved}); prepare into a new folder")
        print(f"distdl: training a WordPiece tokenizer ({section.vocab_size} tokens) on {config.sections['data'].path}")
        return text.train_tokenizer(text.corpus_line_batches(config.sections["data"]), section, saved)
    tokenizer = text.load_tokenizer(section, root)
    if not (saved / "tokenizer.json").is_file() and not (root / prepared.MANIFEST).exists():
        tokenizer.save_pretrained(str(saved))
    return tokenizer


def _verify_existing(root: Path, expected: dict[str, Any]) -> dict[str, Any]:
    manifest = prepared.read_manifest(root)
    different = prepared.differences(manifest, expected)
    if different:
        raise ConfigError(f"data.prepared_path: {root} was prepared from another corpus or settings, and is left "
                          f"as it is: {'; '.join(different)}. Prepare into a new folder")
    prepared.check_shards(root, manifest, digests=True)
    print(f"distdl: {root} is already prepared from this corpus and settings; its {len(manifest['shards'])} "
          "shards are whole (sha256 checked)")
    return manifest


def _claim(root: Path, expected: dict[str, Any]) -> None:
    """Mark the folder as being prepared with these settings; an interrupted preparation with the same
    ones is continued, one with others (or a folder holding something else) is left alone."""
    claim = root / prepared.IN_PROGRESS
    if claim.is_file():
        earlier = json.loads(claim.read_text())
        different = prepared.differences(earlier, expected)
        if different:
            raise ConfigError(f"data.prepared_path: an unfinished preparation in {root} has other settings, and is "
                              f"left as it is: {'; '.join(different)}. Prepare into a new folder")
        return
    root.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps(expected, indent=1) + "\n")


def _refuse_foreign_folder(root: Path) -> None:
    """A folder that is neither empty nor a (finished or unfinished) preparation is the user's: left alone."""
    if not root.is_dir() or (root / prepared.MANIFEST).exists() or (root / prepared.IN_PROGRESS).exists():
        if root.exists() and not root.is_dir():
            raise ConfigError(f"data.prepared_path: {root} is a file; give a folder")
        return
    # A tokenizer alone is what a preparation interrupted before its first shard leaves.
    others = sorted(p.name for p in root.iterdir() if p.name != text.TOKENIZER_DIRNAME)
    if others:
        raise ConfigError(f"data.prepared_path: {root} already holds {', '.join(others[:5])}, which is not a "
                          "distdl preparation, and is left as it is; choose an empty or new folder")


def _chunks(data: text.TextDataSection) -> Iterator[tuple[int, int, list[str]]]:
    """(shard index, first line, lines): whole groups of lines, lines_per_shard at a time."""
    index, first_line, lines = 0, 0, []
    for batch in text.corpus_line_batches(data):
        lines += batch
        if len(lines) >= data.lines_per_shard:
            yield index, first_line, lines
            index, first_line, lines = index + 1, first_line + len(lines), []
    if lines:
        yield index, first_line, lines


def make_shard_on_node(root: str, index: int, first_line: int, lines: list[str], tokenizer: Any,
                       data: text.TextDataSection, seed: int) -> dict[str, Any]:
    """A Ray task's body: one shard, with the node that made it."""
    import ray

    node = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}
    return prepared.make_shard(Path(root), index, first_line, lines, tokenizer, data, seed, node)


def _make_shards(root: Path, tokenizer: Any, data: text.TextDataSection, seed: int) -> list[dict[str, Any]]:
    import ray

    # One core per task: the tokenizer's own threads would contend with the other tasks on the node.
    task = ray.remote(num_cpus=1)(make_shard_on_node).options(
        scheduling_strategy="SPREAD", runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    window = min(MAX_IN_FLIGHT, IN_FLIGHT_PER_CPU * max(int(ray.cluster_resources().get("CPU", 1)), 1))
    tokenizer_ref = ray.put(tokenizer)
    records: dict[int, dict[str, Any]] = {}
    pending: list[Any] = []
    progress = Progress(root)
    for index, first_line, lines in _chunks(data):
        if (done := prepared.finished_shard(root, index)) is not None:
            records[index] = done  # made by an interrupted run of this preparation
            progress.shard(done, resumed=True)
            continue
        while len(pending) >= window:
            ready, pending = ray.wait(pending, num_returns=1)
            _collect(ray.get(ready), records, progress)
        pending.append(task.remote(str(root), index, first_line, lines, tokenizer_ref, data, seed))
    _collect(ray.get(pending), records, progress)
    progress.close()
    if not records:
        raise ConfigError(f"data.path: corpus {data.path} holds no non-empty lines")
    return [records[index] for index in sorted(records)]


def _collect(done: list[dict[str, Any]], records: dict[int, dict[str, Any]], progress: "Progress") -> None:
    for record in done:
        records[int(record["file"].rsplit("-", 1)[1].split(".")[0])] = record
        progress.shard(record)


class Progress:
    """A live bar in a terminal; one plain line per shard in a log file."""

    def __init__(self, root: Path) -> None:
        self.started, self.lines, self.tokens, self.shards = time.perf_counter(), 0, 0, 0
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=f"preparing {root.name}", unit=" lines", unit_scale=True)

    def shard(self, record: dict[str, Any], resumed: bool = False) -> None:
        self.lines, self.tokens, self.shards = self.lines + record["lines"], self.tokens + record["tokens"], self.shards + 1
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(record["lines"])
            self.bar.set_postfix(shards=self.shards, tokens_per_s=f"{rate:,.0f}")
            return
        where = "made earlier" if resumed else f"on {record.get('hostname', '?')}"
        print(f"distdl: prepare: {record['file']} {where}: {record['lines']:,} lines, {record['rows']:,} examples; "
              f"{self.lines:,} lines, {self.tokens:,} tokens so far ({rate:,.0f} tokens/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _counts(records: list[dict[str, Any]]) -> dict[str, int]:
    return {"shards": len(records), "lines": sum(r["lines"] for r in records),
            "examples": sum(r["rows"] for r in records), "tokens": sum(r["tokens"] for r in records),
            "bytes": sum(r["bytes"] for r in records)}


def _nodes(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Which node wrote which shards (a shard made by an interrupted run records its node too)."""
    nodes: dict[str, dict[str, Any]] = {}
    for record in records:
        node = nodes.setdefault(record.get("node_id", "unknown"), {"hostname": record.get("hostname"), "shards": []})
        node["shards"].append(record["file"])
    return nodes
