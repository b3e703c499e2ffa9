"""The DeepSpeed JSON: derived from distdl's engine and trainer sections, plus a user's raw JSON
(`engine.deepspeed_config`) checked against what distdl owns and merged without contradiction."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from distdl.config import EngineSection, TrainerSection
from distdl.errors import ConfigError
from distdl.rundir import read_json_object

# DeepSpeed prints a config dump every `steps_per_print` steps; distdl logs itself.
_QUIET_STEPS = 2**31 - 1


def build_deepspeed_config(
    engine: EngineSection, trainer: TrainerSection, num_workers: int, use_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed JSON derived from distdl's engine and trainer sections (plus any raw JSON)."""
    derived: dict[str, Any] = {
        "train_batch_size": trainer.micro_batch_size * trainer.gradient_accumulation_steps * num_workers,
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.gradient_accumulation_steps,
        "gradient_clipping": engine.gradient_clipping,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        # distdl hands DeepSpeed torch optimizers; these let ZeRO (and offload) take them
        # instead of JIT-compiling DeepSpeed's own fused optimizers.
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": engine.zero_stage},
    }
    if engine.zero_stage > 0:
        overlap = use_gpu if engine.overlap_comm is None else engine.overlap_comm
        derived["zero_optimization"].update(overlap_comm=overlap, reduce_bucket_size=engine.bucket_elements,
                                            allgather_bucket_size=engine.bucket_elements)
    if engine.offload_optimizer:
        derived["zero_force_ds_cpu_optimizer"] = False
        derived["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if engine.precision == "bf16":
        derived["bf16"] = {"enabled": True}
    elif engine.precision == "fp16":
        derived["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if engine.deepspeed_config:
        user = read_deepspeed_json(engine.deepspeed_config)
        check_owned_keys(user, derived)
        derived = merge_deepspeed_config(derived, user)
    return derived


def read_deepspeed_json(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"engine.deepspeed_config: {file} does not exist")
    return read_json_object(file, "engine.deepspeed_config")


# Keys only distdl's engine section sets: a raw JSON that sets them would silently contradict it.
_DISTDL_OWNED = {"fp16": "engine.precision", "bf16": "engine.precision", "zero_optimization.stage": "engine.zero_stage",
                 "zero_optimization.offload_optimizer": "engine.offload_optimizer"}


# Blocks distdl never hands DeepSpeed: it passes its own optimizer and schedule objects, which win
# over a JSON's without a word, so a JSON that names one is refused.
_DISTDL_BUILT = {"optimizer": "optimizer.name (adamw, adam, sgd, lamb, lars) and its optimizer.* keys",
                 "scheduler": "scheduler.name and its scheduler.* keys"}


def check_owned_keys(user: dict[str, Any], derived: dict[str, Any]) -> None:
    """A raw JSON may repeat what distdl derived, but not add a precision or ZeRO setting of its own,
    nor an optimizer or LR schedule."""
    for block, distdl_keys in _DISTDL_BUILT.items():
        if block in user:
            raise ConfigError(f"engine.deepspeed_config has a {block!r} block ({json.dumps(user[block])[:80]}), which "
                              f"DeepSpeed would ignore for distdl's own; set {distdl_keys} instead")
    for dotted, distdl_key in _DISTDL_OWNED.items():
        theirs, ours = _lookup(user, dotted), _lookup(derived, dotted)
        if theirs is not None and ours is None and theirs != {"enabled": False}:
            raise ConfigError(f"engine.deepspeed_config sets {dotted}={theirs!r}, which distdl's config leaves "
                              f"unset; set {distdl_key} instead")


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# Where the derived DeepSpeed keys come from in distdl's config, for conflict messages.
_DERIVED_FROM = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "gradient_clipping": "engine.gradient_clipping",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.overlap_comm": "engine.overlap_comm",
    "zero_optimization.reduce_bucket_size": "engine.bucket_elements",
    "zero_optimization.allgather_bucket_size": "engine.bucket_elements",
}


def merge_deepspeed_config(derived: dict[str, Any], user: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Add the user's keys to the derived config; a key set to a different value in both is an error."""
    merged = copy.deepcopy(derived)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in merged:
            merged[key] = copy.deepcopy(value)
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = merge_deepspeed_config(merged[key], value, dotted + ".")
        elif merged[key] != value:
            source = _DERIVED_FROM.get(dotted, "the distdl key")
            raise ConfigError(
                f"engine.deepspeed_config sets {dotted}={value!r} but distdl's config gives "
                f"{merged[key]!r}; set it through {source} instead, or make them agree"
            )
    return merged
