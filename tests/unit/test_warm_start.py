"""model.init_from on one process: an HF folder's weights in a new BERT, position embeddings cut or
extended, the tokenizer adopted, and every bad pointer refused before a worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distdl.config import load_config
from distdl.errors import ConfigError
from distdl.workloads import warm_start
from distdl.workloads.base import WorkerContext
from distdl.workloads.bert_pretrain import POSITIONS, BertPretrain
from tests.helpers.shared import CORPUS, REPO

SOURCE_POSITIONS = 64


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, minilm) -> Path:
    """A tiny-preset BERT (2 layers, 128 wide) with MiniLM's tokenizer and only 64 positions, as
    `distdl export` or save_pretrained writes it."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("hf-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=SOURCE_POSITIONS)
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_config(tmp_path: Path, *overrides: str):
    if not CORPUS.is_dir():
        pytest.skip("needs the Debian license texts in /usr/share/common-licenses")
    return load_config(REPO / "configs/bert/pretrain_tiny.yaml", [
        f"run.storage_path={tmp_path}", f"data.path={CORPUS}", "data.max_seq_length=32", "data.eval_fraction=0.01",
        f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def built_model(config) -> torch.nn.Module:
    config.run_dir.mkdir(parents=True, exist_ok=True)
    BertPretrain.prepare(config)
    context = WorkerContext(rank=0, world_size=1, seed=0, micro_batch_size=4, run_dir=config.run_dir,
                            device=torch.device("cpu"))
    return BertPretrain(config.sections, context).build_model()


def test_position_embeddings_are_cut_or_tiled():
    learned = torch.arange(12.0).reshape(4, 3)
    state = {"p": learned}
    assert warm_start.fit_positions(state, "p", 4) is None and state["p"] is learned
    assert "kept the first 2" in warm_start.fit_positions(state, "p", 2)
    assert torch.equal(state["p"], learned[:2])
    state = {"p": learned}
    assert "extended its 4" in warm_start.fit_positions(state, "p", 10)
    assert torch.equal(state["p"], torch.cat([learned, learned, learned[:2]]))


def test_an_hf_folder_with_fewer_positions_is_refused_unless_extension_is_asked_for(tmp_path, hf_folder):
    config = tiny_config(tmp_path, f"model.init_from={hf_folder}")
    config.run_dir.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has 64 position embeddings.*needs 512.*model.extend_positions: true"):
        BertPretrain.prepare(config)


def test_an_hf_folder_starts_the_model_its_positions_extended_by_copying(tmp_path, hf_folder, capsys):
    from transformers import AutoTokenizer, BertForMaskedLM

    model = built_model(tiny_config(tmp_path, f"model.init_from={hf_folder}", "model.extend_positions=true"))
    source = BertForMaskedLM.from_pretrained(hf_folder).state_dict()
    ours = model.state_dict()
    positions = ours[POSITIONS]
    assert positions.shape[0] == 512
    for start in range(0, 512, SOURCE_POSITIONS):
        assert torch.equal(positions[start:start + SOURCE_POSITIONS], source[POSITIONS])
    compared = [name for name in source if name != POSITIONS and name in ours]
    assert len(compared) > 30
    assert all(torch.equal(ours[name], source[name]) for name in compared)
    assert "extended its 64 position embeddings to 512" in capsys.readouterr().out
    # No tokenizer was named: the run took the folder's, whose vocabulary the embeddings were made for.
    adopted = AutoTokenizer.from_pretrained(tmp_path / "bert-tiny" / "tokenizer")
    assert adopted.get_vocab() == AutoTokenizer.from_pretrained(hf_folder).get_vocab()


@pytest.mark.parametrize("overrides, message", [
    (["model.init_from={missing}"], r"model.init_from: .*missing does not exist"),
    (["model.init_from={empty}"], r"model.init_from: .*empty is neither a distdl run directory"),
    (["model.init_from={folder}", "model.preset=mini", "model.extend_positions=true"],
     r"model.init_from: HF model folder .* is another shape .*num_hidden_layers 2 \(here 4\)"),
    (["model.init_from={folder}", "model.init_optimizer=true", "model.extend_positions=true"],
     r"model.init_optimizer: .* is an HF model folder, which holds no optimizer state"),
])
def test_a_bad_init_from_is_refused_naming_the_key(tmp_path, hf_folder, overrides, message):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "folder": hf_folder}
    config = tiny_config(tmp_path, *[o.format(**paths) for o in overrides])
    config.run_dir.mkdir(parents=True)
    with pytest.raises(ConfigError, match=message):
        BertPretrain.prepare(config)


def test_init_optimizer_without_init_from_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.init_optimizer: true needs model.init_from"):
        tiny_config(tmp_path, "model.init_optimizer=true")
