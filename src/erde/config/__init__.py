"""Typed configuration: dataclasses loaded from YAML and overridable from the CLI.

One ``ExperimentConfig`` describes a whole experiment (data, teacher, student,
their training, distillation and evaluation); every command reads the parts it
needs, and the whole thing is saved next to every checkpoint and report.

- :mod:`erde.config.schema`: the sections as dataclasses, with their defaults;
- :mod:`erde.config.students`: the students of a side-by-side run (``StudentSpec``);
- :mod:`erde.config.loading`: YAML, presets and ``--set`` overrides, coerced to the field types;
- :mod:`erde.config.validation`: range checks, one clear message per problem.
"""

from erde.config.loading import (
    MAX_YAML_BYTES,
    MAX_YAML_NODES,
    config_from_dict,
    explicit_split_seed,
    load_config,
    load_yaml,
    parse_override,
    preset_path,
    save_config,
)
from erde.config.schema import (
    DEFAULT_STUDENTS,
    SPEC_SETTINGS,
    STUDENT_METHODS,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    StudentSpec,
    TrainConfig,
)
from erde.config.students import parse_student, parse_students, spec_distill, student_specs
from erde.config.validation import (
    MAX_LR,
    MAX_SEED,
    MAX_STUDENTS,
    check_students,
    registered_methods,
    registered_rules,
    validate,
)

__all__ = [
    "DEFAULT_STUDENTS",
    "MAX_LR",
    "MAX_SEED",
    "MAX_STUDENTS",
    "MAX_YAML_BYTES",
    "MAX_YAML_NODES",
    "SPEC_SETTINGS",
    "STUDENT_METHODS",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "StudentSpec",
    "TrainConfig",
    "check_students",
    "config_from_dict",
    "explicit_split_seed",
    "load_config",
    "load_yaml",
    "parse_override",
    "parse_student",
    "parse_students",
    "preset_path",
    "registered_methods",
    "registered_rules",
    "save_config",
    "spec_distill",
    "student_specs",
    "validate",
]
