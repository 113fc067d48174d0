"""Plain data and typed records built from it: the checks every received body passes.

Plain data is what msgpack and JSON both carry without loss: maps with string keys, lists,
strings, booleans, nil, 64-bit signed integers and finite floats, nested at most
:data:`MAX_DEPTH` deep. :func:`from_dict` builds a dataclass from such data and checks
every field's type, nested records included, so that the wire's messages and a broker's
CONTROL replies (common/status.py) are decoded the same way: untrusted until checked.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that must be dropped (and counted): never trusted, never fatal.

    ``reason`` is a short fixed token (``bad_type``, ``undecodable``...) to count by; the
    message says what exactly was wrong."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason



MAX_DEPTH = 64
"""Deepest nesting of maps and lists in a body (a JSON schema in ``tools`` needs some);
deeper is refused before anything walks it recursively."""
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Integers on the wire are signed 64-bit, so arithmetic on them (an epoch + 1) still
encodes."""



def check_plain(value: Any) -> None:
    """Raise :class:`ProtocolError` unless ``value`` is plain data (module docstring).

    Iterative, so neither a deep value nor this check can exhaust the Python stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            if depth >= MAX_DEPTH:
                raise ProtocolError(f"nested deeper than {MAX_DEPTH}", "too_deep")
            if kind is dict:
                for key in item:
                    if type(key) is not str:
                        raise ProtocolError(f"map key of type {type(key).__name__}",
                                            "bad_key")
                item = item.values()
            stack.extend((x, depth + 1) for x in item)
        elif kind is int:
            if not INT_MIN <= item <= INT_MAX:
                raise ProtocolError("integer out of the signed 64-bit range", "bad_value")
        elif kind is float:
            if not math.isfinite(item):
                raise ProtocolError(f"float {item} is not finite", "bad_value")
        elif kind is str:
            if not item.isascii():  # decoded frames always pass; JSON "\ud800" does not
                try:
                    item.encode()
                except UnicodeEncodeError:
                    raise ProtocolError("string with a lone surrogate (not UTF-8)",
                                        "bad_value") from None
        elif kind not in _SCALARS:
            raise ProtocolError(f"value of type {kind.__name__} is not plain data", "bad_type")


_SCALARS = (bool, type(None))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from untrusted ``data``, checking every field's type."""
    checks = _checks(cls)
    for name, value in data.items():
        check = checks.get(name)
        if check is None:
            raise ProtocolError(f"{cls.__name__}: unknown field {str(name)[:40]!r}",
                                "unknown_field")
        if not check(value):
            raise ProtocolError(f"{cls.__name__}.{name}: bad type {type(value).__name__}",
                                "bad_type")
    builders = _builders(cls)
    if builders:  # nested records: checked and built in turn
        data = {name: builders[name](v) if name in builders else v for name, v in data.items()}
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        raise ProtocolError(f"{cls.__name__}: {exc}", "missing_field") from None


Check = Callable[[Any], bool]
_CHECKS: dict[type, dict[str, Check]] = {}
_BUILDERS: dict[type, dict[str, Callable[[Any], Any]]] = {}


def _checks(cls: type) -> dict[str, Check]:
    """Per-field type checks of a dataclass, built once from its annotations: validation
    runs on every frame, so it must not walk ``typing`` objects each time."""
    if cls not in _CHECKS:
        hints = typing.get_type_hints(cls)
        _CHECKS[cls] = {f.name: _checker(hints[f.name]) for f in dataclasses.fields(cls)}
    return _CHECKS[cls]


def _builders(cls: type) -> dict[str, Callable[[Any], Any]]:
    """Fields of ``cls`` that hold a record or a list of records, each with what builds
    it from checked plain data."""
    if cls not in _BUILDERS:
        built: dict[str, Callable[[Any], Any]] = {}
        hints = typing.get_type_hints(cls)
        for name in (f.name for f in dataclasses.fields(cls)):
            hint, args = hints[name], typing.get_args(hints[name])
            if dataclasses.is_dataclass(hint):
                built[name] = lambda v, record=hint: from_dict(record, v)
            elif typing.get_origin(hint) is list and dataclasses.is_dataclass(args[0]):
                built[name] = lambda v, record=args[0]: [from_dict(record, x) for x in v]
        _BUILDERS[cls] = built
    return _BUILDERS[cls]


_EXACT = {int: (int,), float: (int, float), str: (str,), bool: (bool,), bytes: (bytes,),
          type(None): (type(None),)}


def _checker(hint: Any) -> Check:
    """A check that a decoded msgpack value matches ``hint``. msgpack yields exact builtin
    types, so ``type(v) in ...`` is right and keeps True out of an int field."""
    if hint is Any:
        return lambda v: True
    if hint in _EXACT:
        exact = _EXACT[hint]
        return lambda v: type(v) in exact
    if dataclasses.is_dataclass(hint):
        return lambda v: type(v) is dict  # its fields are checked as it is built
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_checker(a) for a in args]
        return lambda v: any(check(v) for check in options)
    if origin is list:
        if args[0] in _EXACT:
            exact = _EXACT[args[0]]
            return lambda v: type(v) is list and all(type(x) in exact for x in v)
        item = _checker(args[0])
        return lambda v: type(v) is list and all(item(x) for x in v)
    if origin is dict:
        key, item = _checker(args[0]), _checker(args[1])
        return lambda v: type(v) is dict and all(key(k) and item(x) for k, x in v.items())
    raise TypeError(f"no wire check for {hint!r}")
