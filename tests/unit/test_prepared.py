"""Prepared text shards without Ray: the lines `distdl prepare` reads are the ones datasets' loader
reads, shards made chunk by chunk hold exactly the in-process path's examples, and a manifest or
shard that does not fit the config is refused naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distdl.data import prepared, text
from distdl.errors import ConfigError
from tests.helpers.shared import CONFIGS, TINY
from tests.unit.test_text_data import english_like_lines

SEQ = 32


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """3,600 lines over two files, with empty and blank lines between them."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = english_like_lines(3600, seed=3)
    (folder / "a.txt").write_text("\n".join(lines[:1700]) + "\n\n  \n")
    (folder / "b.txt").write_text("\n".join(lines[1700:]) + "\n")
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    data = text.TextDataSection(path=str(corpus))
    text.train_tokenizer(text.corpus_line_batches(data), text.TokenizerSection(vocab_size=500), out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_lines_are_the_ones_datasets_reads(tmp_path):
    """Python's line reading splits as datasets' text loader does: CRLF, a lone CR, form feeds and
    Unicode spaces, blank lines, no final newline, several files in order."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "1.txt").write_bytes("one\r\ntwo\rthree\n\n   \n\u00a0\n four \x0cfive\n".encode())
    (tmp_path / "corpus" / "2.txt").write_bytes("caf\u00e9\u2028next\nlast without newline".encode())
    data = text.TextDataSection(path=str(tmp_path / "corpus"))
    streamed = [line for batch in text.corpus_line_batches(data, batch_lines=2) for line in batch]
    assert streamed == text.load_raw_corpus(data)["text"]
    assert "two" in streamed and "last without newline" in streamed and "\u00a0" not in streamed


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory, corpus) -> Path:
    """The same lines as parquet files with a `content` column: what a hub dataset downloads as, read
    through datasets' streaming loader."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("parquet")
    for name in ("a", "b"):
        lines = (corpus / f"{name}.txt").read_text().split("\n")
        pq.write_table(pa.table({"content": lines, "id": list(range(len(lines)))}), folder / f"{name}.parquet")
    (folder / "README.md").write_text("a dataset card, as every hub download has\n")
    return folder


@pytest.mark.parametrize("nsp, kind, num_proc", [(False, "text", None), (True, "text", 2), (False, "parquet", None)],
                         ids=["mlm-blocks", "nsp-pairs-2-processes", "parquet-streamed"])
def test_shards_hold_the_in_process_examples_in_order(tmp_path, corpus, parquet_corpus, tokenizer, nsp, kind,
                                                      num_proc):
    """The in-process path tokenizes with data.num_proc processes and still makes the same examples."""
    source = {"text": corpus, "parquet": parquet_corpus}[kind]
    data = text.TextDataSection(path=str(source), max_seq_length=SEQ, next_sentence_prediction=nsp,
                                eval_fraction=0.1, lines_per_shard=2000, text_column="content", num_proc=num_proc)
    lines = [line for batch in text.corpus_line_batches(data) for line in batch]
    records = [prepared.make_text_shard(tmp_path, index, first, lines[first : first + 2000], tokenizer, data, seed=5)
               for index, first in enumerate(range(0, len(lines), 2000))]
    prepared.write_manifest(tmp_path, {"shards": records})
    examples = prepared.load_rows(tmp_path, prepared.read_manifest(tmp_path)["shards"])
    reference = text.tokenized_blocks(text.load_raw_corpus(data), tokenizer, data, seed=5)
    ours = text.split_train_eval(examples, data, seed=5, indices_cache=tmp_path / "node-cache" / "split")
    assert len(records) == 2 and sum(r["lines"] for r in records) == len(lines) == 3600
    for split in ("train", "eval"):
        assert ours[split].to_dict() == reference[split].to_dict()
    assert examples.features == reference["train"].features
    written = {f"shard-0000{i}.{suffix}" for i in range(2) for suffix in ("arrow", "json")}
    assert {p.name for p in (tmp_path / "shards").iterdir()} == written, "reading writes nothing beside the shards"
    if nsp:
        assert 0 < sum(examples["next_sentence_label"]) < len(examples)


@pytest.fixture()
def shard_folder(tmp_path, corpus, tokenizer):
    data = text.TextDataSection(path=str(corpus), max_seq_length=SEQ, lines_per_shard=1000)
    lines = [line for batch in text.corpus_line_batches(data) for line in batch]
    records = [prepared.make_text_shard(tmp_path, i, first, lines[first : first + 1000], tokenizer, data, seed=0)
               for i, first in enumerate(range(0, len(lines), 1000))]
    manifest = {"source": text.source_fingerprint(data), "settings": prepared.settings(data, tokenizer, 0),
                "shards": records}
    prepared.write_manifest(tmp_path, manifest)
    return tmp_path, data


def test_a_manifest_from_another_tokenizer_or_corpus_says_what_differs(shard_folder, corpus, minilm):
    from transformers import AutoTokenizer

    root, data = shard_folder
    manifest = prepared.read_manifest(root)
    other_tokenizer = AutoTokenizer.from_pretrained(minilm)
    expected = {"source": text.source_fingerprint(data), "settings": prepared.settings(data, other_tokenizer, 0)}
    assert prepared.differences(manifest, expected) == [
        f"the tokenizer (sha256 of its tokenizer.json): prepared {manifest['settings']['tokenizer_sha256'][:12]}..., "
        f"this config {prepared.tokenizer_digest(other_tokenizer)[:12]}..."]
    changed = {"source": dict(manifest["source"]), "settings": dict(manifest["settings"], max_seq_length=64)}
    changed["source"]["files"] = [dict(f, bytes=f["bytes"] + 1) if f["name"] == "b.txt" else f
                                  for f in changed["source"]["files"]]
    assert prepared.differences(manifest, changed) == [
        "max_seq_length: prepared 32, this config 64",
        "corpus file b.txt: changed since it was prepared (size or modification time)"]
    assert prepared.differences(manifest, {"source": {}, "settings": manifest["settings"]}) == []


def test_a_missing_partial_or_corrupt_shard_is_named(shard_folder):
    root, _ = shard_folder
    manifest = prepared.read_manifest(root)
    prepared.check_shards(root, manifest["shards"], digests=True)
    first, second, third = (root / r["file"] for r in manifest["shards"][:3])
    whole = first.read_bytes()

    first.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match=rf"shard {first} has {len(whole) // 2} bytes.*partial or was altered"):
        prepared.check_shards(root, manifest["shards"])
    first.write_bytes(b"\0" * 64 + whole[64:])
    with pytest.raises(ConfigError, match=rf"shard {first} is corrupt: not a readable Arrow stream"):
        prepared.check_shards(root, manifest["shards"])
    first.write_bytes(whole)

    body = bytearray(second.read_bytes())
    body[-200] ^= 0xFF  # a flipped bit inside the data: only the digest sees it
    second.write_bytes(bytes(body))
    prepared.check_shards(root, manifest["shards"])
    with pytest.raises(ConfigError, match=rf"shard {second} is corrupt: its sha256 differs"):
        prepared.check_shards(root, manifest["shards"], digests=True)

    third.unlink()
    with pytest.raises(ConfigError, match=rf"shard {third} is missing"):
        prepared.check_shards(root, manifest["shards"])

    (root / prepared.MANIFEST).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="is not a manifest of distdl-prepared-text"):
        prepared.read_manifest(root)
    (root / prepared.MANIFEST).unlink()
    with pytest.raises(ConfigError, match=r"manifest.json does not exist \(run distdl prepare"):
        prepared.read_manifest(root)


# ----------------------------------------------------------------------------- refusals before Ray starts



def no_ray(config) -> None:
    raise AssertionError("this case must be settled before Ray starts")


def tiny_config(corpus: Path, tokenizer_dir: Path, root: Path, *extra: str):
    from distdl.config import load_config

    return load_config(TINY, [f"data.path={corpus}", f"data.prepared_path={root}", f"tokenizer.name_or_path={tokenizer_dir}",
                              f"data.max_seq_length={SEQ}", "data.lines_per_shard=1000", f"run.storage_path={root.parent}",
                              *extra])


def test_prepare_refuses_what_it_cannot_prepare_and_leaves_it_alone(tmp_path, corpus, tokenizer_dir):
    from distdl.config import load_config
    from distdl.preparation import prepare

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cases = {
        "which is not a distdl preparation, and is left as it is": tiny_config(corpus, tokenizer_dir, foreign),
        "data.lines_per_shard=1500 must be a multiple of 1000": tiny_config(
            corpus, tokenizer_dir, tmp_path / "new", "data.lines_per_shard=1500"),
        "data.prepared_path is required": load_config(TINY, [f"data.path={corpus}"]),
        "workload 'resnet' with this data has no preparation step": load_config(
            CONFIGS / "resnet/mnist_laptop.yaml", [f"data.path={tmp_path}"]),
    }
    for message, config in cases.items():
        with pytest.raises(ConfigError, match=message):
            prepare(config, no_ray)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "new").exists()


def test_prepare_verifies_a_finished_preparation_and_refuses_other_settings(shard_folder, corpus, tokenizer_dir,
                                                                               capsys):
    from distdl.preparation import prepare

    root, _ = shard_folder
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert prepare(tiny_config(corpus, tokenizer_dir, root), no_ray) == prepared.read_manifest(root)
    assert "already prepared from this corpus and settings; its 4 shards are whole (sha256 checked)" in \
        capsys.readouterr().out
    with pytest.raises(ConfigError, match="prepared from another corpus or settings, and is left as it is: "
                                          "max_seq_length: prepared 32, this config 64"):
        prepare(tiny_config(corpus, tokenizer_dir, root, "data.max_seq_length=64"), no_ray)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_an_unfinished_preparation_goes_on_only_with_its_settings_and_cut(tmp_path, corpus, tokenizer_dir):
    """Before Ray starts: another shard size would mix two cuts of the corpus, so it is refused; the same
    one clears what killed tasks left half-written, then (here) stops at the connection."""
    from distdl.preparation import prepare

    root = tmp_path / "prepared"
    with pytest.raises(AssertionError, match="settled before Ray starts"):
        prepare(tiny_config(corpus, tokenizer_dir, root), no_ray)  # claims the folder, then would start Ray
    claim = json.loads((root / prepared.IN_PROGRESS).read_text())
    assert claim["layout"]["lines_per_shard"] == 1000
    with pytest.raises(ConfigError, match="an unfinished preparation in .* has other settings, and is left as it is: "
                                          "lines_per_shard: 1000 before, 2000 now"):
        prepare(tiny_config(corpus, tokenizer_dir, root, "data.lines_per_shard=2000"), no_ray)
    half_written = root / "shards" / ".shard-00003.arrow.partial-4242"
    half_written.parent.mkdir()
    half_written.write_bytes(b"killed mid-write")
    with pytest.raises(AssertionError, match="settled before Ray starts"):
        prepare(tiny_config(corpus, tokenizer_dir, root), no_ray)
    assert not half_written.exists()

    (root / prepared.IN_PROGRESS).unlink()  # shards, but no record of what made them
    with pytest.raises(ConfigError, match="holds shards but neither manifest.json nor preparing.json"):
        prepare(tiny_config(corpus, tokenizer_dir, root), no_ray)


def test_a_preparation_in_a_bucket_claims_it_there_and_leaves_a_foreign_prefix_alone(s3_server, tmp_path, corpus,
                                                                                    tokenizer_dir):
    """On object storage (moto's S3 server) as in a folder: what is not a preparation is refused and kept;
    a new one leaves its claim and tokenizer in the bucket before Ray starts."""
    from distdl.config import load_config
    from distdl.preparation import prepare

    def config(location: str):
        return load_config(TINY, [f"data.path={corpus}", f"data.prepared_path={location}", f"data.max_seq_length={SEQ}",
                                  f"tokenizer.name_or_path={tokenizer_dir}", f"run.storage_path={tmp_path}"])

    def keys() -> set[str]:
        return {item["Key"] for item in s3_server.list_objects_v2(Bucket="corpora").get("Contents", [])}

    s3_server.create_bucket(Bucket="corpora")
    s3_server.put_object(Bucket="corpora", Key="mine/notes.txt", Body=b"keep me")
    with pytest.raises(ConfigError, match="s3://corpora/mine already holds notes.txt, which is not a distdl "
                                          "preparation, and is left as it is"):
        prepare(config("s3://corpora/mine"), no_ray)
    assert keys() == {"mine/notes.txt"}
    with pytest.raises(AssertionError, match="settled before Ray starts"):
        prepare(config("s3://corpora/wiki"), no_ray)
    assert {"wiki/preparing.json", "wiki/tokenizer/tokenizer.json"} <= keys()
    claim = json.loads(s3_server.get_object(Bucket="corpora", Key="wiki/preparing.json")["Body"].read())
    assert claim["layout"] == {"lines_per_shard": 100_000, "max_chunk_bytes": 64 << 20}


def test_training_refuses_shards_that_do_not_fit_its_config(shard_folder, corpus, tokenizer_dir, minilm):
    from distdl.workloads.bert_pretrain import BertPretrain

    root, _ = shard_folder
    config = tiny_config(corpus, tokenizer_dir, root, "trainer.micro_batch_size=4", "trainer.global_batch_size=8")
    manifest = prepared.read_manifest(root)
    total = sum(r["rows"] for r in manifest["shards"])
    prepared.write_manifest(root, {**manifest, "counts": {"examples": total}})
    assert BertPretrain.prepare(config) == total - -(-total * 5 // 100)  # 5% held out, rounded up
    with pytest.raises(ConfigError, match=r"were not made from this config's corpus and settings: the tokenizer"):
        BertPretrain.prepare(tiny_config(corpus, minilm, root, "trainer.micro_batch_size=4", "trainer.global_batch_size=8"))
    (root / prepared.shard_name(2)).write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"shard {root / prepared.shard_name(2)} has 0 bytes"):
        BertPretrain.prepare(config)


# ----------------------------------------------------------------------------- packed image folders


def pack(folder: Path, root: Path, per_shard: int) -> dict:
    """What `distdl prepare` writes for an ImageFolder, made here without Ray."""
    from distdl.data import packed_images

    listings = {split: packed_images.listing(folder, split) for split in packed_images.SPLITS}
    records = []
    for split, (_, samples) in listings.items():
        records += [packed_images.make_image_shard(root, split, i, first, str(folder / split),
                                                   samples[first : first + per_shard])
                    for i, first in enumerate(range(0, len(samples), per_shard))]
    manifest = {"source": packed_images.source_fingerprint(folder, listings), "settings": {}, "shards": records}
    prepared.write_manifest(root, manifest, "images")
    return manifest


@pytest.mark.parametrize("symmetric", [False, True], ids=["classifier", "gan"])
def test_packed_images_are_the_folders_images_with_the_same_augmentation(tmp_path, digits_folder, symmetric):
    import torch

    from distdl.data import vision

    manifest = pack(digits_folder, tmp_path / "packed", per_shard=400)
    assert [r["rows"] for r in manifest["shards"]] == [400, 400, 400, 147, 400, 50]  # train, then val
    folder = vision.VisionDataSection(dataset="imagefolder", path=str(digits_folder), image_size=32)
    packed = vision.VisionDataSection(dataset="imagefolder", path=str(digits_folder), image_size=32,
                                      prepared_path=str(tmp_path / "packed"))
    ours = vision.load_vision(packed, allow_download=True, symmetric=symmetric)
    theirs = vision.load_vision(folder, symmetric=symmetric)
    assert (len(ours.train), len(ours.eval), ours.classes, ours.class_names) == \
        (len(theirs.train), len(theirs.eval), theirs.classes, theirs.class_names) == (1347, 450, 10, list("0123456789"))
    for split in ("train", "eval"):
        for index in (0, 399, 400, len(getattr(ours, split)) - 1):
            torch.manual_seed(index)  # the crop and flip draws
            image, label = getattr(ours, split)[index]
            torch.manual_seed(index)
            expected, expected_label = getattr(theirs, split)[index]
            assert label == expected_label and torch.equal(image, expected)


def test_packed_images_travel_to_dataloader_workers_without_their_data(tmp_path, digits_folder):
    """DataLoader workers started with spawn (or forkserver) get the dataset pickled: only where its
    shards are, which each worker maps itself."""
    import pickle

    import torch

    from distdl.data import vision

    pack(digits_folder, tmp_path / "packed", per_shard=400)
    section = vision.VisionDataSection(dataset="imagefolder", image_size=32, prepared_path=str(tmp_path / "packed"),
                                       augment=False)
    train = vision.load_vision(section).train
    first = train[0]  # maps the shards in this process
    shipped = pickle.dumps(train)
    assert len(shipped) < 4096 < sum(r["bytes"] for r in train.records)
    again = pickle.loads(shipped)
    assert torch.equal(again[0][0], first[0]) and again[1346][1] == train[1346][1]
    loader = torch.utils.data.DataLoader(train, batch_size=64, num_workers=1, multiprocessing_context="spawn")
    images, labels = next(iter(loader))
    assert images.shape == (64, 3, 32, 32) and torch.equal(images[0], first[0]) and labels[0] == first[1]


def test_a_packed_folder_that_no_longer_matches_or_holds_a_bad_image_is_named(tmp_path, digits_folder):
    import shutil

    from distdl.data import packed_images, vision

    folder = tmp_path / "digits"
    shutil.copytree(digits_folder, folder)
    bad = sorted((folder / "val" / "7").iterdir())[0]
    bad.write_bytes(b"not an image")
    pack(folder, tmp_path / "packed", per_shard=1000)
    section = vision.VisionDataSection(dataset="imagefolder", path=str(folder), image_size=32,
                                       prepared_path=str(tmp_path / "packed"))
    data = vision.load_vision(section, allow_download=True)
    index = next(i for i in range(len(data.eval)) if data.eval.row(i)[2] == f"7/{bad.name}")
    with pytest.raises(packed_images.UnpackableImageError,
                       match=rf"image 7/{bad.name} in {tmp_path / 'packed' / 'shards/val-00000.arrow'} cannot be decoded"):
        data.eval[index]

    (folder / "train" / "3" / "extra.png").write_bytes((folder / "train" / "3" / "153.png").read_bytes())
    with pytest.raises(ConfigError, match=r"not packed from data.path .* as it is now: train/: 1348 images, 1347 were "
                                          "packed, or other file names"):
        vision.load_vision(section, allow_download=True)
    vision.load_vision(section)  # the workers trust the driver's check
