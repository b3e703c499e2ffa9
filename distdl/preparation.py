"""`distdl prepare`: data made ready once, by Ray tasks spread over the cluster's nodes.

A text corpus (bert_pretrain): the driver reads the corpus's lines once, in order (a local file at ~4
million lines a second here, a hub corpus as a stream, never landing whole on a disk), and hands out
chunks of whole line groups; each task tokenizes its chunk, makes the examples and writes one shard.
An ImageFolder (data.dataset=imagefolder): the driver lists the files as torchvision's ImageFolder
does, and each task packs a chunk of them, bytes as they are, into one shard.

Tasks go where Ray's SPREAD placement puts them and write into `data.prepared_path`. At most a window
of chunks is in flight, so the driver's memory stays bounded however large the data. The manifest
comes last.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from distdl.config import Config
from distdl.data import packed_images, prepared, text, vision
from distdl.errors import ConfigError
from distdl.rundir import SLURM_LOGS, RunStorage, write_json

# Chunks in flight per CPU of the cluster: one being worked on and one waiting, so no core idles
# between tasks; capped in number and in bytes, so a large cluster or a corpus of whole documents
# per row does not queue gigabytes in the object store.
IN_FLIGHT_PER_CPU = 2
MAX_IN_FLIGHT = 256
MAX_IN_FLIGHT_BYTES = 2 << 30
# A text chunk ends at data.lines_per_shard lines or at the first group boundary past this much text.
MAX_CHUNK_BYTES = 64 << 20


def prepare(config: Config, connect: Callable[[Config], None]) -> dict[str, Any]:
    """Prepare (or finish preparing, or verify) `config`'s data at data.prepared_path; the manifest."""
    data = config.sections.get("data")
    if isinstance(data, text.TextDataSection):
        return _prepare_text(config, data, connect)
    if isinstance(data, vision.VisionDataSection) and data.dataset == "imagefolder":
        return _prepare_images(config, data, connect)
    raise ConfigError(f"distdl prepare: workload {config.workload!r} with this data has no preparation step; it "
                      "prepares bert_pretrain's text corpora and packs data.dataset=imagefolder folders")


def _prepare_text(config: Config, data: text.TextDataSection, connect: Callable[[Config], None]) -> dict[str, Any]:
    storage = _storage(data)
    if data.lines_per_shard % text.GROUP_LINES:
        raise ConfigError(f"data.lines_per_shard={data.lines_per_shard} must be a multiple of {text.GROUP_LINES}")
    _refuse_foreign_folder(storage)
    root, pulled = prepared.pull_records(storage), storage.clock()
    tokenizer = _tokenizer(config, root)
    storage.push_written_since(pulled, folder=text.TOKENIZER_DIRNAME)
    expected = {"source": text.source_fingerprint(data), "settings": prepared.settings(data, tokenizer, config.run.seed)}
    if (root / prepared.MANIFEST).exists():
        return _verify_existing(storage, expected, "text")
    _claim(storage, expected, {"lines_per_shard": data.lines_per_shard, "max_chunk_bytes": MAX_CHUNK_BYTES})
    connect(config)
    started = time.perf_counter()
    tokenizer_ref = _put(tokenizer)
    chunks = (Chunk(prepared.shard_name(index), (storage.uri, index, first, lines, tokenizer_ref, data, config.run.seed),
                    {"first_line": first, "lines": len(lines)}, sum(map(len, lines)))
              for index, first, lines in _line_chunks(data))
    records = _fan_out(storage, make_text_shard_on_node, chunks, unit="lines")
    if not records:
        raise ConfigError(f"data.path: corpus {data.path} holds no non-empty lines")
    manifest = {**expected, "lines_per_shard": data.lines_per_shard, "counts": _counts(records, "lines", "tokens"),
                "nodes": _nodes(records), "seconds": round(time.perf_counter() - started, 2), "shards": records}
    return _finish(storage, manifest, "text")


def _prepare_images(config: Config, data: vision.VisionDataSection, connect: Callable[[Config], None]) -> dict[str, Any]:
    """Pack train/ and val/ into shards of data.images_per_shard files each, in ImageFolder's order."""
    storage = _storage(data)
    folder = Path(data.path).expanduser()
    _refuse_foreign_folder(storage)
    root = prepared.pull_records(storage)
    listings = {split: packed_images.listing(folder, split) for split in packed_images.SPLITS}
    expected = {"source": packed_images.source_fingerprint(folder, listings), "settings": {}}
    vision.check_same_classes(folder, *(listings[split][0] for split in packed_images.SPLITS))
    if (root / prepared.MANIFEST).exists():
        return _verify_existing(storage, expected, "images")
    _claim(storage, expected, {"images_per_shard": data.images_per_shard})
    connect(config)
    started = time.perf_counter()
    records = []
    for split in packed_images.SPLITS:
        _, samples = listings[split]
        parts = (samples[first : first + data.images_per_shard]
                 for first in range(0, len(samples), data.images_per_shard))
        chunks = (Chunk(prepared.shard_name(index, split),
                        (storage.uri, split, index, index * data.images_per_shard, str(folder / split), part),
                        {"split": split, "first_image": index * data.images_per_shard, "rows": len(part)}, 0)
                  for index, part in enumerate(parts))
        records += _fan_out(storage, make_image_shard_on_node, chunks, unit="images")
    manifest = {**expected, "images_per_shard": data.images_per_shard, "counts": _counts(records),
                "nodes": _nodes(records), "seconds": round(time.perf_counter() - started, 2), "shards": records}
    return _finish(storage, manifest, "images")


def _storage(data: Any) -> RunStorage:
    storage = prepared.prepared_storage(data)
    if data.path is None:
        raise ConfigError("data.path is required: the data to prepare")
    return storage


def _finish(storage: RunStorage, manifest: dict[str, Any], kind: str) -> dict[str, Any]:
    prepared.write_manifest(storage.local, manifest, kind)
    storage.push(prepared.MANIFEST)
    storage.delete(prepared.IN_PROGRESS)
    (storage.local / prepared.IN_PROGRESS).unlink(missing_ok=True)
    return prepared.read_manifest(storage.local, kind)


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


def _verify_existing(storage: RunStorage, expected: dict[str, Any], kind: str) -> dict[str, Any]:
    manifest = prepared.read_manifest(storage.local, kind)
    different = prepared.differences(manifest, expected)
    if different:
        raise ConfigError(f"data.prepared_path: {storage} was prepared from another corpus or settings, and is left "
                          f"as it is: {'; '.join(different)}. Prepare into a new folder")
    prepared.check_shards(storage.local, manifest["shards"], digests=True, storage=storage if storage.remote else None)
    how = "their sizes checked; their sha256 is checked where they are fetched" if storage.remote else "sha256 checked"
    print(f"distdl: {storage} is already prepared from this corpus and settings; its {len(manifest['shards'])} "
          f"shards are whole ({how})")
    return manifest


def _claim(storage: RunStorage, expected: dict[str, Any], layout: dict[str, int]) -> None:
    """Mark the folder as being prepared with these settings and this cut into shards (`layout`); an
    interrupted preparation with the same ones is continued, one with others is left alone. One
    preparation per folder at a time: a continued one clears what killed tasks left half-written."""
    root = storage.local
    claim = root / prepared.IN_PROGRESS
    wanted = {**expected, "layout": layout}
    if claim.is_file():
        try:
            earlier = json.loads(claim.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"data.prepared_path: {claim} is damaged ({err}); prepare into a new folder") from None
        different = prepared.differences(earlier, expected)
        different += [f"{key}: {earlier.get('layout', {}).get(key)} before, {value} now" for key, value in layout.items()
                      if earlier.get("layout", {}).get(key) != value]
        if different:
            raise ConfigError(f"data.prepared_path: an unfinished preparation in {root} has other settings, and is "
                              f"left as it is: {'; '.join(different)}. Prepare into a new folder, or go on with "
                              "the same settings")
        shards = root / prepared.SHARDS_DIRNAME
        # Shards written under .NAME.partial-PID; records through rundir.write_json's tmp*.tmp.
        for partial in [*shards.glob(".*.partial-*"), *shards.glob("tmp*.tmp")]:
            partial.unlink(missing_ok=True)
        return
    root.mkdir(parents=True, exist_ok=True)
    write_json(claim, wanted)
    storage.push(prepared.IN_PROGRESS)


def _refuse_foreign_folder(storage: RunStorage) -> None:
    """A folder that is neither empty nor a (finished or unfinished) preparation is the user's: left alone."""
    root, entries = storage.local, storage.entries()
    if not storage.remote and root.exists() and not root.is_dir():
        raise ConfigError(f"data.prepared_path: {root} is a file; give a folder")
    if prepared.MANIFEST in entries or prepared.IN_PROGRESS in entries:
        return
    # A tokenizer alone is what a preparation interrupted before its first shard leaves; a Slurm job's
    # logs are what `distdl submit slurm --prepare` writes there before its job starts.
    others = [name for name in entries if name not in (text.TOKENIZER_DIRNAME, SLURM_LOGS)]
    if prepared.SHARDS_DIRNAME in others:
        raise ConfigError(f"data.prepared_path: {storage} holds shards but neither {prepared.MANIFEST} nor "
                          f"{prepared.IN_PROGRESS}, so what made them is unknown; it is left as it is. Prepare "
                          "into a new folder")
    if others:
        raise ConfigError(f"data.prepared_path: {storage} already holds {', '.join(others[:5])}, which is not a "
                          "distdl preparation, and is left as it is; choose an empty or new folder")


def _line_chunks(data: text.TextDataSection) -> Iterator[tuple[int, int, list[str]]]:
    """(shard index, first line, lines): whole groups of lines, up to lines_per_shard of them or the
    first group boundary past MAX_CHUNK_BYTES of text (a corpus of documents per row)."""
    index, first_line, lines, size = 0, 0, [], 0
    for batch in text.corpus_line_batches(data):
        lines += batch
        size += sum(map(len, batch))
        if len(lines) >= data.lines_per_shard or size >= MAX_CHUNK_BYTES:
            yield index, first_line, lines
            index, first_line, lines, size = index + 1, first_line + len(lines), [], 0
    if lines:
        yield index, first_line, lines


@dataclass
class Chunk:
    """One task's work: its shard's name, the task's arguments, what the shard's record must say if
    an interrupted run already made it, and its size in bytes (for the in-flight cap)."""

    name: str
    args: tuple
    expect: dict[str, Any]
    size: int


def _node() -> dict[str, str]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


def make_text_shard_on_node(location: str, index: int, first_line: int, lines: list[str], tokenizer: Any,
                            data: text.TextDataSection, seed: int) -> dict[str, Any]:
    """A Ray task's body: one text shard, with the node that made it, written at `location` (on object
    storage: made in this node's cache, then uploaded)."""
    storage = prepared.storage_at(location)
    record = prepared.make_text_shard(storage.local, index, first_line, lines, tokenizer, data, seed, _node())
    prepared.publish(storage, record)
    return record


def make_image_shard_on_node(location: str, split: str, index: int, first: int, folder: str,
                             samples: list[tuple[str, int]]) -> dict[str, Any]:
    """A Ray task's body: one packed image shard, with the node that made it."""
    storage = prepared.storage_at(location)
    record = packed_images.make_image_shard(storage.local, split, index, first, folder, samples, _node())
    prepared.publish(storage, record)
    return record


def _put(value: Any) -> Any:
    import ray

    return ray.put(value)


def _fan_out(storage: RunStorage, body: Callable[..., dict[str, Any]], chunks: Iterable[Chunk],
             unit: str) -> list[dict[str, Any]]:
    """Run `body(*chunk.args)` as a Ray task for each chunk whose shard is not already whole, within the
    in-flight caps; every shard's record, in the chunks' order."""
    import ray

    # One core per task: a tokenizer's own threads would contend with the other tasks on the node.
    task = ray.remote(num_cpus=1)(body).options(
        scheduling_strategy="SPREAD", runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    window = min(MAX_IN_FLIGHT, IN_FLIGHT_PER_CPU * max(int(ray.cluster_resources().get("CPU", 1)), 1))
    records: dict[str, dict[str, Any]] = {}
    names: list[str] = []
    pending: dict[Any, int] = {}  # task -> bytes it was handed
    progress = Progress(storage.name, unit)
    stored = prepared.stored_sizes(storage)
    for chunk in chunks:
        names.append(chunk.name)
        done = prepared.finished_shard(storage.local, chunk.name, stored)
        if done is not None and all(done.get(key) == value for key, value in chunk.expect.items()):
            records[chunk.name] = done  # made by an interrupted run of this preparation
            progress.shard(done, resumed=True)
            continue
        while pending and (len(pending) >= window or sum(pending.values()) + chunk.size > MAX_IN_FLIGHT_BYTES):
            ready, _ = ray.wait(list(pending), num_returns=1)
            _collect(ray.get(ready), records, progress)
            del pending[ready[0]]
        pending[task.remote(*chunk.args)] = chunk.size
    _collect(ray.get(list(pending)), records, progress)
    progress.close()
    return [records[name] for name in names]


def _collect(done: list[dict[str, Any]], records: dict[str, dict[str, Any]], progress: "Progress") -> None:
    for record in done:
        records[record["file"]] = record
        progress.shard(record)


class Progress:
    """A live bar in a terminal; one plain line per shard in a log file. Counts `unit` (lines, images)."""

    def __init__(self, name: str, unit: str) -> None:
        self.started, self.done, self.shards, self.unit = time.perf_counter(), 0, 0, unit
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=f"preparing {name}", unit=f" {unit}", unit_scale=True)

    def shard(self, record: dict[str, Any], resumed: bool = False) -> None:
        count = record["lines"] if self.unit == "lines" else record["rows"]
        self.done, self.shards = self.done + count, self.shards + 1
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(count)
            self.bar.set_postfix(shards=self.shards)
            return
        where = "made earlier" if resumed else f"on {record.get('hostname', '?')}"
        print(f"distdl: prepare: {record['file']} {where}: {count:,} {self.unit}, {record['rows']:,} rows; "
              f"{self.done:,} {self.unit} so far ({rate:,.0f} {self.unit}/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _counts(records: list[dict[str, Any]], *summed: str) -> dict[str, int]:
    """Shards, examples and bytes, and the totals of these other record fields."""
    totals = {"shards": len(records), "examples": sum(r["rows"] for r in records),
              "bytes": sum(r["bytes"] for r in records)}
    return {**totals, **{key: sum(r[key] for r in records) for key in summed}}


def _nodes(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Which node wrote which shards (a shard made by an interrupted run records its node too)."""
    nodes: dict[str, dict[str, Any]] = {}
    for record in records:
        node = nodes.setdefault(record.get("node_id", "unknown"), {"hostname": record.get("hostname"), "shards": []})
        node["shards"].append(record["file"])
    return nodes
