"""Reading model hyperparameters out of diffusers/transformers config.json dicts."""

from __future__ import annotations

from typing import Any

# What JSON value types each default's type accepts (ints are fine where floats are expected,
# and per-level settings may be one int for all levels).
_ACCEPTS = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (tuple, int)}


def config_value(raw: dict[str, Any], key: str, default: Any, source: str) -> Any:
    """raw[key] or the default, lists turned into tuples so configs stay hashable.

    A value of the wrong JSON type is reported with the file (`source`) and the key.
    """
    value = raw.get(key, default)
    if isinstance(value, list):
        value = tuple(value)
    accepts = _ACCEPTS.get(type(default))
    wrong_bool = isinstance(value, bool) and bool not in (accepts or ())
    if value is not None and accepts and (not isinstance(value, accepts) or wrong_bool):
        raise ValueError(f"{source}: key {key!r} has value {value!r}; expected {type(default).__name__}")
    return value


def reject_unsupported(raw: dict[str, Any], allowed: dict[str, tuple], source: str) -> None:
    """Raises if a config sets an option to a value sdjax does not implement (no silent fallback).

    `allowed` maps each key to the values we implement; a missing key counts as the first one.
    """
    for key, values in allowed.items():
        value = raw.get(key, values[0])
        if isinstance(value, list):
            value = tuple(value)
        if value not in values:
            raise ValueError(f"{source}: {key}={value!r} is not supported by sdjax "
                             f"(supported: {', '.join(map(repr, values))})")
