"""Typed configuration: every field, its default and its meaning, in one place.

One style for every setting: pydantic models, strict (``batch_size: true`` is an error, not
1; no float accepts inf or nan), documented where they are defined, and read by the CLI for
its defaults and help. :class:`TrainConfig` is a run (YAML whose keys mirror the classes;
``lora:``, ``data:``, ``eval:`` and ``retrieval:`` are sections), :class:`GenerationSettings`
how answers are generated (shared by evaluation, ``generate``, ``chat`` and ``serve``),
:class:`ServeConfig` the HTTP server. ``--set key=value`` overrides any key, dotted for sections
(``--set lora.r=8``); values are parsed as YAML scalars. Unknown keys and wrong types are
a :class:`~medassist.errors.ConfigError` that names the key.

- :mod:`~medassist.config.train`: :class:`TrainConfig`, one run, and its sections
  (:class:`DataConfig`, :class:`LoraConfig`, :class:`EvalConfig`, :class:`RetrievalConfig`);
- :mod:`~medassist.config.generation`: :class:`GenerationSettings` and :class:`ServeConfig`;
- :mod:`~medassist.config.loading`: YAML files and ``--set`` overrides -> a validated
  :class:`TrainConfig` (:func:`load_config`), and the CLI's help and checks of its options.
"""

from medassist.config.generation import GenerationSettings, Section, ServeConfig
from medassist.config.loading import check_settings, field_help, load_config, parse_overrides, yaml_load
from medassist.config.train import DataConfig, EvalConfig, LoraConfig, ModelType, RetrievalConfig, TrainConfig

__all__ = [
    "DataConfig", "EvalConfig", "GenerationSettings", "LoraConfig", "ModelType", "RetrievalConfig", "Section",
    "ServeConfig", "TrainConfig", "check_settings", "field_help", "load_config", "parse_overrides", "yaml_load",
]
