"""Config loading: YAML file + dotted overrides, typing, and errors that name the culprit."""

from __future__ import annotations

import pytest
import yaml

from distdl.config import config_from_dict, load_config, resolve_epochs
from distdl.errors import ConfigError
from tests.helpers.shared import CONFIGS, TINY


def load(*overrides):
    return load_config(TINY, list(overrides))


def error(*overrides, path=TINY) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ----------------------------------------------------------------------------- precedence


def test_file_overrides_defaults_and_command_line_overrides_file():
    config = load("trainer.max_steps=7", "engine.zero_stage=1")
    assert config.trainer.max_steps == 7  # command line (file: 300, default: 100)
    assert config.engine.zero_stage == 1  # command line (file: 2, default: 0)
    assert config.trainer.eval_every == 100  # file (default: 0)
    assert config.run.name == "bert-tiny"  # file (default: distdl-run)
    assert config.sections["tokenizer"].vocab_size == 8000  # file
    assert config.optimizer.eps == 1e-8  # default (not in file)
    assert config.sections["data"].mlm_probability == 0.15  # default of a workload section
    assert config.workload == "bert_pretrain"


def test_later_override_of_the_same_key_wins():
    assert load("trainer.max_steps=7", "trainer.max_steps=9").trainer.max_steps == 9


def test_no_file_gives_dataclass_defaults():
    config = load_config(None, ["workload=bert_pretrain", "data.path=/tmp/corpus.txt", "trainer.epochs=2"])
    assert config.trainer.max_steps is None and config.trainer.eval_every == 0
    assert config.engine.zero_stage == 0
    assert config.sections["model"].preset == "tiny"


# ----------------------------------------------------------------------------- override typing


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("trainer.max_steps=42", lambda c: c.trainer.max_steps, 42),
        ("optimizer.lr=0.002", lambda c: c.optimizer.lr, 0.002),
        ("optimizer.lr=2.5e-4", lambda c: c.optimizer.lr, 2.5e-4),
        ("optimizer.weight_decay=0", lambda c: c.optimizer.weight_decay, 0.0),
        ("tracking.progress_bar=false", lambda c: c.tracking.progress_bar, False),
        ("scaling.use_gpu=true", lambda c: c.scaling.use_gpu, True),
        ("ray.num_cpus=null", lambda c: c.ray.num_cpus, None),
        ("ray.num_cpus=3", lambda c: c.ray.num_cpus, 3),
        ("tokenizer.name_or_path=null", lambda c: c.sections["tokenizer"].name_or_path, None),
        ("optimizer.betas=[0.8,0.95]", lambda c: c.optimizer.betas, [0.8, 0.95]),
        ("run.name=123", lambda c: c.run.name, "123"),
    ],
)
def test_override_values_are_typed(override, getter, expected):
    value = getter(load(override))
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text, expected", [("1e-3", 1e-3), ("3e-4", 3e-4), ("1E-5", 1e-5), ("2e2", 200.0)])
def test_exponent_floats_without_a_dot(text, expected):
    # PyYAML (YAML 1.1) reads "1e-3" as a string; it must still become a float.
    value = load(f"optimizer.lr={text}").optimizer.lr
    assert value == expected and type(value) is float


def test_exponent_float_in_the_yaml_file(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(TINY.read_text().replace("lr: 1.0e-3", "lr: 3e-4"))
    assert load_config(file).optimizer.lr == 3e-4


# ----------------------------------------------------------------------------- round trip


def test_round_trip_through_dict_and_yaml():
    config = load("trainer.gradient_accumulation_steps=2", "trainer.global_batch_size=null",
                  "engine.offload_optimizer=true", "optimizer.lr=0.0005")
    assert config.trainer.global_batch_size == 64  # resolved: 16 x 2 x 2
    again = config_from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    # The workers rebuild the config from the YAML the driver saves.
    assert config_from_dict(yaml.safe_load(config.to_yaml())).to_dict() == config.to_dict()


# ----------------------------------------------------------------------------- batch sizes


def test_accumulation_is_derived_from_the_global_batch():
    config = load("trainer.global_batch_size=96")  # micro 16 x 2 workers
    assert config.trainer.gradient_accumulation_steps == 3


def test_global_batch_is_derived_from_the_accumulation():
    config = load("trainer.global_batch_size=null", "trainer.gradient_accumulation_steps=4")
    assert config.trainer.global_batch_size == 16 * 4 * 2


def test_agreeing_global_batch_and_accumulation_are_accepted():
    config = load("trainer.global_batch_size=64", "trainer.gradient_accumulation_steps=2")
    assert config.trainer.gradient_accumulation_steps == 2


# ----------------------------------------------------------------------------- errors


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in error(path=missing)


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workload: bert_pretrain\ntrainer: {max_steps: 3\n")
    message = error(path=bad)
    assert str(bad) in message and "YAML" in message


@pytest.mark.parametrize("tag", ["!!python/object/apply:subprocess.call", "!!python/object/new:subprocess.Popen"])
def test_yaml_that_would_run_code_is_refused_and_runs_nothing(tmp_path, tag):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(f"workload: bert_pretrain\nrun:\n  name: {tag} [['touch', '{marker}']]\n")
    message = error(path=hostile)
    assert str(hostile) in message and "YAML" in message
    assert not marker.exists()


def test_yaml_holding_a_list(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- workload\n- trainer\n")
    message = error(path=bad)
    assert str(bad) in message and "mapping" in message and "list" in message


def test_unknown_section():
    message = error("trainr.max_steps=3")
    assert "'trainr'" in message
    for valid in ("workload", "run", "engine", "trainer", "tracking", "model", "data", "tokenizer"):
        assert valid in message


def test_unknown_key_lists_valid_keys_at_its_level():
    message = error("trainer.max_step=3")
    assert "trainer.max_step" in message
    for valid in ("max_steps", "micro_batch_size", "global_batch_size", "gradient_accumulation_steps"):
        assert valid in message
    assert "zero_stage" not in message  # keys of other sections are not listed


def test_unknown_key_in_a_workload_section():
    message = error("data.pth=/tmp/x")
    assert "data.pth" in message and "max_seq_length" in message and "mlm_probability" in message


@pytest.mark.parametrize(
    "override, culprit, shown",
    [
        ("trainer.max_steps=abc", "trainer.max_steps", "abc"),
        ("trainer.max_steps=2.5", "trainer.max_steps", "2.5"),
        ("trainer.max_steps=true", "trainer.max_steps", "True"),  # a bool is not an int
        ("scaling.use_gpu=yesplease", "scaling.use_gpu", "yesplease"),
        ("optimizer.lr=fast", "optimizer.lr", "fast"),
        ("optimizer.betas=0.9", "optimizer.betas", "0.9"),
        ("optimizer.betas=[0.9,abc]", "optimizer.betas[1]", "abc"),
        ("trainer=5", "trainer", "5"),
    ],
)
def test_wrong_type(override, culprit, shown):
    message = error(override)
    assert culprit in message and shown in message


def test_zero_stage_out_of_range():
    message = error("engine.zero_stage=5")
    assert "engine.zero_stage=5" in message and "0, 1, 2, 3" in message


def test_unknown_precision_lists_allowed_values():
    message = error("engine.precision=fp8")
    assert "engine.precision" in message and "fp32, bf16, fp16" in message


@pytest.mark.parametrize("override, expected", [
    ("trainer.global_batch_size=0", "trainer.global_batch_size=0 must be at least 1"),
    ("trainer.gradient_accumulation_steps=0", "trainer.gradient_accumulation_steps=0 must be at least 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be at least 1"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be at least 1"),
    ("trainer.log_every=0", "trainer.log_every=0 must be at least 1"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0 must be at least 1"),
    ("scaling.num_workers=0", "scaling.num_workers=0 must be at least 1"),
    ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker=0 must be at least 1"),
    ("engine.bucket_elements=0", "engine.bucket_elements=0 must be at least 1"),
    ("optimizer.reference_batch_size=0", "optimizer.reference_batch_size=0 must be at least 1"),
    ("ray.num_cpus=0", "ray.num_cpus=0 must be at least 1 (or null: all)"),
    ("run.seed=-1", "run.seed=-1 must be 0 or more"),
    ("run.max_failures=-1", "run.max_failures=-1 must be 0 or more"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be 0 or more"),
    ("scheduler.warmup_steps=-1", "scheduler.warmup_steps=-1 must be 0 or more"),
    ("optimizer.eps=0", "optimizer.eps=0.0 must be positive"),
    ("scheduler.warmup_ratio=1.5", "scheduler.warmup_ratio=1.5 must lie in [0, 1]"),
    ("trainer.epochs=0", "trainer.epochs=0.0 must be a finite positive number"),
    ("trainer.epochs=.nan", "trainer.epochs=nan must be a finite positive number"),
    ("optimizer.lr=0", "optimizer.lr=0.0 must be a finite positive number"),
    ("optimizer.lr=.inf", "optimizer.lr=inf must be a finite positive number"),
    ("engine.gradient_clipping=-1", "engine.gradient_clipping=-1.0 must be finite and >= 0 (0: off)"),
    ("tracking.wandb_init_timeout=0", "tracking.wandb_init_timeout=0.0 must be a positive number of seconds"),
    ("trainer.stop_at_loss=.inf", "trainer.stop_at_loss=inf must be a finite number"),
    ("trainer.eval_every=-1", "trainer.eval_every=-1 must be 0 (off), a number of steps, or 'epoch'"),
    ("trainer.checkpoint_every=weekly", "trainer.checkpoint_every='weekly' must be 0 (off), a number of steps, or 'epoch'"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas[1]=1.0 must lie in [0, 1)"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] must hold 2 values"),
    ("scaling.placement_strategy=pack", "scaling.placement_strategy='pack' is not allowed; allowed: PACK, SPREAD"),
    ("scheduler.name=exponential", "scheduler.name='exponential' is not allowed; allowed: constant, constant_with_warmup"),
    ("scheduler.power=0", "scheduler.power=0.0 must be a finite positive number"),
    ("scheduler.milestones=[0.5,1.2]", "scheduler.milestones[1]=1.2 must lie in (0, 1)"),
    ("scheduler.gamma=1", "scheduler.gamma=1.0 must lie in (0, 1)"),
    ("optimizer.name=adagrad", "optimizer.name='adagrad' is not allowed; allowed: adamw, adam, sgd, lamb, lars"),
    ("optimizer.trust_coefficient=0", "optimizer.trust_coefficient=0.0 must be a finite positive number"),
    ("optimizer.momentum=1.5", "optimizer.momentum=1.5 must lie in [0, 1)"),
    ("tracking.wandb_mode=cloud", "tracking.wandb_mode='cloud' is not allowed; allowed: auto, online, offline"),
    ("engine.zero_stage=true", "engine.zero_stage=True is not allowed; allowed: 0, 1, 2, 3"),
    ("optimizer.noise.temperature=-1e-4", "optimizer.noise.temperature=-0.0001 must be a finite number >= 0 (0: no noise)"),
    ("optimizer.noise.kind=gaussian", "optimizer.noise.kind='gaussian' is not allowed; allowed: isotropic"),
    ("optimizer.sam.rho=-1", "optimizer.sam.rho=-1.0 must be a finite positive number"),
])
def test_every_limit_names_the_key_the_value_and_what_is_allowed(override, expected):
    assert expected in error(override)


def test_fp16_needs_gpus():
    message = error("engine.precision=fp16", "scaling.use_gpu=false")
    assert "engine.precision=fp16" in message and "scaling.use_gpu" in message
    assert load("engine.precision=fp16", "scaling.use_gpu=true").engine.precision == "fp16"


def test_global_batch_not_divisible_by_workers_times_micro_batch():
    message = error("trainer.global_batch_size=40")  # 16 x 2 does not divide 40
    assert "trainer.global_batch_size=40" in message
    assert "micro_batch_size" in message and "num_workers" in message and "16 x 2" in message


def test_global_batch_disagreeing_with_accumulation():
    message = error("trainer.global_batch_size=64", "trainer.gradient_accumulation_steps=3")
    assert "trainer.global_batch_size=64" in message and "gradient_accumulation_steps" in message


def test_unknown_workload_lists_known_ones():
    message = error("workload=gpt_pretrain")
    assert "gpt_pretrain" in message and "bert_pretrain" in message


def test_unknown_model_preset_lists_presets():
    message = error("model.preset=huge")
    assert "model.preset='huge'" in message
    for preset in ("tiny", "mini", "small", "medium", "base", "large"):
        assert preset in message


def test_offload_needs_zero():
    message = error("engine.offload_optimizer=true", "engine.zero_stage=0")
    assert "engine.offload_optimizer" in message and "zero_stage" in message
    assert load("engine.offload_optimizer=true", "engine.zero_stage=1").engine.offload_optimizer


def test_sam_is_refused_where_it_cannot_run_and_names_why():
    assert load("optimizer.sam.rho=0.1").optimizer.sam.rho == 0.1
    assert load("optimizer.sam={rho: 1.0, adaptive: true}").optimizer.sam.adaptive
    assert "optimizer.sam.rho=0.0 must be a finite positive number" in error("optimizer.sam.rho=0")
    assert "unknown key optimizer.sam.radius; valid keys in optimizer.sam: rho, adaptive" in error(
        "optimizer.sam.radius=0.1")
    message = error("optimizer.sam.rho=0.1", "engine.zero_stage=3")
    assert "optimizer.sam needs engine.zero_stage 0, 1 or 2" in message and "partition" in message
    message = error("optimizer.sam.rho=0.1", "engine.precision=fp16", "scaling.use_gpu=true")
    assert "optimizer.sam needs engine.precision fp32 or bf16" in message and "loss scale" in message
    message = error("optimizer.sam.rho=0.1", path=CONFIGS / "gan/dcgan_mnist.yaml")
    assert "optimizer.sam is not available for workload gan: its generator and discriminator" in message


def test_noise_settings_that_cannot_work_are_refused_naming_the_key():
    laptop = CONFIGS / "resnet/mnist_laptop.yaml"  # global batch 128, micro-batch 64

    def refused(*overrides: str) -> str:
        return error(*overrides, path=laptop)

    minibatch = "optimizer.noise={kind: minibatch, batch_size: 4}"
    assert load_config(laptop, [minibatch]).optimizer.noise.batch_size == 4
    assert "optimizer.noise.batch_size=128 must be set below trainer.global_batch_size=128" in refused(
        "optimizer.noise={kind: minibatch, batch_size: 128}")
    assert "must be set below" in refused("optimizer.noise.kind=minibatch")
    assert "trainer.micro_batch_size=1 must be at least 2" in refused(
        minibatch, "trainer.micro_batch_size=1", "trainer.global_batch_size=16")
    assert "optimizer.noise.temperature applies to kind isotropic" in refused(
        "optimizer.noise={kind: minibatch, batch_size: 4, temperature: 0.1}")
    assert "optimizer.noise.batch_size applies to kind minibatch" in refused("optimizer.noise.batch_size=4")
    assert "choose one" in refused(minibatch, "optimizer.sam.rho=0.1")
    assert "optimizer.noise kind minibatch is not available for workload bert_pretrain: its loss does not split" in \
        error(minibatch)


@pytest.mark.parametrize("override", ["trainer.max_steps", "=5", "trainer..max_steps=5", "trainer.=5"])
def test_bad_override_syntax(override):
    message = error(override)
    assert repr(override) in message and "dotted.key=value" in message


def test_override_into_a_value_is_an_error():
    message = error("trainer.max_steps.inner=3")
    assert "trainer.max_steps.inner" in message and "max_steps" in message


def test_stop_at_step_beyond_max_steps():
    message = error("trainer.max_steps=10", "trainer.stop_at_step=11")
    assert "trainer.stop_at_step=11" in message and "trainer.max_steps=10" in message


@pytest.mark.parametrize("overrides", [
    ("trainer.profile_steps=[5,3]",),
    ("trainer.max_steps=10", "trainer.profile_steps=[8,12]"),
])
def test_profile_steps_out_of_order_or_beyond_the_budget(overrides):
    message = error(*overrides)
    assert "trainer.profile_steps=" in message and "1 <= first <= last <= trainer.max_steps" in message


def test_profile_steps_beyond_the_epochs_budget_are_named_once_it_is_known():
    config = load_config(CONFIGS / "resnet/mnist_laptop.yaml", ["trainer.max_steps=null", "trainer.epochs=1",
                                                                "trainer.profile_steps=[1,1000]"])
    with pytest.raises(ConfigError, match=r"trainer.profile_steps=\[1, 1000\] .* trainer.max_steps=5"):
        resolve_epochs(config, train_examples=5 * config.trainer.global_batch_size)


def test_compile_is_refused_where_torch_compile_cannot_train():
    message = error("trainer.compile=true", "objective.name=wgan_gp", "model.discriminator_norm=layer",
                    path=CONFIGS / "gan/dcgan_mnist.yaml")
    assert "trainer.compile=true" in message and "double backward" in message and "trainer.compile=false" in message


@pytest.mark.parametrize("config, overrides", [("resnet/mnist_laptop.yaml", ["model.name=cifar_resnet20"]),
                                               ("gan/dcgan_mnist.yaml", [])])
def test_compile_with_checkpointed_batch_norm_blocks_is_refused(config, overrides):
    message = error("trainer.compile=true", "model.activation_checkpointing=true", *overrides, path=CONFIGS / config)
    assert "model.activation_checkpointing=true and trainer.compile=true" in message and "set one of them" in message


def test_relative_local_paths_become_absolute_hub_names_stay(tmp_path, monkeypatch):
    """Ray workers run in another directory, so the driver resolves local paths once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some words\n")
    config = load_config(TINY, ["run.storage_path=runs", "data.path=corpus.txt", "data.cache_dir=cache",
                                "tokenizer.name_or_path=bert-base-uncased"])
    assert config.run.storage_path == str(tmp_path / "runs")
    assert config.sections["data"].path == str(tmp_path / "corpus.txt")
    assert config.sections["data"].cache_dir == str(tmp_path / "cache")
    assert config.sections["tokenizer"].name_or_path == "bert-base-uncased"


@pytest.mark.parametrize("override, culprit", [
    ("trainer.global_batch_size=0", "trainer.global_batch_size"),
    ("run.seed=-1", "run.seed"),
    ("run.max_failures=-2", "run.max_failures"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
    ("optimizer.eps=0", "optimizer.eps"),
    ("scheduler.warmup_ratio=1.5", "scheduler.warmup_ratio"),
    ("optimizer.lr=nan", "optimizer.lr"),
    ("ray.num_cpus=0", "ray.num_cpus"),
])
def test_impossible_values_are_refused(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        load_config(TINY, [override])


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    if path.parent.name == "studies":  # a training config plus a study: section
        from distdl.config import config_from_dict
        from distdl.registry import STUDIES
        from distdl.studies.base import read_study_file

        study_file = read_study_file(path, [])
        # Named after their study, with a suffix for a variant (scaling_lars.yaml is a scaling study).
        STUDIES.get(path.stem.split("_")[0]).parse_section(study_file.study)
        config = config_from_dict(study_file.training)
    elif path.name == "search.yaml":  # a sweep: section alone, for the configs beside it
        from distdl.sweeps.runner import read_sweep

        for task_config in sorted(path.parent.glob("*.yaml")):
            if task_config != path:
                read_sweep(task_config, ["trainer.micro_batch_size=8"], path)
        return
    else:
        config = load_config(path)
    assert config.run.name and (config.trainer.max_steps or config.trainer.epochs) >= 1


def test_a_step_budget_is_required():
    with pytest.raises(ConfigError, match="set trainer.max_steps .* or trainer.epochs"):
        load_config(None, ["workload=bert_pretrain", "data.path=/tmp/corpus.txt"])


@pytest.mark.parametrize("override, shown", [
    ("trainer.eval_every=epochs", "'epochs'"), ("trainer.checkpoint_every=-1", "-1"), ("trainer.epochs=0", "0"),
    ("trainer.eval_every=2.5", "2.5"),
])
def test_bad_epoch_settings_are_named(override, shown):
    message = error(override)
    assert override.split("=")[0] in message and shown in message




@pytest.mark.parametrize("config, override, expected", [
    ("bert/pretrain_tiny.yaml", "model.attn_implementation=flash", "model.attn_implementation='flash' is not allowed; allowed: sdpa, eager"),
    ("bert/pretrain_tiny.yaml", "data.mlm_probability=1", "data.mlm_probability=1.0 must lie in (0, 1)"),
    ("bert/pretrain_tiny.yaml", "data.eval_fraction=0", "data.eval_fraction=0.0 must lie in (0, 1)"),
    ("bert/pretrain_tiny.yaml", "data.max_seq_length=4", "data.max_seq_length=4 must be at least 8"),
    ("glue/sst2.yaml", "model.attn_implementation=flash", "model.attn_implementation='flash' is not allowed; allowed: sdpa, eager"),
    ("glue/sst2.yaml", "model.classifier_dropout=1", "model.classifier_dropout=1.0 must lie in [0, 1)"),
    ("glue/sst2.yaml", "data.max_seq_length=4", "data.max_seq_length=4 must be at least 8"),
    ("gan/dcgan_mnist.yaml", "model.discriminator_norm=group", "model.discriminator_norm='group' is not allowed; allowed: batch, layer, none"),
    ("gan/dcgan_mnist.yaml", "objective.n_critic=0", "objective.n_critic=0 must be at least 1"),
    ("gan/dcgan_mnist.yaml", "eval.grid_images=0", "eval.grid_images=0 must be at least 1"),
    ("gan/dcgan_mnist.yaml", "eval.frechet_images=1", "eval.frechet_images=1 must be at least 2"),
    ("resnet/mnist_laptop.yaml", "loss.label_smoothing=1", "loss.label_smoothing=1.0 must lie in [0, 1)"),
    ("resnet/mnist_laptop.yaml", "data.image_size=4", "data.image_size=4 must be at least 8"),
    ("resnet/mnist_laptop.yaml", "data.loader_workers=-1", "data.loader_workers=-1 must be 0 or more"),
    ("resnet/mnist_laptop.yaml", "data.label_noise=1.5", "data.label_noise=1.5 must lie in [0, 1]"),
    ("resnet/mnist_laptop.yaml", "model.width=0", "model.width=0 must be at least 1"),
    ("resnet/mnist_laptop.yaml", "model.hidden_sizes=[512,0]", "model.hidden_sizes[1]=0 must be at least 1"),
])
def test_workload_sections_limits_name_the_key_the_value_and_what_is_allowed(config, override, expected):
    assert expected in error(override, path=CONFIGS / config)


@pytest.mark.parametrize("hint, value, expected", [
    ("Annotated[int, Ge(3)]", 2, "k=2 must be at least 3"),
    ("Annotated[int, Gt(3)]", 3, "k=3 must be greater than 3"),
    ("Annotated[float, Le(1)]", 1.5, "k=1.5 must be at most 1"),
    ("Annotated[float, Lt(1)]", 1.0, "k=1.0 must be below 1"),
    ("Annotated[float, Gt(0)]", 0.0, "k=0.0 must be positive"),
    ("Annotated[float, Gt(0), Finite]", float("inf"), "k=inf must be a finite positive number"),
    ("Annotated[float, Ge(0), Finite]", float("nan"), "k=nan must be finite and >= 0"),
    ("Annotated[float, Finite]", float("-inf"), "k=-inf must be a finite number"),
    ("Annotated[float, Interval(gt=0, le=1)]", 0.0, "k=0.0 must lie in (0, 1]"),
    ("Annotated[list[int], Len(2, 3)]", [1], "k=[1] must hold 2 to 3 values"),
    ("Annotated[list[int], MinLen(2)]", [1], "k=[1] must hold at least 2 values"),
    ("Annotated[list[int], MinLen(1)]", [], "k=[] must not be empty"),
    ("Annotated[int, Ge(1), Requirement('must be a whole number of nodes')]", 0, "k=0 must be a whole number of nodes"),
    ("Annotated[int, Ge(1), Requirement('must be a whole number of nodes')]", "two", "k='two' must be a whole number of nodes"),
    ("Literal[0, 1]", True, "k=True is not allowed; allowed: 0, 1"),
])
def test_field_limits_are_worded_from_their_constraints(hint, value, expected):
    from typing import Annotated, Literal  # noqa: F401 - names the hints use

    from annotated_types import Ge, Gt, Interval, Le, Len, Lt, MinLen  # noqa: F401

    from distdl.config import Finite, Requirement, coerce  # noqa: F401

    with pytest.raises(ConfigError) as info:
        coerce(value, eval(hint), "k")
    assert str(info.value) == expected


def test_values_within_their_limits_pass_unchanged_or_widened():
    from typing import Annotated

    from annotated_types import Ge, Interval

    from distdl.config import coerce

    assert coerce(3, Annotated[float, Interval(ge=0, le=3)], "k") == 3.0
    assert coerce([1, 2], list[Annotated[int, Ge(1)]], "k") == [1, 2]
    assert coerce(None, Annotated[int, Ge(1)] | None, "k") is None
