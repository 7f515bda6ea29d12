"""conf.yaml: the defaults, each key with its description as a comment (``hspace config --defaults``)."""
from __future__ import annotations

import textwrap

import yaml
from pydantic import BaseModel

from pipeline.config.schema import HSpaceConfig, defaults, section_class

HEADER = """\
# hspace configuration: the defaults. Generated from the schema in pipeline/config/ by
#   hspace config --defaults > conf.yaml
# (edit the schema, not this file; a test keeps the two equal). `hspace config` prints the resolved configuration.
#
# Every key can be overridden on the command line as a dotted path:
#   hspace generate run_dir=runs/big generate.num_samples=10000 trainer.devices=8
# A value is taken as written where the key is a string (a prompt, a path, a name: model.prompt='a photo # of a
# cat' keeps its '#'), and as YAML where the key holds numbers, true/false, null, [lists] or {mappings}.
# A dotted override sets ONE key: evaluate.scorer_options.pretrained=/path/clip.pt changes `pretrained` and
# keeps the mapping's other keys. To replace a whole mapping give a YAML flow mapping as the value:
#   disentangle.pairs='{glasses: [hair]}'
# In a --config file, a section merges into these defaults key by key; a mapping-valued option
# (annotate.options, evaluate.scorer_options, disentangle.pairs, own_attribute, correlations) is replaced whole.
# Unknown keys, wrong types and values out of range are errors, reported before any work.

"""
_COMMENT_AT = 32


def _flow(value) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10**9, sort_keys=False).strip()[1:-1]


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def _comment(line: str, text: str | None, indent: str) -> list[str]:
    """``line`` with ``text`` as a comment at column 32, or above it when the line is too long."""
    if not text:
        return [line]
    if len(line) >= _COMMENT_AT - 1:
        return [f"{indent}# {t}" for t in _wrap(text, 116 - len(indent))] + [line]
    first, *rest = _wrap(text, 116 - _COMMENT_AT)
    return [line.ljust(_COMMENT_AT - 1) + " # " + first] + [" " * _COMMENT_AT + "# " + r for r in rest]


def _render(schema: type[BaseModel], values: dict, indent: str = "") -> list[str]:
    lines = []
    for key, field in schema.model_fields.items():
        sub = section_class(field.annotation)
        if sub is not None:
            if not indent:
                lines.append("")
            lines += _comment(f"{indent}{key}:", " ".join((sub.__doc__ or "").split()), indent)
            lines += _render(sub, values[key], indent + "  ")
        else:
            interpolated = isinstance(values[key], str) and values[key].startswith("${")
            lines += _comment(f"{indent}{key}: {_flow(values[key])}", None if interpolated else field.description, indent)
    return lines


def defaults_yaml() -> str:
    """conf.yaml: the defaults with each field's description as its comment."""
    return HEADER + "\n".join(_render(HSpaceConfig, defaults())) + "\n"
