"""Text corpora for BERT: WordPiece tokenizer, tokenized and cached blocks, held-out slice.

The corpus is a text file, a folder of text files, or a `datasets` hub name.
Tokenization goes through `datasets.map`, so the driver's first pass fills the
cache and the workers' passes read it.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Optional

from annotated_types import Ge, Interval

from distdl.data.files import check_local_model_files
from distdl.errors import ConfigError

TOKENIZER_DIRNAME = "tokenizer"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
# Blocks and sentence pairs are made within consecutive groups of this many non-empty lines: datasets.map's
# batches in one process, and whole groups per shard in `distdl prepare`, so both make the same examples.
GROUP_LINES = 1000


@dataclass
class TextDataSection:
    # A text file, a folder of text files, or a `datasets` hub name (users with network).
    path: Optional[str] = None
    # Hub dataset's config name, e.g. "wikitext-103-raw-v1".
    hub_config: Optional[str] = None
    text_column: str = "text"
    max_seq_length: Annotated[int, Ge(8)] = 128
    mlm_probability: Annotated[float, Interval(gt=0, lt=1)] = 0.15
    # Fraction of the blocks kept out of training for the held-out MLM accuracy.
    eval_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.05
    next_sentence_prediction: bool = False
    num_proc: Optional[int] = None
    cache_dir: Optional[str] = None
    # Shards written by `distdl prepare` (a folder shared by the nodes); when set, training reads them,
    # checked against this config, and data.path may be left out.
    prepared_path: Optional[str] = None
    # Corpus lines per prepared shard: one Ray task each. A multiple of GROUP_LINES (1000).
    lines_per_shard: Annotated[int, Ge(GROUP_LINES)] = 100_000


@dataclass
class TokenizerSection:
    # A local tokenizer directory or a hub name; None trains WordPiece on the corpus.
    name_or_path: Optional[str] = None
    vocab_size: int = 8000
    min_frequency: int = 2
    lowercase: bool = True


def is_local_path(path: str) -> bool:
    """Whether `data.path` names a local file or folder rather than a hub dataset."""
    return os.path.exists(os.path.expanduser(path)) or path.startswith(("/", ".", "~")) or Path(path).suffix in {".txt", ".text"}


def text_files(path: str) -> list[str]:
    """The corpus files under a local path; errors name the path."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"data.path: corpus {root} does not exist (give a text file, a folder of text files, or a hub dataset name)")
    if root.is_file():
        return [str(root)]
    files = sorted(str(f) for f in root.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES and not f.name.startswith("."))
    if not files:
        raise ConfigError(f"data.path: folder {root} holds no text files (*.txt or files without a suffix)")
    return files


TABLE_SUFFIXES = {".parquet", ".json", ".jsonl", ".csv", ".arrow"}


def _is_saved_table_folder(path: str) -> bool:
    """A folder of data files (and no text files): read like a hub dataset, by datasets' format inference."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return False
    suffixes = {f.suffix for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")}
    # A README.md or LICENSE beside parquet files (every hub download) does not make a text corpus.
    return bool(suffixes & TABLE_SUFFIXES) and not suffixes & {".txt", ".text"}


def has_text(row: dict) -> bool:
    # A module-level function, not a lambda: datasets fingerprints it by name and code without
    # dumping its bytecode into worker logs.
    return bool(row["text"] and row["text"].strip())

def load_raw_corpus(data: TextDataSection) -> Any:
    """The corpus as a `datasets.Dataset` with one text column."""
    import datasets

    if data.path is None:
        raise ConfigError("data.path is required: a text file, a folder of text files, or a hub dataset name")
    local = is_local_path(data.path)
    if local and not _is_saved_table_folder(data.path):
        raw = datasets.load_dataset("text", data_files=text_files(data.path), split="train", cache_dir=data.cache_dir)
        column = "text"
    else:
        # A hub name, or a local folder of parquet/json/csv files: datasets infers the format for both.
        what = f"the data files in {data.path}" if local else f"hub dataset {data.path!r}"
        try:
            raw = datasets.load_dataset(data.path, data.hub_config, split="train", cache_dir=data.cache_dir)
        except Exception as err:
            raise ConfigError(f"data.path: could not load {what}: {err}") from err
        column = data.text_column
        if column not in raw.column_names:
            raise ConfigError(f"data.text_column={column!r} is not a column of {data.path}; columns: {raw.column_names}")
    raw = raw.select_columns([column]).rename_column(column, "text") if column != "text" else raw.select_columns(["text"])
    raw = raw.filter(has_text, num_proc=data.num_proc)
    if len(raw) == 0:
        raise ConfigError(f"data.path: corpus {data.path} holds no non-empty lines")
    return raw


def corpus_line_batches(data: TextDataSection, batch_lines: int = GROUP_LINES) -> Iterator[list[str]]:
    """The corpus's non-empty lines, in order, in lists of `batch_lines` (the last one shorter), without
    loading it whole: the same lines as `load_raw_corpus`, for `distdl prepare` and tokenizer training.

    Local text files are read line by line in Python, which splits lines as datasets' text loader does
    (universal newlines) at ~35x its speed here; hub and table corpora stream through datasets.
    """
    if data.path is None:
        raise ConfigError("data.path is required: a text file, a folder of text files, or a hub dataset name")
    if is_local_path(data.path) and not _is_saved_table_folder(data.path):
        texts = (line.rstrip("\n") for file in text_files(data.path) for line in _lines(file))
    else:
        texts = (text for table in _streamed_tables(data) for text in table.column(0).to_pylist())
    batch: list[str] = []
    for text in texts:
        if text and text.strip():  # has_text
            batch.append(text)
            if len(batch) == batch_lines:
                yield batch
                batch = []
    if batch:
        yield batch


def _lines(file: str) -> Iterator[str]:
    with open(file, encoding="utf-8") as lines:
        yield from lines


def _streamed_tables(data: TextDataSection) -> Iterator[Any]:
    import datasets

    where = f"the data files in {data.path}" if is_local_path(data.path) else f"hub dataset {data.path!r}"
    try:
        stream = datasets.load_dataset(data.path, data.hub_config, split="train", streaming=True,
                                       cache_dir=data.cache_dir)
        if data.text_column not in (stream.column_names or [data.text_column]):
            raise ConfigError(f"data.text_column={data.text_column!r} is not a column of {data.path}; "
                              f"columns: {stream.column_names}")
        yield from stream.select_columns([data.text_column]).with_format("arrow").iter(batch_size=10 * GROUP_LINES)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"data.path: could not stream {where}: {err}") from err


def source_fingerprint(data: TextDataSection) -> dict[str, Any]:
    """What identifies the corpus without reading it: each local file's name, size and modification
    time (as make and rsync judge files), or a hub dataset's name, config and text column."""
    if data.path is None:
        return {}
    if is_local_path(data.path):
        root = Path(data.path).expanduser().resolve()
        files = text_files(data.path) if not _is_saved_table_folder(data.path) else sorted(
            str(f) for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
        stats = [(Path(f), Path(f).stat()) for f in files]
        return {"path": str(root), "text_column": data.text_column if _is_saved_table_folder(data.path) else "text",
                "files": [{"name": str(f.relative_to(root)) if f != root else f.name, "bytes": st.st_size,
                           "mtime_ns": st.st_mtime_ns} for f, st in stats]}
    return {"hub": data.path, "hub_config": data.hub_config, "text_column": data.text_column}


def train_tokenizer(corpus: Any, section: TokenizerSection, out_dir: Path) -> Any:
    """Train a BERT WordPiece tokenizer on the corpus and save it in HF format. `corpus`: a
    `datasets.Dataset` with a text column, or an iterable of lists of lines (`corpus_line_batches`)."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizer

    batches: Iterable[list[str]] = corpus
    if hasattr(corpus, "column_names"):
        batches = (corpus[i : i + GROUP_LINES]["text"] for i in range(0, len(corpus), GROUP_LINES))

    wordpiece = BertWordPieceTokenizer(lowercase=section.lowercase)
    wordpiece.train_from_iterator(
        batches, vocab_size=section.vocab_size, min_frequency=section.min_frequency, special_tokens=SPECIAL_TOKENS,
        show_progress=sys.stdout.isatty(),  # its bars leave blank lines in a log file
    )
    tokenizer = BertTokenizer(tokenizer_object=wordpiece._tokenizer, do_lower_case=section.lowercase)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(section: TokenizerSection, run_dir: Path) -> Any:
    """The configured tokenizer, or the one trained for this run (see `prepare_tokenizer`)."""
    from transformers import AutoTokenizer

    source = section.name_or_path or str(run_dir / TOKENIZER_DIRNAME)
    check_local_model_files(source, "tokenizer.name_or_path" if section.name_or_path else "the run's tokenizer")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise ConfigError(f"tokenizer.name_or_path: could not load a tokenizer from {source!r}: {err}") from err


def prepare_tokenizer(raw: Any, section: TokenizerSection, run_dir: Path) -> Any:
    """Load the tokenizer, training one on the corpus the first time a run needs it."""
    if section.name_or_path is None and not (run_dir / TOKENIZER_DIRNAME / "tokenizer.json").is_file():
        return train_tokenizer(raw, section, run_dir / TOKENIZER_DIRNAME)
    tokenizer = load_tokenizer(section, run_dir)
    missing = [t for t in ("mask_token", "pad_token", "cls_token", "sep_token") if getattr(tokenizer, t) is None]
    if missing:
        raise ConfigError(f"tokenizer {section.name_or_path}: lacks {', '.join(missing)}, which BERT pretraining needs")
    return tokenizer


def tokenized_blocks(raw: Any, tokenizer: Any, data: TextDataSection, seed: int) -> Any:
    """Tokenize, concatenate and cut into max_seq_length blocks (as HF's run_mlm.py); split off eval.

    With next-sentence prediction the examples are sentence pairs instead (`sentence_pair_blocks`).
    """
    fingerprint = tokenizer_fingerprint(raw._fingerprint, tokenizer, data.max_seq_length, data.num_proc)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": token_ids(tokenizer, batch["text"])}

    tokens = raw.map(tokenize, batched=True, remove_columns=["text"], num_proc=data.num_proc,
                     new_fingerprint=fingerprint + "-tok", desc="tokenizing")
    if data.next_sentence_prediction:
        blocks = sentence_pair_blocks(tokens, tokenizer, data, seed, fingerprint)
        return split_train_eval(blocks, data, seed)

    def to_blocks(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": cut_blocks(tokenizer, batch["input_ids"], data.max_seq_length)}

    # In one process: datasets.map with num_proc cuts the rows into num_proc contiguous pieces and
    # batches each from its own start, which would move the groups off multiples of GROUP_LINES (and
    # away from what `distdl prepare` makes). Grouping is cheap next to tokenizing, which keeps num_proc.
    blocks = tokens.map(to_blocks, batched=True, batch_size=GROUP_LINES,
                        new_fingerprint=fingerprint + "-blocks-grouped", desc="grouping")
    return split_train_eval(blocks, data, seed)


def token_ids(tokenizer: Any, lines: list[str]) -> list[list[int]]:
    """Each line's token ids, without special tokens."""
    return tokenizer(lines, add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]


def cut_blocks(tokenizer: Any, token_lists: list[list[int]], max_seq_length: int) -> list[list[int]]:
    """One group of lines' tokens concatenated and cut into [CLS] body [SEP] blocks of max_seq_length
    (as HF's run_mlm.py); the group's tail shorter than a block is dropped."""
    body = max_seq_length - 2  # room for [CLS] and [SEP]
    stream = [token for ids in token_lists for token in ids]
    usable = len(stream) // body * body
    return [[tokenizer.cls_token_id, *stream[i : i + body], tokenizer.sep_token_id] for i in range(0, usable, body)]


def split_train_eval(blocks: Any, data: TextDataSection, seed: int, indices_cache: Optional[Path] = None) -> Any:
    """The held-out slice, by datasets' `train_test_split(test_size=data.eval_fraction, seed=seed)`.

    `indices_cache` (prepared shards, which are shared and may be read-only): the split's index
    mappings go to `<indices_cache>-train.arrow` and `-eval.arrow`, memory-mapped like the data,
    instead of beside the data (datasets writes them under a temporary name and moves them into place,
    so the workers of a node may make them at once).
    """
    import datasets

    if len(blocks) < 2:
        raise ConfigError(
            f"data.path: corpus {data.path} gives only {len(blocks)} example(s) of {data.max_seq_length} tokens; "
            "give more text or lower data.max_seq_length"
        )
    names = {} if indices_cache is None else {"train_indices_cache_file_name": f"{indices_cache}-train.arrow",
                                              "test_indices_cache_file_name": f"{indices_cache}-eval.arrow"}
    split = blocks.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True, **names)
    return datasets.DatasetDict(train=split["train"], eval=split["test"])


def tokenizer_fingerprint(base: str, tokenizer: Any, max_seq_length: int, num_proc: Optional[int]) -> str:
    # datasets hashes the map function by pickling it, which is not stable for a tokenizer
    # object across processes; an explicit fingerprint lets workers hit the driver's cache.
    digest = hashlib.sha256()
    digest.update(base.encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(f"{max_seq_length}-{num_proc}".encode())  # caches of another num_proc stay apart
    return digest.hexdigest()[:32]


def sentence_pair_blocks(tokens: Any, tokenizer: Any, data: TextDataSection, seed: int, fingerprint: str) -> Any:
    """BERT's next-sentence-prediction examples, [CLS] A [SEP] B [SEP] padded to max_seq_length.

    Consecutive lines fill a chunk of about max_seq_length tokens, cut at a random line into A and B.
    Half the time B is replaced by lines from elsewhere in the corpus (label 1, "random"); otherwise
    B is A's true continuation (label 0), the labels of HF's BertForPreTraining.
    """

    def to_pairs(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return pair_sentences(tokenizer, batch["input_ids"], indices[0], data.max_seq_length, seed)

    return tokens.map(to_pairs, batched=True, batch_size=GROUP_LINES, with_indices=True, remove_columns=tokens.column_names,
                      new_fingerprint=f"{fingerprint}-nsp-grouped-{seed}", desc="pairing sentences")  # one process: see above


def pair_sentences(tokenizer: Any, token_lists: list[list[int]], first_line: int, max_seq_length: int,
                   seed: int) -> dict[str, list]:
    """One group of lines' NSP examples; `first_line` (the group's place in the corpus) seeds its draws."""
    budget = max_seq_length - 3
    rng = random.Random(seed * 1_000_003 + first_line)
    lines = [ids for ids in token_lists if ids]
    out: dict[str, list] = {"input_ids": [], "token_type_ids": [], "attention_mask": [], "next_sentence_label": []}
    start = 0
    while start < len(lines):
        end, length = start, 0
        while end < len(lines) and length < budget:
            length += len(lines[end])
            end += 1
        pair = _make_pair(lines, start, end, rng, budget)
        if pair is not None:
            _append_example(out, *pair, tokenizer, max_seq_length)
        start = end
    return out


def _make_pair(lines: list[list[int]], start: int, end: int, rng: random.Random, budget: int) -> Any:
    chunk = lines[start:end]
    if len(chunk) >= 2:
        cut = rng.randint(1, len(chunk) - 1)
        a, b = [t for line in chunk[:cut] for t in line], [t for line in chunk[cut:] for t in line]
    else:
        tokens = chunk[0]
        if len(tokens) < 2:
            return None
        cut = rng.randint(1, len(tokens) - 1)
        a, b = tokens[:cut], tokens[cut:]
    label = 0
    others = [i for i in range(len(lines)) if not start <= i < end]
    if others and rng.random() < 0.5:
        label, first = 1, rng.choice(others)
        b = [t for line in lines[first : first + 8] for t in line][: max(budget - len(a), 1)]
    # Trim the longer segment one token at a time (as the BERT reference does), A from its front
    # and B from its end, so the A|B boundary the label is about stays intact.
    keep_a, keep_b = len(a), len(b)
    while keep_a + keep_b > budget:
        if keep_a > keep_b:
            keep_a -= 1
        else:
            keep_b -= 1
    a, b = a[len(a) - keep_a :], b[:keep_b]
    return (a, b, label) if a and b else None


def _append_example(out: dict[str, list], a: list[int], b: list[int], label: int, tokenizer: Any, length: int) -> None:
    ids = [tokenizer.cls_token_id, *a, tokenizer.sep_token_id, *b, tokenizer.sep_token_id]
    padding = length - len(ids)
    out["input_ids"].append(ids + [tokenizer.pad_token_id] * padding)
    out["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * padding)
    out["attention_mask"].append([1] * len(ids) + [0] * padding)
    out["next_sentence_label"].append(label)
