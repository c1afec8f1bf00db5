"""The one serializer of every message that crosses a process boundary (semipd.shared.protocol).

A message is a dataclass; on the wire it is msgpack of [type name, {field: value}]. Decoding
checks the type name and every field's type against the dataclass annotations, so a peer gets a
clear ProtocolError instead of a half-built object. No pickle anywhere.

Both directions are on the hot path (a hand-over carries every token of every sequence): encoding
never copies lists, and decoding checks a list of scalars by the set of its element types.
"""

import functools
import types
import typing
from dataclasses import MISSING, fields, is_dataclass

import msgpack


class ProtocolError(ValueError):
    pass


def encode(msg) -> bytes:
    return msgpack.packb([type(msg).__name__, _fields(msg)], use_bin_type=True, default=_fields)


def _fields(msg) -> dict:
    """A message's fields, shallow: msgpack calls this again for nested messages."""
    if not is_dataclass(msg):
        raise TypeError(f"cannot send a {type(msg).__name__}")
    return {f.name: getattr(msg, f.name) for f in fields(msg)}


def decode(data: bytes, messages: dict[str, type], max_bytes: int):
    """The message in data, of a type named in messages (type name -> dataclass), every field
    checked against its annotation."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several exception types for bad input
        raise ProtocolError(f"not valid msgpack ({type(e).__name__})") from None
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], dict)):
        raise ProtocolError("a message is [type name, {fields}]")
    cls = messages.get(obj[0])
    if cls is None:
        raise ProtocolError(f"unknown message type {obj[0]!r}")
    return _build(cls, obj[1])


def peek(data: bytes) -> tuple[str, str]:
    """(type name, request_id) of a message that failed to decode, as far as they can be read,
    so that the error can still reach the request's stream."""
    try:
        name, values = msgpack.unpackb(data, raw=False)[:2]
        request_id = values.get("request_id", "")
        return (name if isinstance(name, str) else "", request_id if isinstance(request_id, str) else "")
    except Exception:  # anything unreadable has no name and no id
        return "", ""


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


# The Python types msgpack decodes to that each annotation accepts (bool is not an int here).
_ACCEPTS = {int: {int}, float: {int, float}, bool: {bool}, str: {str}, dict: {dict}, type(None): {type(None)}}


def _options(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


@functools.cache
def _scalar(hint) -> tuple[frozenset, bool] | None:
    """(the types it accepts, whether ints become floats) for a scalar annotation or a union of
    scalars and null; None for any other annotation."""
    options = _options(hint)
    if not all(o in _ACCEPTS for o in options):
        return None
    return frozenset().union(*(_ACCEPTS[o] for o in options)), float in options and int not in options


def _build(cls, values: dict):
    hints = _hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown field {sorted(unknown)[0]!r}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProtocolError(f"{cls.__name__}: missing field {f.name!r}")
            continue
        kwargs[f.name] = _check(values[f.name], hints[f.name], f"{cls.__name__}.{f.name}")
    return cls(**kwargs)


def _check(value, hint, where: str):
    scalar = _scalar(hint)
    if scalar is not None:
        if type(value) not in scalar[0]:
            raise ProtocolError(f"{where}: expected {_name(hint)}, got {type(value).__name__}")
        return float(value) if scalar[1] and type(value) is int else value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if type(value) is not list:
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        scalar = _scalar(args[0])
        if scalar is None:
            return [_check(v, args[0], f"{where}[]") for v in value]
        wrong = set(map(type, value)) - scalar[0]
        if wrong:
            raise ProtocolError(f"{where}[]: expected {_name(args[0])}, got {wrong.pop().__name__}")
        return [float(v) if type(v) is int else v for v in value] if scalar[1] else value
    if origin in (typing.Union, types.UnionType):  # with a list or a message among the options
        lists = [a for a in args if typing.get_origin(a) is list]
        if type(value) is list and len(lists) == 1:  # say which element is wrong
            return _check(value, lists[0], where)
        for option in args:
            try:
                return _check(value, option, where)
            except ProtocolError:
                pass
        raise ProtocolError(f"{where}: expected {_name(hint)}, got {type(value).__name__}")
    if type(value) is not dict:
        raise ProtocolError(f"{where}: expected {hint.__name__}")
    return _build(hint, value)  # a nested message


def _name(hint) -> str:
    def one(h):
        return "null" if h is type(None) else "a list" if typing.get_origin(h) is list else h.__name__
    return " or ".join(one(a) for a in _options(hint))
