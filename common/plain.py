"""Plain data and typed records built from it: the checks every received body passes.

Plain data is what msgpack and JSON both carry without loss: maps with string keys, lists,
strings, booleans, nil, 64-bit signed integers and finite floats, nested at most
:data:`MAX_DEPTH` deep. :func:`from_dict` builds a dataclass from untrusted data, checking
in one pass that it is plain and that every field has its type, nested records included,
so that the wire's messages and a broker's CONTROL replies (common/status.py) are decoded
the same way: untrusted until checked. (A field typed ``Record | None`` has no check: no
message has one.)
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



def check_plain(value: Any, depth: int = 0) -> None:
    """Raise :class:`ProtocolError` unless ``value`` is plain data (module docstring);
    ``depth`` is how deep ``value`` itself sits in the body.

    Iterative, so neither a deep value nor this check can exhaust the Python stack."""
    stack: list[tuple[Any, int]] = [(value, depth)]
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
            _plain_int(item)
        elif kind is float:
            _plain_float(item)
        elif kind is str:
            _plain_str(item)
        elif kind not in _SCALARS:
            raise ProtocolError(f"value of type {kind.__name__} is not plain data", "bad_type")


_SCALARS = (bool, type(None))


def _plain_int(value: int) -> bool:
    """True, or :class:`ProtocolError` (these three read as the second term of an ``and``
    after the type test)."""
    if not INT_MIN <= value <= INT_MAX:
        raise ProtocolError("integer out of the signed 64-bit range", "bad_value")
    return True


def _plain_float(value: float) -> bool:
    if not math.isfinite(value):
        raise ProtocolError(f"float {value} is not finite", "bad_value")
    return True


def _plain_str(value: str) -> bool:
    if not value.isascii():  # decoded frames always pass; JSON "\ud800" does not
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ProtocolError("string with a lone surrogate (not UTF-8)",
                                "bad_value") from None
    return True


def from_dict(cls: type[T], data: dict[str, Any], depth: int = 1) -> T:
    """Build dataclass ``cls`` from untrusted ``data``, checking every field's type and
    that its value is plain data (``data`` may come straight from msgpack: one pass
    checks both). ``depth`` is how deep the fields sit in the body (the body's own
    fields: 1), for the :data:`MAX_DEPTH` bound."""
    checks = _checks(cls)
    for name, value in data.items():
        check = checks.get(name)
        if check is None:
            if type(name) is not str:
                raise ProtocolError(f"map key of type {type(name).__name__}", "bad_key")
            raise ProtocolError(f"{cls.__name__}: unknown field {str(name)[:40]!r}",
                                "unknown_field")
        if not check(value, depth):
            raise ProtocolError(f"{cls.__name__}.{name}: bad type {type(value).__name__}",
                                "bad_type")
    builders = _builders(cls)
    if builders:  # nested records: checked and built in turn
        data = {name: builders[name](v, depth) if name in builders else v
                for name, v in data.items()}
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        raise ProtocolError(f"{cls.__name__}: {exc}", "missing_field") from None


Check = Callable[[Any, int], bool]
"""A field's check: (value, its depth) -> whether the type fits; raises
:class:`ProtocolError` for a value of the right type that is not plain (out of range, not
finite, nested too deep)."""
_CHECKS: dict[type, dict[str, Check]] = {}
_BUILDERS: dict[type, dict[str, Callable[[Any, int], Any]]] = {}


def _checks(cls: type) -> dict[str, Check]:
    """Per-field checks of a dataclass, built once from its annotations: validation runs
    on every frame, so it must not walk ``typing`` objects each time."""
    if cls not in _CHECKS:
        hints = typing.get_type_hints(cls)
        _CHECKS[cls] = {f.name: _checker(hints[f.name]) for f in dataclasses.fields(cls)}
    return _CHECKS[cls]


def _builders(cls: type) -> dict[str, Callable[[Any, int], Any]]:
    """Fields of ``cls`` that hold a record or a list of records, each with what builds
    it from the field's value and depth."""
    if cls not in _BUILDERS:
        built: dict[str, Callable[[Any, int], Any]] = {}
        hints = typing.get_type_hints(cls)
        for name in (f.name for f in dataclasses.fields(cls)):
            hint, args = hints[name], typing.get_args(hints[name])
            if dataclasses.is_dataclass(hint):
                built[name] = lambda v, d, record=hint: from_dict(record, v, d + 1)
            elif typing.get_origin(hint) is list and dataclasses.is_dataclass(args[0]):
                built[name] = lambda v, d, record=args[0]: [from_dict(record, x, d + 2)
                                                            for x in v]
        _BUILDERS[cls] = built
    return _BUILDERS[cls]


_SCALAR_CHECKS: dict[Any, Check] = {
    int: lambda v, d: type(v) is int and _plain_int(v),
    float: lambda v, d: ((type(v) is float and _plain_float(v))
                         or (type(v) is int and _plain_int(v))),
    str: lambda v, d: type(v) is str and _plain_str(v),
    bool: lambda v, d: type(v) is bool,
    type(None): lambda v, d: v is None,
}
"""Checks of the scalar types a field may have: the type (msgpack yields exact builtin
types, so ``type(v) is ...`` keeps True out of an int field) and the value."""


def _checker(hint: Any) -> Check:
    """The check of a field typed ``hint`` (see :data:`Check`). Scalars, lists of scalars
    and records are checked as they are read; anything else (``Any``, maps, lists of
    maps) is walked by :func:`check_plain`, then its shape is checked."""
    if hint in _SCALAR_CHECKS:
        return _SCALAR_CHECKS[hint]
    if dataclasses.is_dataclass(hint):
        return lambda v, d: type(v) is dict  # its fields are checked as it is built
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and all(a in _SCALAR_CHECKS for a in args):
        options = [_SCALAR_CHECKS[a] for a in args]
        return lambda v, d: any(check(v, d) for check in options)
    if origin is list and dataclasses.is_dataclass(args[0]):
        return lambda v, d: type(v) is list and all(type(x) is dict for x in v)
    if origin is list and args[0] in _SCALAR_CHECKS:
        item = _SCALAR_CHECKS[args[0]]
        return lambda v, d: type(v) is list and all(item(x, d) for x in v)
    shape = _shape(hint)

    def walked(v: Any, d: int) -> bool:
        check_plain(v, d)
        return shape(v)

    return walked


def _shape(hint: Any) -> Callable[[Any], bool]:
    """Whether a value already known to be plain data has the type ``hint``."""
    if hint is Any:
        return lambda v: True
    if hint in _SCALAR_CHECKS:
        return lambda v: type(v) is hint or (hint is float and type(v) is int)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_shape(a) for a in args]
        return lambda v: any(check(v) for check in options)
    if origin is list:
        item = _shape(args[0])
        return lambda v: type(v) is list and all(item(x) for x in v)
    if origin is dict:
        item = _shape(args[1])  # keys: check_plain allows str only
        return lambda v: type(v) is dict and all(item(x) for x in v.values())
    raise TypeError(f"no wire check for {hint!r}")
