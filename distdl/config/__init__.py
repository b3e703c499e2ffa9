"""The run configuration: section definitions with their limits (sections.py), typing values
against them (fields.py), and loading a YAML file with dotted overrides (loading.py).

Everything a workload, study or plugin needs is importable from `distdl.config` itself.
"""

from distdl.config.fields import AtLeastOne, Finite, NonNegative, Requirement, StepInterval, build_section, coerce
from distdl.config.loading import (
    PATH_KEYS,
    config_differences,
    config_from_dict,
    load_config,
    parse_override,
    read_yaml,
    resolve_paths,
    set_dotted,
    split_section,
    with_defaults,
    without_session_keys,
)
from distdl.config.sections import (
    FIXED_SECTIONS,
    SESSION_KEYS,
    Config,
    EngineSection,
    NoiseSection,
    OptimizerSection,
    RaySection,
    RunSection,
    ScalingSection,
    SchedulerSection,
    SharpnessAwareSection,
    TrackingSection,
    TrainerSection,
    noise_scale_possible,
    resolve_epochs,
    validate,
)

__all__ = [
    "AtLeastOne", "Finite", "NonNegative", "Requirement", "StepInterval", "build_section", "coerce",
    "PATH_KEYS", "config_differences", "config_from_dict", "load_config", "parse_override", "read_yaml",
    "resolve_paths", "set_dotted", "split_section", "with_defaults", "without_session_keys",
    "FIXED_SECTIONS", "SESSION_KEYS", "Config", "EngineSection", "NoiseSection", "OptimizerSection", "RaySection", "RunSection",
    "ScalingSection", "SchedulerSection", "SharpnessAwareSection", "TrackingSection", "TrainerSection", "noise_scale_possible",
    "resolve_epochs", "validate",
]
