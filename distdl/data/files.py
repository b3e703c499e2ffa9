"""Checks that name a damaged local model or tokenizer file, where the libraries' own errors would not."""

from __future__ import annotations

import json
from pathlib import Path

from distdl.errors import ConfigError


def check_local_model_files(source: str | Path, key: str) -> None:
    """A local HF folder's JSON files must parse and its safetensors files must be whole.

    A hub name is left to transformers. safetensors checks that its header covers the file exactly,
    so a truncated download or copy is caught here, on the driver, before any worker loads it.
    """
    folder = Path(source)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{key}: {file} is damaged: not valid JSON ({err}); copy or download it again") from None
    for file in sorted(folder.glob("*.safetensors")):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as weights:
                weights.keys()
        except SafetensorError as err:
            raise ConfigError(f"{key}: {file} is damaged ({err}); copy or download it again") from None
