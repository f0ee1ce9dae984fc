"""Shape checks of parsed JSON against the dataclasses it will become.

A manifest or sidecar that is valid JSON of the wrong shape (a string where an
int belongs, a list where an object does, a missing key) must fail where it is
read, with the key named, not later as a TypeError deep inside the trainer.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

_EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             dict: "an object"}


def check_json(value: Any, hint: Any, key: str) -> None:
    """ValueError `key 'a.b': expects ..., got ...` unless `value` fits `hint`: a
    dataclass (an object with exactly its fields; a field whose metadata says
    "optional" may be left out), list[X] or tuple[X, ...] (a
    list), bool, int, float, str or dict."""
    if dataclasses.is_dataclass(hint):
        _check_object(value, hint, key)
    elif typing.get_origin(hint) in (list, tuple):
        if not isinstance(value, list):
            raise _mismatch(key, "a list", value)
        item_hint = typing.get_args(hint)[0]
        for i, item in enumerate(value):
            check_json(item, item_hint, f"{key}[{i}]")
    elif not _is_a(value, hint):
        raise _mismatch(key, _EXPECTED[hint], value)


def check_known_keys(value: Any, hints: dict[str, Any], key: str) -> None:
    """An object whose listed keys, where present, fit their hints; other keys are free."""
    if not isinstance(value, dict):
        raise _mismatch(key, "an object", value)
    for name, hint in hints.items():
        if name in value:
            check_json(value[name], hint, f"{key}.{name}")


def _check_object(value: Any, cls: type, key: str) -> None:
    if not isinstance(value, dict):
        raise _mismatch(key, "an object", value)
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    optional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("optional")}
    prefix = f"{key}." if key else ""
    missing = [name for name in fields if name not in value and name not in optional]
    if missing:
        raise ValueError(f"missing key '{prefix}{missing[0]}'")
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"unknown key '{prefix}{unknown[0]}'")
    for name in fields:
        if name in value:
            check_json(value[name], hints[name], f"{prefix}{name}")


def _is_a(value: Any, hint: Any) -> bool:
    assert hint in _EXPECTED, f"no JSON check for {hint}"
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true is not a number
        return False
    if hint is float:
        # json.loads reads NaN and Infinity; no number in a cache is meant to be either.
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, hint)


def _mismatch(key: str, expected: str, value: Any) -> ValueError:
    shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__} {repr(value)[:37]}..."
    return ValueError(f"{f'key {key!r}' if key else 'the top level'} expects {expected}, got {shown}")
