"""Text data for BERT on a small generated corpus: tokenizer, blocks, eval split, shards, resumable batches, masking."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from distdl.data import shards, text
from distdl.errors import ConfigError

VOCAB_SIZE = 400
SEQ = 32


def english_like_lines(count, seed=0):
    rng = random.Random(seed)
    onsets, vowels, codas = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "st", "t", "th", "w"], \
        ["a", "e", "i", "o", "u", "ea", "ou"], ["", "n", "r", "s", "t", "ng", "ck"]
    words = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                            for _ in range(rng.randint(1, 3))) for _ in range(600)})
    rng.shuffle(words)
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf-like frequencies
    lines = []
    for _ in range(count):
        sentence = " ".join(rng.choices(words, weights, k=rng.randint(6, 18)))
        lines.append(sentence.capitalize() + rng.choice([".", ",", "!", "?"]))
    return lines


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The corpus, tokenizer and blocks, with a private datasets cache."""
    import datasets

    tmp = tmp_path_factory.mktemp("text")
    cache = tmp / "hf-datasets"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        corpus = tmp / "corpus.txt"
        lines = english_like_lines(500)
        corpus.write_text("\n".join(lines[:250]) + "\n\n   \n" + "\n".join(lines[250:]) + "\n")
        data = text.TextDataSection(path=str(corpus), max_seq_length=SEQ, eval_fraction=0.1, cache_dir=str(cache))
        raw = text.load_raw_corpus(data)
        tokenizer = text.train_tokenizer(raw, text.TokenizerSection(vocab_size=VOCAB_SIZE), tmp / "tokenizer")
        blocks = text.tokenized_blocks(raw, tokenizer, data, seed=0)
        yield {"tmp": tmp, "lines": lines, "raw": raw, "tokenizer": tokenizer, "blocks": blocks, "data": data}


def test_corpus_keeps_non_empty_lines(prepared):
    assert prepared["raw"]["text"] == prepared["lines"]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_bert_special_tokens_and_respects_vocab_size(prepared):
    tokenizer = prepared["tokenizer"]
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.mask_token, tokenizer.pad_token) == \
        ("[CLS]", "[SEP]", "[MASK]", "[PAD]")
    ids = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id, tokenizer.pad_token_id,
           tokenizer.unk_token_id}
    assert len(ids) == 5 and all(0 <= i < len(tokenizer) for i in ids)
    assert 100 < len(tokenizer) <= VOCAB_SIZE  # it learned merges, and no more than asked for
    encoded = tokenizer("Stea thou")["input_ids"]
    assert encoded[0] == tokenizer.cls_token_id and encoded[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.tokenize("STEA THOU") == tokenizer.tokenize("stea thou")  # lowercased


def test_saved_tokenizer_loads_back_the_same(prepared):
    section = text.TokenizerSection(name_or_path=str(prepared["tmp"] / "tokenizer"))
    loaded = text.prepare_tokenizer(prepared["raw"], section, prepared["tmp"])
    assert loaded.get_vocab() == prepared["tokenizer"].get_vocab()
    sample = prepared["lines"][3]
    assert loaded(sample)["input_ids"] == prepared["tokenizer"](sample)["input_ids"]


# ----------------------------------------------------------------------------- blocks and eval split


def token_stream(prepared):
    encoded = prepared["tokenizer"](prepared["lines"], add_special_tokens=False)["input_ids"]
    return [token for ids in encoded for token in ids]


def test_blocks_are_full_length_and_framed(prepared):
    tokenizer, blocks = prepared["tokenizer"], prepared["blocks"]
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id}
    for split in ("train", "eval"):
        for block in blocks[split]["input_ids"]:
            assert len(block) == SEQ
            assert block[0] == tokenizer.cls_token_id and block[-1] == tokenizer.sep_token_id
            assert not special & set(block[1:-1])


def test_blocks_cover_the_token_stream_and_eval_is_disjoint(prepared):
    blocks = prepared["blocks"]
    train = [tuple(b[1:-1]) for b in blocks["train"]["input_ids"]]
    held_out = [tuple(b[1:-1]) for b in blocks["eval"]["input_ids"]]
    stream = token_stream(prepared)
    body = SEQ - 2
    chunks = [tuple(stream[i : i + body]) for i in range(0, len(stream) // body * body, body)]
    assert len(chunks) > 50
    assert sorted(train + held_out) == sorted(chunks)  # every full chunk exactly once, nothing else
    assert not set(train) & set(held_out)
    assert len(held_out) == pytest.approx(0.1 * len(chunks), abs=1)


def test_eval_split_is_reproducible(prepared):
    again = text.tokenized_blocks(prepared["raw"], prepared["tokenizer"], prepared["data"], seed=0)
    assert again["eval"]["input_ids"] == prepared["blocks"]["eval"]["input_ids"]
    other = text.tokenized_blocks(prepared["raw"], prepared["tokenizer"], prepared["data"], seed=1)
    assert other["eval"]["input_ids"] != prepared["blocks"]["eval"]["input_ids"]


# ----------------------------------------------------------------------------- shards


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("size", [None, 31, 1, 0])  # 1 and 0: fewer examples than ranks (a tiny eval set)
def test_shards_are_disjoint_and_cover_once(prepared, world_size, size):
    import datasets

    if size is None:
        dataset = prepared["blocks"]["train"]
        dataset = dataset.add_column("row", list(range(len(dataset))))
    else:
        dataset = datasets.Dataset.from_dict({"row": list(range(size))})
    pieces = [shards.shard_for_rank(dataset, rank, world_size)["row"] for rank in range(world_size)]
    assert sorted(itertools.chain(*pieces)) == list(range(len(dataset)))
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


@pytest.mark.parametrize("size, world_size, batch", [(31, 2, 4), (31, 3, 8), (5, 4, 8), (64, 2, 8), (1, 2, 8), (2, 3, 1)])
def test_lockstep_slices_count_every_example_once_in_equal_numbers_of_passes(size, world_size, batch):
    import datasets

    dataset = datasets.Dataset.from_dict({"row": list(range(size))})
    counted, passes = [], set()
    for rank in range(world_size):
        shard = shards.shard_for_rank(dataset, rank, world_size)
        slices = list(shards.lockstep_slices(shard, dataset, batch, world_size))
        passes.add(len(slices))
        counted += [row for rows, count in slices if count for row in rows["row"]]
    assert len(passes) == 1, "every rank runs the same number of forward passes (ZeRO-3 needs it)"
    assert counted == list(range(size))


# ----------------------------------------------------------------------------- resumable micro-batches


def stack(examples):
    return {"input_ids": torch.tensor([e["input_ids"] for e in examples])}


def take(dataset, seed, start, count, world_size=1, rank=0):
    plan = shards.BatchPlan(micro_batch_size=4, accumulation_steps=1, world_size=world_size, rank=rank, seed=seed)
    return [b["input_ids"] for b in itertools.islice(shards.micro_batches(dataset, plan, stack, start), count)]


@pytest.fixture(scope="module")
def numbered():
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [[i, -i] for i in range(23)]})  # 5 batches of 4 an epoch


@pytest.mark.parametrize("start", [1, 4, 5, 7, 12])
def test_start_k_continues_exactly(numbered, start):
    full = take(numbered, seed=3, start=0, count=start + 9)
    resumed = take(numbered, seed=3, start=start, count=9)
    assert all(torch.equal(a, b) for a, b in zip(full[start:], resumed, strict=True))


def test_batches_shuffle_each_epoch_without_repeats(numbered):
    batches = take(numbered, seed=3, start=0, count=10)
    epochs = [torch.cat(batches[:5])[:, 0].tolist(), torch.cat(batches[5:])[:, 0].tolist()]
    for rows in epochs:
        assert len(set(rows)) == 20  # no example twice in an epoch (3 left over)
    assert epochs[0] != epochs[1]
    assert epochs[0] != torch.cat(take(numbered, seed=4, start=0, count=5))[:, 0].tolist()


def test_two_ranks_read_the_one_process_order_between_them(numbered):
    """Global batches of 8: with 2 ranks of 4 each, rank 0 reads each global batch's first half."""
    one = take(numbered, seed=3, start=0, count=4, world_size=1)
    plan = shards.BatchPlan(micro_batch_size=8, accumulation_steps=1, world_size=1, rank=0, seed=3)
    whole = [b["input_ids"] for b in itertools.islice(shards.micro_batches(numbered, plan, stack), 2)]
    halves = [take(numbered, seed=3, start=0, count=2, world_size=2, rank=rank) for rank in (0, 1)]
    assert torch.equal(whole[0], torch.cat([halves[0][0], halves[1][0]]))
    assert torch.equal(whole[1], torch.cat([halves[0][1], halves[1][1]]))
    assert len(one) == 4


def test_a_training_set_smaller_than_one_global_batch_is_refused(numbered):
    with pytest.raises(ConfigError, match="3 examples, fewer than one global batch of 4"):
        take(numbered.select(range(3)), seed=0, start=0, count=1)


# ----------------------------------------------------------------------------- masking


def test_masking_statistics(prepared):
    from transformers import DataCollatorForLanguageModeling

    tokenizer = prepared["tokenizer"]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    rows = prepared["blocks"]["train"]["input_ids"]
    original = torch.tensor(rows).repeat(20, 1)
    inputs, labels = [], []
    for begin in range(0, len(original), 64):
        batch = collate([{"input_ids": r} for r in original[begin : begin + 64].tolist()])
        inputs.append(batch["input_ids"])
        labels.append(batch["labels"])
    inputs, labels = torch.cat(inputs), torch.cat(labels)

    selected = labels != -100
    body = torch.zeros_like(selected)
    body[:, 1:-1] = True
    assert not selected[~body].any()  # [CLS] and [SEP] are never selected
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(inputs[~selected], original[~selected])

    count = int(selected.sum())
    assert count > 10_000
    as_mask = inputs[selected] == tokenizer.mask_token_id
    unchanged = inputs[selected] == original[selected]
    random_token = ~as_mask & ~unchanged
    assert count / int(body.sum()) == pytest.approx(0.15, abs=0.01)
    assert as_mask.float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert unchanged.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert random_token.float().mean().item() == pytest.approx(0.1, abs=0.02)


# ----------------------------------------------------------------------------- corpus errors


def test_missing_corpus_path(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(ConfigError, match="does not exist") as info:
        text.load_raw_corpus(text.TextDataSection(path=str(missing), cache_dir=str(tmp_path / "hf")))
    assert str(missing) in str(info.value) and "data.path" in str(info.value)


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "image.png").write_bytes(b"\x89PNG")  # not a text file
    (folder / ".hidden.txt").write_text("hidden words")
    with pytest.raises(ConfigError, match="no text files") as info:
        text.load_raw_corpus(text.TextDataSection(path=str(folder), cache_dir=str(tmp_path / "hf")))
    assert str(folder) in str(info.value) and "data.path" in str(info.value)


def test_corpus_of_blank_lines(tmp_path):
    corpus = tmp_path / "blank.txt"
    corpus.write_text("\n   \n\n")
    with pytest.raises(ConfigError, match="no non-empty lines") as info:
        text.load_raw_corpus(text.TextDataSection(path=str(corpus), cache_dir=str(tmp_path / "hf")))
    assert str(corpus) in str(info.value)


def test_folder_corpus_reads_text_files_only(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first file\n")
    (folder / "sub" / "LICENSE").write_text("second file\n")
    (folder / "data.json").write_text('{"text": "not this"}\n')
    raw = text.load_raw_corpus(text.TextDataSection(path=str(folder), cache_dir=str(tmp_path / "hf")))
    assert sorted(raw["text"]) == ["first file", "second file"]


def test_folder_of_parquet_files_loads_through_datasets(tmp_path):
    """The same loading path as a hub dataset name: datasets infers the format and reads text_column."""
    import datasets

    folder = tmp_path / "wiki"
    folder.mkdir()
    rows = [{"content": f"document {i} says the quick brown fox jumps", "id": i} for i in range(50)]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    raw = text.load_raw_corpus(text.TextDataSection(path=str(folder), text_column="content", cache_dir=str(tmp_path / "c")))
    assert raw.column_names == ["text"] and len(raw) == 50 and raw[3]["text"].startswith("document 3")
    with pytest.raises(ConfigError, match="text_column='body'"):
        text.load_raw_corpus(text.TextDataSection(path=str(folder), text_column="body", cache_dir=str(tmp_path / "c")))


def test_folder_of_broken_data_files_names_the_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"could not load the data files in {folder}"):
        text.load_raw_corpus(text.TextDataSection(path=str(folder), cache_dir=str(tmp_path / "d")))


def test_next_sentence_pairs(prepared):
    """[CLS] A [SEP] B [SEP] padded; label 0 means B is A's true continuation, about half are random."""
    from dataclasses import replace

    tokenizer = prepared["tokenizer"]
    data = replace(prepared["data"], next_sentence_prediction=True)
    pairs = text.tokenized_blocks(prepared["raw"], tokenizer, data, seed=0)
    examples = list(pairs["train"]) + list(pairs["eval"])
    stream = " ".join(map(str, token_stream(prepared)))
    labels = [e["next_sentence_label"] for e in examples]
    assert len(examples) > 50 and 0.35 < sum(labels) / len(labels) < 0.65
    for example in examples:
        ids, types, mask = example["input_ids"], example["token_type_ids"], example["attention_mask"]
        assert len(ids) == len(types) == len(mask) == SEQ
        length = sum(mask)
        assert ids[0] == tokenizer.cls_token_id and ids[length - 1] == tokenizer.sep_token_id
        assert all(t == tokenizer.pad_token_id for t in ids[length:])
        first_sep = ids.index(tokenizer.sep_token_id)
        a, b = ids[1:first_sep], ids[first_sep + 1 : length - 1]
        assert a and b and types[: first_sep + 1] == [0] * (first_sep + 1) and set(types[first_sep + 1 : length]) == {1}
        if example["next_sentence_label"] == 0:
            # Trimming may shorten the end of B, never its start: A then B's head are contiguous text.
            assert " ".join(map(str, a + b[:1])) in stream


def test_hub_download_folder_with_readme_is_a_data_folder(tmp_path):
    import datasets

    folder = tmp_path / "download"
    folder.mkdir()
    datasets.Dataset.from_list([{"text": f"row {i} of real data"} for i in range(20)]).to_parquet(str(folder / "a.parquet"))
    (folder / "README.md").write_text("# dataset card, not training text\n")
    raw = text.load_raw_corpus(text.TextDataSection(path=str(folder), cache_dir=str(tmp_path / "c")))
    assert len(raw) == 20 and "dataset card" not in " ".join(raw["text"])


def test_a_truncated_tokenizer_file_is_named(prepared, tmp_path):
    import shutil

    copy = tmp_path / "tokenizer"
    shutil.copytree(prepared["tmp"] / "tokenizer", copy)
    content = (copy / "tokenizer.json").read_bytes()
    (copy / "tokenizer.json").write_bytes(content[: len(content) // 3])
    with pytest.raises(ConfigError, match=f"tokenizer.name_or_path: {copy / 'tokenizer.json'} is damaged: not valid JSON"):
        text.load_tokenizer(text.TokenizerSection(name_or_path=str(copy)), tmp_path)
    # The tokenizer a run trained for itself, damaged in its run directory, is named as such.
    shutil.copytree(copy, tmp_path / "run" / text.TOKENIZER_DIRNAME)
    with pytest.raises(ConfigError, match="the run's tokenizer: .*tokenizer.json is damaged"):
        text.prepare_tokenizer(None, text.TokenizerSection(), tmp_path / "run")
