"""One schema mechanism for every YAML file a user writes: the training config (``config``), the SLURM
profiles (``launch.slurm``) and the study files (``launch.study``).

A schema is a dataclass whose field annotations are the types; :func:`merge` lays a mapping (a YAML
document, command-line overrides) over an instance, key by key, checking each value against its field
(:func:`coerce`) and refusing a key the dataclass has not. Every failure is a :class:`SchemaError` of one
line that names the key (``optim.momentom``, ``stages.lc.epochs``) and what fits there; the loaders put
the file in front (:func:`merge_file`). Value checks a type cannot say (ranges, consistency between keys)
stay with each schema.

Types understood: ``bool``, ``int``, ``float`` (also from YAML 1.1's dotless ``1e-4`` string), ``str``,
``Literal[...]`` (a choice), ``X | None``, ``X | Y`` (the first that fits), ``list[X]`` (a lone scalar is
a list of one), ``dict[str, X]`` (merged key by key), ``Any`` and nested dataclasses (merged section by
section). A field whose YAML key is a Python keyword names it in its metadata: ``field(metadata={"key":
"from"})``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class SchemaError(ValueError):
    """A bad input value; the message is one line naming the key and the fix."""


def yaml_key(field: dataclasses.Field) -> str:
    return field.metadata.get("key", field.name)


def keys_of(schema) -> list[str]:
    """The YAML keys of a schema (a dataclass or one of its instances), in declaration order."""
    return [yaml_key(f) for f in dataclasses.fields(schema)]


def _choices(values: typing.Sequence[Any]) -> str:
    return ", ".join(map(str, values))


_SCALARS = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _expected(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + _choices(typing.get_args(annotation))
    return _SCALARS.get(annotation) or {list: "a list", dict: "a mapping"}.get(origin, str(annotation))


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and gently convert) `value` against a field annotation; SchemaError names the key."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(annotation) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        for option in options:
            try:
                return coerce(value, option, key)
            except SchemaError:
                pass
        raise SchemaError(f"{key}: expected {' or '.join(map(_expected, options))}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(annotation) and not isinstance(value, bool):
            return value
        raise SchemaError(f"{key}: '{value}' is not one of {_choices(typing.get_args(annotation))}")
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if annotation is str and (value is None or isinstance(value, str)):
        return value or ""
    if annotation in _SCALARS:
        raise SchemaError(f"{key}: expected {_SCALARS[annotation]}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, list):
            return [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        if value is not None:  # one item alone is a list of one: `num_groups=8` means [8], `after: a` [a]
            try:
                return [coerce(value, item_type, key)]
            except SchemaError:
                pass
        raise SchemaError(f"{key}: expected a list, got {value!r}")
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SchemaError(f"{key}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(annotation)
        return {str(k): coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in a schema


def merge(instance, values: Any, prefix: str = "") -> None:
    """Set fields of a dataclass instance from a (nested) mapping, validating each key and value."""
    fields = {yaml_key(f): f for f in dataclasses.fields(instance)}
    if not isinstance(values, dict):
        where = f"{prefix.rstrip('.')}: " if prefix else ""
        raise SchemaError(f"{where}expected a mapping with keys {_choices(fields)}, got {values!r}")
    hints = typing.get_type_hints(type(instance))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise SchemaError(unknown_key(name, str(key), fields))
        attribute = fields[key].name
        current = getattr(instance, attribute)
        if dataclasses.is_dataclass(current):
            merge(current, value, name + ".")
        elif typing.get_origin(hints[attribute]) is dict and isinstance(value, dict):
            # mappings (method.options, tracking.tags, a profile's env) merge key by key
            setattr(instance, attribute, {**current, **coerce(value, hints[attribute], name)})
        else:
            setattr(instance, attribute, coerce(value, hints[attribute], name))


def unknown_key(name: str, key: str, valid: typing.Iterable[str]) -> str:
    """The one line for a key a schema has not: the closest valid one, then all of them."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean {name[: len(name) - len(key)]}{close[0]}? " if close else ""
    return f"unknown key '{name}' ({hint}valid keys here: {_choices(valid)})"


def given_keys(schema: type, values: Any, prefix: str = "") -> dict[str, Any]:
    """Only the keys `values` sets, checked against `schema` and converted: for partial overrides of a schema
    that are applied later (a study's ``slurm:`` keys over the launcher's settings)."""
    instance = schema()
    merge(instance, values, prefix)
    names = {yaml_key(f): f.name for f in dataclasses.fields(schema)}
    return {key: getattr(instance, names[key]) for key in values}


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in `path` (None when empty). `what` names where the path came from (``--config``)."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{what}: no such file {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SchemaError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None


def merge_file(instance, path: str | Path, what: str):
    """`instance` <- the YAML mapping in `path`; an error names the file first. Returns `instance`."""
    data = read_yaml(path, what)
    try:
        merge(instance, {} if data is None else data)
    except SchemaError as err:
        raise SchemaError(f"{path}: {err}") from None
    return instance


# ----------------------------------------------------------------------------- shared value types


def paper_figures(value: Any, key: str) -> dict[str, tuple[float, float | None]]:
    """A study stage's ``paper`` key, ``{rule: top1 | [top1, top5]}`` (percentages) -> ``{rule: (top1, top5 |
    None)}``. Here because the study file (``launch.study``) checks it and the report (``stages.report``)
    shows it, and neither room may import the other."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 100

    if not isinstance(value, dict) or not value:
        raise SchemaError(f"{key}: expected a mapping rule -> top-1 or [top-1, top-5] in %, "
                          f"e.g. {{main: [76.4, 93.3]}}, got {value!r}")
    figures = {}
    for rule, item in value.items():
        pair = item if isinstance(item, list) else [item]
        if not 1 <= len(pair) <= 2 or not all(number(x) for x in pair):
            raise SchemaError(f"{key}.{rule}: expected top-1 or [top-1, top-5], percentages in [0, 100], "
                              f"got {item!r}")
        figures[str(rule)] = (float(pair[0]), float(pair[1]) if len(pair) == 2 else None)
    return figures
