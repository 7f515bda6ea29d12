"""Configuration: one schema (pydantic), conf.yaml generated from it, dotted ``key=value`` overrides.

:mod:`~pipeline.config.sections`, :mod:`~pipeline.config.sae` and :mod:`~pipeline.config.toy_training` hold
one model per section of conf.yaml (each field's type, range, default and description together); :mod:`~pipeline.config.schema`
the whole configuration, :class:`HSpaceConfig`, with the rules across sections;
:mod:`~pipeline.config.resolve` :func:`load_config` (the defaults, a file, overrides; one-line errors);
:mod:`~pipeline.config.conf_yaml` conf.yaml itself (``hspace config --defaults``).
"""
from pipeline.config.conf_yaml import defaults_yaml
from pipeline.config.resolve import load_config, parse_overrides, with_overrides
from pipeline.config.schema import HSpaceConfig, defaults, to_dict, to_yaml
from pipeline.config.toy_training import ToyTrainConfig

__all__ = ["HSpaceConfig", "ToyTrainConfig", "defaults", "defaults_yaml", "load_config", "parse_overrides", "to_dict",
           "to_yaml", "with_overrides"]
