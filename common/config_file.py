"""Typed configs from YAML plus `--set section.key=value` overrides, for both commands.

A config is a tree of dataclasses; each component declares its own section
next to its code, and a command's config composes them. Every key is checked
against the dataclasses: an unknown key, or a value of the wrong type, is a
one-line ValueError that names the key (and the closest known key). Values are
converted to the declared type, so `--set optim.lr=3e-4` (a string to YAML 1.1)
still becomes a float, and a YAML list becomes a declared tuple.

Field metadata: `key` spells the field's YAML key where it differs from the
attribute name; `internal` fields are set by the program, never by a config;
`flag` names the command-line option that overrides the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def config_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def config_fields(cls) -> dict[str, dataclasses.Field]:
    """The keys a config file may set for `cls`, by YAML key."""
    return {config_key(f): f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping; ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    return raw


def load(cls, path: str | Path | None, overrides: typing.Iterable[str] = (), raw: dict | None = None):
    """YAML file (or None for the defaults), then `raw` keys already checked (set_key), then
    `key=value` overrides -> a `cls` built and checked by its dataclasses."""
    where = str(path) if path is not None else "config"
    merged = read_yaml(path) if path is not None else {}
    for key, value in _flatten(raw or {}):
        set_key(cls, merged, key, value, what=key)
    for item in overrides:
        apply_override(cls, merged, item)
    return build(cls, merged, "", where)


def _flatten(raw: dict, prefix: str = ""):
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flatten(value, full)
        else:
            yield full, value


def apply_override(cls, raw: dict, item: str) -> None:
    """`a.b.c=value` into the raw dict; the value is parsed as YAML (`[1, 2]`, `null`, `true`)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if text.strip() == "":
        value = ""
    set_key(cls, raw, key.strip(), value, what=f"--set {key.strip()}")


def set_key(cls, raw: dict, key: str, value: Any, what: str) -> None:
    """Put `value` at dotted `key` of the raw dict; the key is checked against the dataclasses here
    so the error names where it came from (`what`: "--set k", a flag)."""
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"{what}: empty key part in {key!r}")
    node = raw
    for i, part in enumerate(parts):
        known = config_fields(cls)
        if part not in known:
            raise ValueError(f"{what}: unknown config key {'.'.join(parts[:i + 1])!r}"
                             f"{_suggest(part, known, '.'.join(parts[:i]))}")
        hint = typing.get_type_hints(cls)[known[part].name]
        if i == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(hint):
            raise ValueError(f"{what}: {'.'.join(parts[:i + 1])!r} is not a section")
        sub = node.setdefault(part, {})
        if not isinstance(sub, dict):
            raise ValueError(f"{what}: {'.'.join(parts[:i + 1])!r} is not a mapping in the config file")
        node, cls = sub, hint


def _suggest(name: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    if not close:
        return f" (known: {', '.join(sorted(known))})"
    full = f"{prefix}.{close[0]}" if prefix else close[0]
    return f"; did you mean {full!r}?"


def build(cls, raw: Any, prefix: str, where: str):
    """A `cls` from its raw mapping; a section's own check (its __post_init__) failing is a
    ValueError naming the section (see `section_error`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ValueError(f"{where}: unknown config key {name!r}{_suggest(str(key), fields, prefix)}")
        attr = fields[key].name
        hint = hints[attr]
        if dataclasses.is_dataclass(hint):
            kwargs[attr] = build(hint, value, name, where)
        else:
            kwargs[attr] = convert(value, hint, name, where)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if not prefix:
            raise ValueError(f"{where}: {exc}") from None
        raise ValueError(f"{where}: {section_error(prefix, exc, cls)}") from None


def section_error(prefix: str, exc: ValueError, cls) -> str:
    """A section's error with its place: "field: text" becomes "prefix.key: text", anything else
    "prefix: text"."""
    message = " ".join(str(exc).split())
    head, sep, rest = message.partition(":")
    by_name = {f.name: config_key(f) for f in dataclasses.fields(cls)}
    if sep and head in by_name:
        return f"{prefix}.{by_name[head]}:{rest}"
    return f"{prefix}: {message}"


def convert(value: Any, hint: Any, name: str, where: str):
    """Value from YAML -> the declared type, or a ValueError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def bad(expected: str) -> ValueError:
        return ValueError(f"{where}: config key {name!r} expects {expected}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        assert len(options) == 1, f"config field {name} has an unsupported union type"
        return convert(value, options[0], name, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                raise bad("an integer") from None
            if as_float.is_integer():
                return int(as_float)
        raise bad("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return [convert(v, args[0], f"{name}[{i}]", where) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{name}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"a list of {len(args)}")
        return tuple(convert(v, a, f"{name}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    raise AssertionError(f"config field {name} has unsupported type {hint}")


def to_raw(config) -> dict:
    """The config as plain YAML/JSON data under its config keys (tuples as lists); `build` reads it
    back to an equal config."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return to_raw(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {key: plain(getattr(config, f.name)) for key, f in config_fields(type(config)).items()}


def flags(cls, prefix: str = "") -> dict[str, str]:
    """Command-line option -> dotted config key, from the fields' `flag` metadata."""
    out = {}
    for key, f in config_fields(cls).items():
        full = f"{prefix}.{key}" if prefix else key
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(flags(hint, full))
        elif "flag" in f.metadata:
            out[f.metadata["flag"]] = full
    return out


def leaf_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of `cls` that holds a value (not a section)."""
    out = []
    for key, f in config_fields(cls).items():
        full = f"{prefix}.{key}" if prefix else key
        hint = typing.get_type_hints(cls)[f.name]
        out.extend(leaf_keys(hint, full) if dataclasses.is_dataclass(hint) else [full])
    return out


def view_of(cls, name: str, keys: dict[str, str], build_name: str):
    """A dataclass with `cls`'s fields under other YAML-friendly keys (`keys`: field -> key) and
    lists for tuples, whose `build_name` method makes the `cls` (which checks the values).
    Declares each field once: the view copies `cls`'s types and defaults."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = _as_lists(default)
        spec = (dataclasses.field(default_factory=lambda d=default: _copy(d)) if isinstance(default, list)
                else dataclasses.field(default=default))
        specs.append((keys.get(f.name, f.name), _list_type(hints[f.name]), spec))

    def make(self):
        return cls(**{f.name: getattr(self, keys.get(f.name, f.name)) for f in dataclasses.fields(cls)})

    return dataclasses.make_dataclass(name, specs, namespace={build_name: make, "__module__": cls.__module__})


def _list_type(hint):
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return list[_list_type(args[0])]
    return hint


def _as_lists(value):
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _copy(value):
    return [_copy(v) for v in value] if isinstance(value, list) else value
