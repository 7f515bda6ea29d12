"""Resolving a configuration: the defaults, then a YAML file, then ``key=value`` overrides, validated once.

In a file, a section merges into the defaults key by key, while a mapping-valued option
(``annotate.options``, ``disentangle.pairs``, ...) is replaced whole. On the command line ``a.b.c=v``
sets ONE key (inside a mapping too: the mapping's other keys stay) and ``a.b={...}`` replaces the
whole mapping. An override's value is the text as written where the schema says string (a prompt,
a path, a name; quoted whole, it is unquoted), and YAML elsewhere. ``${other.key}`` interpolates
another key (OmegaConf: finetune_toy's model and data keys follow train_toy that way).

Every problem is one :class:`ConfigError` line: the key and its value, where it was set
(``file:line``, the command line) and pydantic's message (or the field's own ``accepts`` phrase).
"""
from __future__ import annotations

import copy
import difflib
import os
import typing
from pathlib import Path
from typing import Any, List, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ValidationError

from pipeline.config.schema import HSpaceConfig, defaults, section_class, where
from pipeline.errors import ConfigError

_NULLS = ("", "null", "Null", "NULL", "~")


def load_config(path: str | os.PathLike | None = None, overrides: List[str] | None = None) -> HSpaceConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    tree, sources = defaults(), {}
    if path is not None:
        data, lines = _read_yaml(Path(path))
        _merge_file(tree, data, HSpaceConfig, sources, {k: f"{path}:{line}" for k, line in lines.items()})
    _override(tree, sources, list(overrides or []))
    return _validate(tree, sources)


def with_overrides(cfg: HSpaceConfig, overrides: List[str]) -> HSpaceConfig:
    """``cfg`` with more ``key=value`` overrides, validated again (a tool for tests and scripts)."""
    tree, sources = copy.deepcopy(cfg._raw or defaults()), dict(cfg._sources)
    _override(tree, sources, overrides)
    return _validate(tree, sources)


# ------------------------------------------------------------------------------------------ a file
def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """(the file's mapping, dotted key -> the line it is set on)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loader = yaml.SafeLoader(path.read_bytes().decode("utf-8"))
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as "
                          f"UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{at}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data, _key_lines(node)


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    out = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[f"{prefix}{key.value}"] = key.start_mark.line + 1
            out.update(_key_lines(value, f"{prefix}{key.value}."))
    return out


def _merge_file(tree: dict, data: dict, schema, sources: dict, lines: dict, prefix: str = "") -> None:
    """Merge a file's mapping into ``tree``: sections key by key, every other value replaced whole."""
    for key, value in data.items():
        key = str(key)
        field = schema.model_fields.get(key) if schema is not None else None
        sub = section_class(field.annotation) if field is not None else None
        if sub is not None and isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge_file(tree[key], value, sub, sources, lines, f"{prefix}{key}.")
        else:
            tree[key] = value
            sources[prefix + key] = lines.get(prefix + key, "the file")


# ------------------------------------------------------------------------------------------ overrides
def parse_overrides(overrides: List[str]) -> list[tuple[str, Any]]:
    """['a.b=1', 'model.prompt=a # b'] -> [('a.b', 1), ('model.prompt', 'a # b')]: each value as the
    schema reads it (text where it says string, else YAML)."""
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. generate.num_samples=1000)")
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        out.append((key, _value(key, text, item)))
    return out


def _value(key: str, text: str, item: str):
    textual, optional = _textual(_annotation(key))
    if textual:
        return None if optional and text.strip() in _NULLS else _unquoted(text)
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r}: {_one_line(e)}") from None
    return _unquoted(text) if isinstance(parsed, str) else parsed  # text YAML would cut at ' #' stays whole


def _annotation(key: str):
    """The schema's type annotation at a dotted key; None inside a mapping-valued option or for unknown keys."""
    schema, annotation = HSpaceConfig, None
    for part in key.split("."):
        field = schema.model_fields.get(part) if schema is not None else None
        if field is None:
            return None
        annotation = field.annotation
        schema = section_class(annotation)
    return annotation


def _textual(annotation) -> tuple[bool, bool]:
    """(the annotation is a string, or a choice of strings; it also takes null)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,)
    rest = [a for a in args if a is not type(None)]
    text = bool(rest) and all(a is str or (typing.get_origin(a) is Literal and all(isinstance(c, str)
                                                                                  for c in typing.get_args(a)))
                              for a in rest)
    return text, len(rest) < len(args)


def _unquoted(text: str) -> str:
    """The text as written; a value quoted whole ('...' or "...") without its quotes."""
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        try:
            value = yaml.safe_load(s)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, str) else text
    return text


def _override(tree: dict, sources: dict, overrides: List[str]) -> None:
    """Apply ``key=value`` overrides: each sets ONE dotted key; the mappings on the way keep their
    other keys (a mapping as the value replaces the mapping at that key)."""
    for key, value in parse_overrides(overrides):
        *parents, last = key.split(".")
        node = tree
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}=...: {'.'.join(parents[:i + 1])} is not a mapping")
        node[last] = value
        for path in [p for p in sources if p == key or p.startswith(key + ".")]:
            del sources[path]
        sources[key] = "the command line"


# ------------------------------------------------------------------------------------------ validation
def _validate(tree: dict, sources: dict) -> HSpaceConfig:
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key} in {where(sources, key)}: {_one_line(e).split(' full_key:')[0]}") from None
    try:
        cfg = HSpaceConfig.model_validate(resolved)
    except ValidationError as e:
        raise _message(e.errors(), resolved, sources) from None
    cfg._sources, cfg._raw = sources, tree
    return cfg


def _message(errors: list[dict], tree: dict, sources: dict) -> ConfigError:
    """One line from pydantic's first error: key=value in <where>: pydantic's message."""
    err = errors[0]
    ctx = err.get("ctx") or {}
    if err["type"] == "cross_field":
        key = ctx["key"]
        return ConfigError(f"{key}={ctx['value']!r} in {where(sources, key, *ctx['others'])}: must be {ctx['must']}")
    path, field, schema = _field_at(err["loc"])
    key = ".".join(path)
    if err["type"] == "extra_forbidden":
        unknown = f"{key}.{err['loc'][len(path)]}" if path else str(err["loc"][0])
        valid = sorted(schema.model_fields)
        close = difflib.get_close_matches(unknown.rsplit(".", 1)[-1], valid, n=1)
        return ConfigError(f"unknown config key '{unknown}' in {where(sources, unknown)}"
                           + (f" (did you mean {close[0]}?)" if close else "")
                           + f"; valid keys {f'under {key!r}' if path else 'at the top level'}: {', '.join(valid)}")
    accepts = ((getattr(field, "json_schema_extra", None) or {}).get("accepts"))
    if accepts:
        value = tree
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        return ConfigError(f"{key}={value!r} in {where(sources, key)}: must be {accepts}")
    inner = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"][len(path):])
    return ConfigError(f"{key}{inner}={err['input']!r} in {where(sources, key)}: {err['msg']}")


def _field_at(loc: tuple):
    """(the schema keys at the start of ``loc``, the innermost one's FieldInfo, the section holding it)."""
    schema, path, field = HSpaceConfig, [], None
    for part in loc:
        if schema is None or part not in schema.model_fields:
            break
        path.append(part)
        field = schema.model_fields[part]
        if section_class(field.annotation) is None:
            break
        schema = section_class(field.annotation)
    return path, field, schema


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _yaml_problem(e: yaml.YAMLError) -> str:
    return ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or _one_line(e)
