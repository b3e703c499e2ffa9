"""Prepared shards: what `distdl prepare` writes and `distdl train` reads.

A prepared folder (`data.prepared_path`) holds
- `shards/*.arrow`: Arrow IPC streams in datasets' own cache format (`datasets.Dataset.from_file` maps
  them into memory): a text corpus's examples, made from consecutive whole groups of corpus lines
  (`shard-NNNNN`), or an image folder's files packed as they are (`train-NNNNN`, `val-NNNNN`,
  `packed_images`);
- `shards/*.json`: each shard's record, written once the shard is whole;
- `tokenizer/` (text): the tokenizer the shards were made with (trained on the corpus when none was named);
- `manifest.json`: the source's fingerprint, the settings, the counts and every shard's record,
  written last, so its presence says the preparation finished.

Text shards hold whole groups of `text.GROUP_LINES` lines, so the examples are the ones the in-process
path makes from the raw corpus, in the same order: concatenated, they split into the same train and
held-out sets (`text.split_train_eval`) and train in the same global order.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from distdl import rundir
from distdl.data import text
from distdl.errors import ConfigError

MANIFEST = "manifest.json"
# Written when a preparation starts: a rerun after a crash goes on with the shards already made.
IN_PROGRESS = "preparing.json"
SHARDS_DIRNAME = "shards"
# The manifest's format, by what the shards hold.
FORMATS = {"text": "distdl-prepared-text", "images": "distdl-prepared-images"}
VERSION = 1


def prepared_root(data: Any) -> Path:
    """data.prepared_path of a text or vision data section, which must be set."""
    if data.prepared_path is None:
        raise ConfigError("data.prepared_path is required: the folder (shared by the cluster's nodes) that "
                          "`distdl prepare` writes the shards to")
    return Path(data.prepared_path).expanduser()


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of the tokenizer's whole definition (vocabulary, normalizer, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def settings(data: text.TextDataSection, tokenizer: Any, seed: int) -> dict[str, Any]:
    """What the shards' content depends on besides the corpus."""
    made = {"tokenizer_sha256": tokenizer_digest(tokenizer), "max_seq_length": data.max_seq_length,
            "next_sentence_prediction": data.next_sentence_prediction}
    if data.next_sentence_prediction:
        made["seed"] = seed  # draws the sentence pairs; blocks do not depend on it
    return made


def differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a manifest's source and settings and this config's, in words."""
    found = []
    for key in sorted(set(recorded["settings"]) | set(expected["settings"])):
        theirs, ours = recorded["settings"].get(key), expected["settings"].get(key)
        if theirs != ours:
            what = "the tokenizer (sha256 of its tokenizer.json)" if key == "tokenizer_sha256" else key
            found.append(f"{what}: prepared {_short(theirs)}, this config {_short(ours)}")
    source, ours_source = recorded["source"], expected["source"]
    if ours_source:  # a config without data.path trusts the manifest's source
        found += _source_differences(source, ours_source)
    return found


def _short(value: Any) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)


def _source_differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    if ("hub" in theirs) != ("hub" in ours) or theirs.get("hub") != ours.get("hub"):
        return [f"the corpus: prepared from {theirs.get('hub') or theirs.get('path')}, "
                f"this config's data.path is {ours.get('hub') or ours.get('path')}"]
    found = [f"data.{key}: prepared {theirs.get(key)!r}, this config {ours.get(key)!r}"
             for key in ("hub_config", "text_column") if theirs.get(key) != ours.get(key)]
    for split in sorted(set(theirs.get("splits", {})) | set(ours.get("splits", {}))):
        found += _split_differences(split, theirs.get("splits", {}).get(split, {}), ours.get("splits", {}).get(split, {}))
    their_files = {f["name"]: f for f in theirs.get("files", [])}
    our_files = {f["name"]: f for f in ours.get("files", [])}
    for name in sorted(set(their_files) | set(our_files)):
        if name not in our_files:
            found.append(f"corpus file {name}: prepared from it, absent from {ours['path']}")
        elif name not in their_files:
            found.append(f"corpus file {name}: in {ours['path']}, not prepared")
        elif their_files[name] != our_files[name]:
            found.append(f"corpus file {name}: changed since it was prepared (size or modification time)")
    return found


def _split_differences(split: str, theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """An image folder's split: its classes, and its files by name."""
    if theirs.get("classes") != ours.get("classes"):
        only = sorted(set(theirs.get("classes", [])) ^ set(ours.get("classes", [])))
        return [f"{split}/: other classes than were packed (in one only: {only[:5]})"]
    if theirs.get("images") != ours.get("images") or theirs.get("listing_sha256") != ours.get("listing_sha256"):
        return [f"{split}/: {ours.get('images')} images, {theirs.get('images')} were packed, or other file names"]
    return []


def shard_name(index: int, prefix: str = "shard") -> str:
    return f"{SHARDS_DIRNAME}/{prefix}-{index:05d}.arrow"


def make_text_shard(root: Path, index: int, first_line: int, lines: list[str], tokenizer: Any,
                    data: text.TextDataSection, seed: int, made_by: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Tokenize one chunk of whole line groups, make its examples, and write them as shard `index`
    (`made_by`: the node, recorded with it). Written group by group: a task holds one group's tokens."""
    if first_line % text.GROUP_LINES:
        raise ValueError(f"a shard must start at a multiple of {text.GROUP_LINES} lines, not {first_line}")
    started = time.perf_counter()
    # Filled in as the groups are written; the record is made after the last one.
    details = {"first_line": first_line, "lines": len(lines), "tokens": 0, **(made_by or {})}

    def groups() -> Iterator[dict[str, list]]:
        for begin in range(0, len(lines), text.GROUP_LINES):
            ids = text.token_ids(tokenizer, lines[begin : begin + text.GROUP_LINES])
            if data.next_sentence_prediction:
                made = text.pair_sentences(tokenizer, ids, first_line + begin, data.max_seq_length, seed)
                details["tokens"] += sum(map(sum, made["attention_mask"]))
            else:
                made = {"input_ids": text.cut_blocks(tokenizer, ids, data.max_seq_length)}
                details["tokens"] += sum(map(len, made["input_ids"]))
            yield made

    return write_shard(root, shard_name(index), groups(), text_features(data.next_sentence_prediction), started,
                       details)


def write_shard(root: Path, name: str, batches: Iterable[dict[str, list]], features: Any, started: float,
                details: dict[str, Any]) -> dict[str, Any]:
    """Write the batches of columns as the shard `name` under a temporary name and rename it, then its
    record beside it: a shard with a record is whole. The record: file, rows, bytes, sha256, seconds,
    and `details` (read after the last batch, so a batch generator may fill it in)."""
    from datasets.arrow_writer import ArrowWriter

    path = root / name
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with ArrowWriter(features=features, path=str(partial)) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += len(next(iter(batch.values()), []))
        writer.finalize()
    partial.replace(path)
    record = {"file": name, "rows": rows, "bytes": path.stat().st_size, "sha256": file_digest(path),
              "seconds": round(time.perf_counter() - started, 3), **details}
    rundir.write_json(path.with_suffix(".json"), record)
    return record


def text_features(next_sentence_prediction: bool) -> Any:
    """The types datasets.map gives these columns in the in-process path (its OptimizedTypedSequence)."""
    import datasets

    ids = {"input_ids": datasets.Sequence(datasets.Value("int32"))}
    if not next_sentence_prediction:
        return datasets.Features(ids)
    return datasets.Features({**ids, "token_type_ids": datasets.Sequence(datasets.Value("int8")),
                              "attention_mask": datasets.Sequence(datasets.Value("int8")),
                              "next_sentence_label": datasets.Value("int64")})


def file_digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def finished_shard(root: Path, name: str) -> Optional[dict[str, Any]]:
    """The record of shard `name` if an earlier, interrupted preparation finished it."""
    record_path = (root / name).with_suffix(".json")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    shard = root / record["file"]
    return record if shard.is_file() and shard.stat().st_size == record["bytes"] else None


def read_manifest(root: Path, kind: str = "text") -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        hint = (" (a preparation started there and did not finish: run distdl prepare again to complete it)"
                if (root / IN_PROGRESS).is_file() else " (run distdl prepare with this config first)")
        raise ConfigError(f"data.prepared_path: {path} does not exist{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"data.prepared_path: {path} is damaged ({err}); prepare again into a new folder") from None
    if manifest.get("format") != FORMATS[kind] or manifest.get("version") != VERSION:
        raise ConfigError(f"data.prepared_path: {path} is not a manifest of {FORMATS[kind]}, version {VERSION} "
                          f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any], kind: str = "text") -> None:
    rundir.write_json(root / MANIFEST, {"format": FORMATS[kind], "version": VERSION, **manifest})


def check_shards(root: Path, records: list[dict[str, Any]], digests: bool = False) -> None:
    """Every shard of `records` (a manifest's) is there, whole, and readable with the rows it recorded;
    with `digests`, also unchanged byte for byte (sha256, which reads every shard)."""
    for record in records:
        path = root / record["file"]
        if not path.is_file():
            raise ConfigError(f"data.prepared_path: shard {path} is missing; prepare again into a new folder")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ConfigError(f"data.prepared_path: shard {path} has {size} bytes, the manifest recorded "
                              f"{record['bytes']}: it is partial or was altered; prepare again into a new folder")
        rows = _readable_rows(path)
        if rows != record["rows"]:
            raise ConfigError(f"data.prepared_path: shard {path} holds {rows} rows, the manifest recorded "
                              f"{record['rows']}; prepare again into a new folder")
        if digests and file_digest(path) != record["sha256"]:
            raise ConfigError(f"data.prepared_path: shard {path} is corrupt: its sha256 differs from the "
                              "manifest's; prepare again into a new folder")


def _readable_rows(path: Path) -> int:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().num_rows
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"data.prepared_path: shard {path} is corrupt: not a readable Arrow stream ({err}); "
                          "prepare again into a new folder") from None


def split_indices_cache(manifest: dict[str, Any], data: text.TextDataSection, seed: int) -> Path:
    """Where a worker keeps the train/held-out index mappings of these shards: this node's datasets
    cache (data.cache_dir if set), under a name from the shards' digests and the split's settings."""
    import datasets

    key = json.dumps([[r["sha256"] for r in manifest["shards"]], seed, data.eval_fraction])
    cache = Path(data.cache_dir).expanduser() if data.cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    return cache / "distdl-prepared-splits" / hashlib.sha256(key.encode()).hexdigest()[:32]


def load_rows(root: Path, records: list[dict[str, Any]]) -> Any:
    """The rows of these shards (a manifest's records) as one `datasets.Dataset`, memory-mapped, in order."""
    import datasets

    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(root / r["file"])) for r in records])
