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
# Beside a shard in a node's cache of object storage: the sha256 it was checked to have.
VERIFIED_SUFFIX = ".verified"
VERSION = 1


def prepared_storage(data: Any) -> rundir.RunStorage:
    """data.prepared_path of a text or vision data section, which must be set: a folder the cluster's
    nodes share, or an object-store URI (s3://, gs://) whose shards each node keeps in its cache."""
    if data.prepared_path is None:
        raise ConfigError("data.prepared_path is required: the folder (shared by the cluster's nodes) or the "
                          "object-store URI (s3://...) that `distdl prepare` writes the shards to")
    return storage_at(data.prepared_path)


def storage_at(location: str) -> rundir.RunStorage:
    return rundir.RunStorage(location, key="data.prepared_path", cache="prepared")


def publish(storage: rundir.RunStorage, record: dict[str, Any]) -> None:
    """Object storage: a shard made in this node's cache goes up, then its record (whose presence says
    the shard is whole); the local copy of the shard goes, so a node's disk does not fill with them."""
    if not storage.remote:
        return
    shard = storage.local / record["file"]
    storage.push_files([shard, shard.with_suffix(".json")])
    shard.unlink()


def prepared_root(data: Any) -> Path:
    """data.prepared_path as a local folder: itself, or for object storage this node's copy of it."""
    return prepared_storage(data).local


def _shard_data(name: str) -> bool:
    """A shard's rows (and the mark of its copy checked in a node's cache), not its record."""
    return name.endswith((".arrow", VERIFIED_SUFFIX))


def pull_records(storage: rundir.RunStorage) -> Path:
    """Object storage: the manifest, the claim, the tokenizer and each shard's record into this node's
    copy, the shards already fetched kept, what the bucket no longer holds dropped; the local folder.
    Files are replaced whole, so the node's workers and a driver may pull at once."""
    storage.pull(skip=_shard_data)
    return storage.local


def fetch_shards(storage: rundir.RunStorage, records: list[dict[str, Any]], threads: int = 8) -> None:
    """Object storage: every shard of `records` into this node's cache, each downloaded once per node
    (a file lock keeps the node's other workers waiting for it), checked against its sha256 before it
    is used, and kept for the next run. Downloads run `threads` at a time."""
    if not storage.remote:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda record: _fetch_shard(storage, record), records))


def _fetch_shard(storage: rundir.RunStorage, record: dict[str, Any]) -> None:
    from filelock import FileLock

    local = storage.local / record["file"]
    mark = local.with_name(local.name + VERIFIED_SUFFIX)

    def fetched() -> bool:
        return mark.is_file() and mark.read_text() == record["sha256"] and local.is_file() \
            and local.stat().st_size == record["bytes"]

    if fetched():
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        if fetched():
            return
        partial = local.with_name(f".{local.name}.partial-{os.getpid()}")
        try:
            digest = storage.download(record["file"], partial)
            if digest != record["sha256"]:
                raise ConfigError(f"data.prepared_path: shard {storage.location(record['file'])} is corrupt: its "
                                  "sha256 differs from the manifest's; prepare again into a new location")
            mark.unlink(missing_ok=True)
            os.replace(partial, local)
            mark.write_text(record["sha256"])
        finally:
            partial.unlink(missing_ok=True)


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


def finished_shard(root: Path, name: str, stored: Optional[dict[str, int]] = None) -> Optional[dict[str, Any]]:
    """The record of shard `name` if an earlier, interrupted preparation finished it (`stored`: the
    shards' sizes on object storage, where the shards are, rather than in `root`)."""
    record_path = (root / name).with_suffix(".json")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    shard = root / record["file"]
    size = stored.get(record["file"]) if stored is not None else shard.stat().st_size if shard.is_file() else None
    return record if size == record["bytes"] else None


def stored_sizes(storage: rundir.RunStorage) -> Optional[dict[str, int]]:
    """The shards' sizes on object storage (by their file names); None for a folder."""
    if not storage.remote:
        return None
    return {f"{SHARDS_DIRNAME}/{name}": size for name, size in storage.file_sizes(SHARDS_DIRNAME).items()}


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


def check_shards(root: Path, records: list[dict[str, Any]], digests: bool = False,
                 storage: Optional[rundir.RunStorage] = None) -> None:
    """Every shard of `records` (a manifest's) is there, whole, and readable with the rows it recorded;
    with `digests`, also unchanged byte for byte (sha256, which reads every shard). On object storage
    (`storage`) each is there with its size; its rows and sha256 are checked where it is fetched."""
    stored = stored_sizes(storage) if storage is not None else None
    for record in records:
        path = root / record["file"]
        if stored is not None:
            _check_size(storage.location(record["file"]), stored.get(record["file"]), record)
            continue
        if not path.is_file():
            raise ConfigError(f"data.prepared_path: shard {path} is missing; prepare again into a new folder")
        _check_size(str(path), path.stat().st_size, record)
        rows = _readable_rows(path)
        if rows != record["rows"]:
            raise ConfigError(f"data.prepared_path: shard {path} holds {rows} rows, the manifest recorded "
                              f"{record['rows']}; prepare again into a new folder")
        if digests and file_digest(path) != record["sha256"]:
            raise ConfigError(f"data.prepared_path: shard {path} is corrupt: its sha256 differs from the "
                              "manifest's; prepare again into a new folder")


def _check_size(where: str, size: Optional[int], record: dict[str, Any]) -> None:
    if size is None:
        raise ConfigError(f"data.prepared_path: shard {where} is missing; prepare again into a new folder")
    if size != record["bytes"]:
        raise ConfigError(f"data.prepared_path: shard {where} has {size} bytes, the manifest recorded "
                          f"{record['bytes']}: it is partial or was altered; prepare again into a new folder")


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
