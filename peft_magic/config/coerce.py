"""Checking and gently converting one value to a field's type ('2e-4' -> 2e-4, 3.0 -> 3): shared by the config
parser and by the methods that read their own parameters. Imports nothing of the package but its errors."""

from __future__ import annotations

import math

from ..errors import ConfigError

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def coerce(value, typ, key):
    """Check and gently convert a YAML value to a field's type ('2e-4' -> 2e-4, 3.0 -> 3)."""
    if isinstance(typ, str):
        optional = typ.startswith("Optional[")
        name = typ[9:-1] if optional else typ
        if name == "Any":
            return value
        if value is None:
            if optional:
                return None
            raise ConfigError(f"needs a value ({name}), got null.", key=key)
        typ = _TYPES.get(name, object)
    if typ is object:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"expected true or false, got {value!r}.", key=key)
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"expected a whole number, got {value!r}.", key=key)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"expected a whole number, got {value!r}.", key=key)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}.", key=key)
        number = None
        if isinstance(value, (int, float)):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(f"expected a finite number, got {value!r}.", key=key)
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"expected text, got {type(value).__name__} ({value!r}).", key=key)
    if typ is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"expected a list, got {value!r}.", key=key)
    if typ is dict and not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {value!r}.", key=key)
    return value


def coerce_typed(value, annotation, key):
    """Check a value against a dataclass annotation of another library (peft's config fields): the plain types
    and ``Optional`` of them are checked and gently converted like our own fields; lists of str/int are checked;
    anything richer is left for that library to check."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    optional = text.startswith("Optional[")
    inner = text[9:-1] if optional else text
    if value is None:
        return value
    if inner in ("int", "float", "bool", "str", "dict"):
        return coerce(value, inner, key)
    if inner in ("list[str]", "Union[list[str], str]", "list[int]", "Union[list[int], int]"):
        item = str if "str" in inner else int
        if isinstance(value, (str, int)) and not isinstance(value, bool) and "Union" in inner:
            return coerce(value, item.__name__, key)
        if isinstance(value, (list, tuple)):
            return [coerce(v, item.__name__, key) for v in value]
        raise ConfigError(f"expected a list of {'names' if item is str else 'whole numbers'}, got {value!r}.",
                          key=key)  # fmt: skip
    return value
