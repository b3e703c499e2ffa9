"""Loading a run configuration: a YAML file, then `dotted.key=value` overrides, typed and validated
on the driver. Precedence is command line > file > dataclass defaults (as in torchtitan and Hydra).
Also reading saved configs back: with the keys added since at their defaults, and compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from distdl.config.fields import build_section
from distdl.config.sections import FIXED_SECTIONS, SESSION_KEYS, Config, validate
from distdl.errors import ConfigError
from distdl.registry import WORKLOADS


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `dotted.key=value` overrides, type-check and validate."""
    raw = read_yaml(path) if path is not None else {}
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def split_section(raw: dict[str, Any], key: str, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """A study's or sweep's own section (None if the file has none) and the training config beside it,
    each with its own overrides: `key.*` go to the section, every other one to the training config."""
    section = raw.pop(key, None)
    for override in overrides:
        dotted, value = parse_override(override)
        if dotted.startswith(key + "."):
            section = {} if section is None else section
            set_dotted(section, dotted[len(key) + 1 :], value)
        else:
            set_dotted(raw, dotted, value)
    return section, raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    try:
        # YAML typing, as Hydra does: 3 -> int, 1e-3 -> float, true -> bool, null -> None.
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if child is None:  # an optional section left out (optimizer.sam: null): a key below it sets it
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[leaf] = value


# Keys naming local files; made absolute on the driver because Ray workers run in another directory.
PATH_KEYS = ("run.storage_path", "engine.deepspeed_config")


def resolve_paths(config: Config, keys: tuple[str, ...]) -> None:
    """Make relative local paths absolute (leaving hub names and URIs alone)."""
    for dotted in keys:
        section_name, key = dotted.split(".")
        section = getattr(config, section_name, None) or config.sections.get(section_name)
        value = getattr(section, key, None) if section is not None else None
        if not value or "://" in value:
            continue
        path = Path(value).expanduser()
        if path.is_absolute():
            setattr(section, key, str(path))
        elif dotted.endswith(("storage_path", "cache_dir")) or path.exists():  # these may not exist yet
            setattr(section, key, str(path.resolve()))


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    workload_name = raw.pop("workload", None)
    if workload_name is None:
        raise ConfigError(f"missing key 'workload'; known workloads: {', '.join(WORKLOADS.names())}")
    spec = WORKLOADS.get(str(workload_name))
    section_types = {**FIXED_SECTIONS, **spec.sections}
    unknown = sorted(set(raw) - set(section_types))
    if unknown:
        raise ConfigError(
            f"unknown section {unknown[0]!r}; valid top-level keys: workload, {', '.join(section_types)}"
        )
    built: dict[str, Any] = {}
    for name, cls in section_types.items():
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of keys, got {value!r}")
        built[name] = build_section(cls, value, name)
    config = Config(
        workload=str(workload_name),
        sections={name: built.pop(name) for name in spec.sections},
        **built,
    )
    resolve_paths(config, PATH_KEYS + spec.path_keys)
    validate(config)
    _check_workload_allows(config, spec)
    spec.validate(config)
    return config


def _check_workload_allows(config: Config, spec: Any) -> None:
    """SAM and minibatch noise take over the workload's backward pass; a workload says why it can't."""
    noise = config.optimizer.noise
    wanted = [("optimizer.sam", config.optimizer.sam is not None, "sharpness_aware_refusal"),
              ("optimizer.noise kind minibatch", noise is not None and noise.kind == "minibatch",
               "minibatch_noise_refusal")]
    for what, used, attribute in wanted:
        refusal = getattr(spec, attribute, None)
        if used and refusal:
            raise ConfigError(f"{what} is not available for workload {config.workload}: {refusal}")


def with_defaults(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the keys added to distdl since it was written, at their defaults, so
    that a newer distdl resumes an older run whose settings it would give the same values."""
    try:
        return config_from_dict(yaml.safe_load(yaml.safe_dump(config_dict))).to_dict()
    except ConfigError:
        return config_dict


def without_session_keys(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys a resume may change."""
    copy = yaml.safe_load(yaml.safe_dump(config_dict))
    for dotted in SESSION_KEYS:
        section, key = dotted.split(".")
        copy.get(section, {}).pop(key, None)
    return copy


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, dotted + ".")
        elif a != b:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs
