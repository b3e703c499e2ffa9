"""The DeepSpeed JSON derived from the engine and trainer sections, and the merge of a user's raw JSON."""

from __future__ import annotations

import copy
import json

import pytest

from distdl.config import load_config
from distdl.engine.deepspeed_config import build_deepspeed_config, merge_deepspeed_config
from distdl.errors import ConfigError
from tests.helpers.shared import TINY


def ds_config(*overrides):
    # 4 workers x micro 2 x accumulation 3 = 24.
    base = ["scaling.num_workers=4", "trainer.micro_batch_size=2", "trainer.global_batch_size=24"]
    config = load_config(TINY, [*base, *overrides])
    return build_deepspeed_config(config.engine, config.trainer, config.scaling.num_workers, config.scaling.use_gpu)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_derived_keys(stage, precision):
    gpu = "true" if precision == "fp16" else "false"
    ds = ds_config(f"engine.zero_stage={stage}", f"engine.precision={precision}", f"scaling.use_gpu={gpu}",
                   "engine.gradient_clipping=0.5")
    assert ds["train_batch_size"] == 24 == 2 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    # Overlapping communication pays on GPUs; on CPU workers it competes with compute (measured).
    overlap = {"overlap_comm": gpu == "true", "reduce_bucket_size": 25_000_000, "allgather_bucket_size": 25_000_000}
    assert ds["zero_optimization"] == ({"stage": 0} if stage == 0 else {"stage": stage, **overlap})
    assert "zero_force_ds_cpu_optimizer" not in ds
    if precision == "fp32":
        assert "bf16" not in ds and "fp16" not in ds
    elif precision == "bf16":
        assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    else:
        assert ds["fp16"]["enabled"] is True and "bf16" not in ds
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_offload_optimizer_block(stage, use_gpu):
    ds = ds_config(f"engine.zero_stage={stage}", "engine.offload_optimizer=true", f"scaling.use_gpu={str(use_gpu).lower()}")
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": use_gpu}
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_batch_from_accumulation_alone():
    ds = ds_config("trainer.global_batch_size=null", "trainer.gradient_accumulation_steps=5")
    assert ds["train_batch_size"] == 2 * 5 * 4 and ds["gradient_accumulation_steps"] == 5


# ----------------------------------------------------------------------------- merging


DERIVED = {"train_batch_size": 24, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}


def test_merge_adds_user_only_keys_at_any_depth():
    user = {
        "communication_data_type": "fp32",
        "zero_optimization": {"contiguous_gradients": True, "offload_param": {"device": "cpu"}},
    }
    before = copy.deepcopy(DERIVED)
    merged = merge_deepspeed_config(DERIVED, user)
    assert merged == {
        "train_batch_size": 24,
        "gradient_clipping": 1.0,
        "communication_data_type": "fp32",
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "offload_param": {"device": "cpu"}},
    }
    assert DERIVED == before  # the inputs are not modified
    merged["zero_optimization"]["offload_param"]["device"] = "nvme"
    assert user["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_merge_accepts_equal_values():
    user = {"train_batch_size": 24, "gradient_clipping": 1, "zero_optimization": {"stage": 2}}
    assert merge_deepspeed_config(DERIVED, user) == DERIVED


@pytest.mark.parametrize(
    "user, dotted",
    [
        ({"train_batch_size": 32}, "train_batch_size"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
        ({"zero_optimization": 2}, "zero_optimization"),
    ],
)
def test_merge_conflict_names_the_dotted_key(user, dotted):
    with pytest.raises(ConfigError) as info:
        merge_deepspeed_config(DERIVED, user)
    message = str(info.value)
    assert f"{dotted}=" in message and "engine.deepspeed_config" in message


# ----------------------------------------------------------------------------- engine.deepspeed_config file


def write(tmp_path, text):
    file = tmp_path / "ds.json"
    file.write_text(text)
    return file


def test_raw_json_file_is_merged(tmp_path):
    file = write(tmp_path, json.dumps({"zero_optimization": {"contiguous_gradients": False}, "train_batch_size": 24,
                                       "communication_data_type": "fp32"}))
    ds = ds_config("engine.zero_stage=1", f"engine.deepspeed_config={file}")
    assert ds["zero_optimization"] == {"stage": 1, "contiguous_gradients": False, "overlap_comm": False,
                                       "reduce_bucket_size": 25_000_000, "allgather_bucket_size": 25_000_000}
    assert ds["communication_data_type"] == "fp32"
    assert ds["train_batch_size"] == 24


def test_raw_json_bucket_sizes_conflicting_with_distdls_name_the_distdl_key(tmp_path):
    file = write(tmp_path, json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    with pytest.raises(ConfigError, match="reduce_bucket_size=1000 .* set it through engine.bucket_elements"):
        ds_config("engine.zero_stage=2", f"engine.deepspeed_config={file}")
    ds = ds_config("engine.zero_stage=2", "engine.bucket_elements=1000", f"engine.deepspeed_config={file}")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000


def test_raw_json_file_conflict(tmp_path):
    file = write(tmp_path, json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=3"):
        ds_config("engine.zero_stage=1", f"engine.deepspeed_config={file}")


@pytest.mark.parametrize("text, why", [('{"train_batch_size": 24,', "not valid JSON"), ("[1, 2]", "JSON object")])
def test_raw_json_file_malformed(tmp_path, text, why):
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        ds_config(f"engine.deepspeed_config={file}")
    assert str(file) in str(info.value) and why in str(info.value)


def test_raw_json_file_missing(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="does not exist") as info:
        ds_config(f"engine.deepspeed_config={missing}")
    assert str(missing) in str(info.value)


def test_raw_json_cannot_add_its_own_precision(tmp_path):
    file = write(tmp_path, json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"fp16.*engine\.precision"):
        ds_config("engine.precision=bf16", f"engine.deepspeed_config={file}")


@pytest.mark.parametrize("block, content", [
    ("optimizer", {"type": "Lamb", "params": {"lr": 0.001}}), ("scheduler", {"type": "WarmupLR", "params": {}})])
def test_raw_json_cannot_name_an_optimizer_or_schedule(tmp_path, block, content):
    # distdl hands DeepSpeed its own optimizer and schedule, which would silently win over these.
    file = write(tmp_path, json.dumps({block: content}))
    with pytest.raises(ConfigError, match=rf"'{block}' block .*set {block}\.name"):
        ds_config(f"engine.deepspeed_config={file}")


def test_raw_json_may_repeat_distdl_settings(tmp_path):
    file = write(tmp_path, json.dumps({"bf16": {"enabled": True}, "fp16": {"enabled": False},
                                       "zero_optimization": {"stage": 2}}))
    ds = ds_config("engine.precision=bf16", "engine.zero_stage=2", f"engine.deepspeed_config={file}")
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("enabled, precision", [(True, "tf32"), (False, "ieee")])
def test_tf32_is_set_for_matmuls_and_convolutions(enabled, precision):
    import torch

    from distdl.precision import set_tf32

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("PyTorch before 2.9 has only allow_tf32")
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_tf32(enabled)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (
            precision, precision)
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
