"""Small GLUE tasks in the official distribution's layout, with a signal a model can learn.

GLUE itself cannot be downloaded here. These files copy its layout exactly (folder and file names,
headers, column order, CoLA's header-less rows, MNLI's two dev and test sets, the diagnostic set),
and their labels follow from the text: sentiment words for SST-2, word order for CoLA, shared
content for the pair tasks, word overlap for the STS-B score.
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["John", "Mary", "Ana", "Wei", "Omar", "Lena", "Ravi", "Sara", "Tom", "Ines"]
VERBS = ["read", "painted", "sold", "found", "fixed", "bought", "lost", "wrote", "carried", "opened"]
NOUNS = ["book", "car", "letter", "door", "boat", "lamp", "chair", "map", "clock", "bag"]
PLACES = ["Paris", "the garden", "the kitchen", "Lima", "the office", "Oslo", "the park", "Cairo"]
POSITIVE = ["wonderful", "great", "delightful", "brilliant", "superb", "moving", "charming", "excellent"]
NEGATIVE = ["dull", "awful", "boring", "terrible", "clumsy", "tedious", "bland", "poor"]
SUBJECTS = ["the film", "this movie", "the story", "the acting", "the script", "the ending", "the cast"]
ADVERBS = ["really", "quite", "rather", "truly", "simply", "mostly", ""]

# Odd dev and test sizes: two ranks get shards of different lengths, as in real runs.
SIZES = {"train": 160, "dev": 45, "test": 23}


def _fact(rng: random.Random) -> tuple[str, str, str, str]:
    return rng.choice(NAMES), rng.choice(VERBS), rng.choice(NOUNS), rng.choice(PLACES)


def _sentence(fact: tuple[str, str, str, str]) -> str:
    name, verb, noun, place = fact
    return f"{name} {verb} the {noun} in {place} ."


def _paraphrase(fact: tuple[str, str, str, str]) -> str:
    name, verb, noun, place = fact
    return f"In {place} , the {noun} was {verb} by {name} ."


def _review(rng: random.Random, positive: bool) -> str:
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    return " ".join(w for w in (rng.choice(SUBJECTS), "is", rng.choice(ADVERBS), adjective) if w)


def _pair(rng: random.Random, related: bool) -> tuple[str, str]:
    fact = _fact(rng)
    other = fact
    while not related and other == fact:
        other = _fact(rng)
    return _sentence(fact), _paraphrase(fact if related else other)


def _write(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, row)) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_cola(folder: Path, rng: random.Random) -> None:
    for split in ("train", "dev"):
        rows = []
        for _ in range(SIZES[split]):
            words = _sentence(_fact(rng)).split()
            acceptable = rng.random() < 0.5
            original = list(words)
            while not acceptable and words == original:
                rng.shuffle(words)
            rows.append(["gj04", int(acceptable), "" if acceptable else "*", " ".join(words)])
        _write(folder / f"{split}.tsv", None, rows)
    _write(folder / "test.tsv", ["index", "sentence"], [[i, _sentence(_fact(rng))] for i in range(SIZES["test"])])


def write_sst2(folder: Path, rng: random.Random) -> None:
    for split in ("train", "dev"):
        labels = [rng.random() < 0.5 for _ in range(SIZES[split])]
        _write(folder / f"{split}.tsv", ["sentence", "label"], [[_review(rng, y), int(y)] for y in labels])
    _write(folder / "test.tsv", ["index", "sentence"],
           [[i, _review(rng, rng.random() < 0.5)] for i in range(SIZES["test"])])


def write_mrpc(folder: Path, rng: random.Random) -> None:
    header = ["#1 ID", "#2 ID", "#1 String", "#2 String"]
    for split in ("train", "dev"):
        rows = []
        for i in range(SIZES[split]):
            related = rng.random() < 0.6
            rows.append([int(related), 1000 + 2 * i, 1001 + 2 * i, *_pair(rng, related)])
        _write(folder / f"{split}.tsv", ["Quality", *header], rows)
    _write(folder / "test.tsv", ["index", *header],
           [[i, 5000 + 2 * i, 5001 + 2 * i, *_pair(rng, rng.random() < 0.5)] for i in range(SIZES["test"])])


def _overlap_score(a: str, b: str) -> float:
    words_a, words_b = set(a.lower().split()) - {"."}, set(b.lower().split()) - {"."}
    return round(5 * len(words_a & words_b) / len(words_a | words_b), 3)


def write_stsb(folder: Path, rng: random.Random) -> None:
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    for split in ("train", "dev", "test"):
        rows = []
        for i in range(SIZES[split]):
            a, b = _pair(rng, rng.random() < 0.5)
            row = [i, "main-news", "2012", "2012test", i, "none", "none", a, b]
            rows.append(row + ([_overlap_score(a, b)] if split != "test" else []))
        _write(folder / f"{split}.tsv", header + (["score"] if split != "test" else []), rows)


def _question(fact: tuple[str, str, str, str]) -> str:
    return f"Who {fact[1]} the {fact[2]} ?"


def write_qqp(folder: Path, rng: random.Random) -> None:
    for split in ("train", "dev"):
        rows = []
        for i in range(SIZES[split]):
            fact, duplicate = _fact(rng), rng.random() < 0.4
            other = fact if duplicate else _fact(rng)
            second = f"Which person {other[1]} the {other[2]} ?"
            rows.append([i, 2 * i, 2 * i + 1, _question(fact), second, int(duplicate and other[1:3] == fact[1:3])])
        _write(folder / f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], rows)
    _write(folder / "test.tsv", ["id", "question1", "question2"],
           [[i, _question(_fact(rng)), _question(_fact(rng))] for i in range(SIZES["test"])])


def _nli(rng: random.Random) -> tuple[str, str, str]:
    fact = _fact(rng)
    label = rng.choice(["entailment", "neutral", "contradiction"])
    name, verb, noun, place = fact
    hypothesis = {
        "entailment": f"{name} {verb} a {noun} .",
        "neutral": f"{name} liked the {noun} .",
        "contradiction": f"Nobody ever {verb} the {noun} .",
    }[label]
    return _sentence(fact), hypothesis, label


def write_mnli(folder: Path, rng: random.Random) -> None:
    parse = ["sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse"]
    front = ["index", "promptID", "pairID", "genre", *parse, "sentence1", "sentence2"]

    def rows(count: int, labels: int, genre: str) -> list[list]:
        out = []
        for i in range(count):
            premise, hypothesis, label = _nli(rng)
            out.append([i, 100 + i, f"{100 + i}e", genre, "( x )", "( y )", "(ROOT x)", "(ROOT y)", premise,
                        hypothesis, *([label] * labels), label])
        return out

    _write(folder / "train.tsv", [*front, "label1", "gold_label"], rows(SIZES["train"], 1, "fiction"))
    for name, genre in (("matched", "fiction"), ("mismatched", "letters")):
        labels = [f"label{k}" for k in range(1, 6)]
        _write(folder / f"dev_{name}.tsv", [*front, *labels, "gold_label"], rows(SIZES["dev"], 5, genre))
        _write(folder / f"test_{name}.tsv", front, [r[: len(front)] for r in rows(SIZES["test"], 0, genre)])
    diagnostic = [[i, *_nli(rng)[:2]] for i in range(SIZES["test"])]
    _write(folder.parent / "diagnostic" / "diagnostic.tsv", ["index", "sentence1", "sentence2"], diagnostic)


def write_qnli(folder: Path, rng: random.Random) -> None:
    for split in ("train", "dev"):
        rows = []
        for i in range(SIZES[split]):
            fact, answers = _fact(rng), rng.random() < 0.5
            sentence = _sentence(fact if answers else _fact(rng))
            label = "entailment" if answers or sentence == _sentence(fact) else "not_entailment"
            rows.append([i, _question(fact), sentence, label])
        _write(folder / f"{split}.tsv", ["index", "question", "sentence", "label"], rows)
    _write(folder / "test.tsv", ["index", "question", "sentence"],
           [[i, _question(_fact(rng)), _sentence(_fact(rng))] for i in range(SIZES["test"])])


def write_entailment_pairs(folder: Path, rng: random.Random, labels: tuple[str, str]) -> None:
    """RTE (entailment / not_entailment) and WNLI (1 / 0): the second sentence restates the first or not."""
    for split in ("train", "dev"):
        rows = []
        for i in range(SIZES[split]):
            related = rng.random() < 0.5
            rows.append([i, *_pair(rng, related), labels[0] if related else labels[1]])
        _write(folder / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"], rows)
    _write(folder / "test.tsv", ["index", "sentence1", "sentence2"],
           [[i, *_pair(rng, rng.random() < 0.5)] for i in range(SIZES["test"])])


def write_glue(root: Path, seed: int = 0) -> Path:
    """All nine tasks and the diagnostic set under `root`, as the GLUE download script lays them out."""
    writers = {
        "CoLA": write_cola, "SST-2": write_sst2, "MRPC": write_mrpc, "STS-B": write_stsb, "QQP": write_qqp,
        "MNLI": write_mnli, "QNLI": write_qnli,
        "RTE": lambda folder, rng: write_entailment_pairs(folder, rng, ("entailment", "not_entailment")),
        "WNLI": lambda folder, rng: write_entailment_pairs(folder, rng, ("1", "0")),
    }
    for offset, (folder, write) in enumerate(writers.items()):
        write(root / folder, random.Random(seed * 100 + offset))
    return root
