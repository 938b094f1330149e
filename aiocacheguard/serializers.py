"""
Serializers: JSON by default; msgpack and pickle when asked for; typed decoding through msgspec.

Every serializer is bytes in, bytes out, and carries a one-byte ``tag`` stored in each record so
that a record written by one serializer is never decoded by another.

A serializer may also offer ``decoder(tp)``: a function that decodes bytes into the declared type
``tp``, so a hit returns what the miss returned (a tuple stays a tuple, a dataclass a dataclass).
`typed_decoder` uses it when the serializer has one. The msgspec serializers have one:

>>> import datetime
>>> serializer = MsgspecJsonSerializer()
>>> data = serializer.dumps((datetime.date(2026, 11, 23), {1: "one"}))
>>> data
b'["2026-11-23",{"1":"one"}]'
>>> serializer.loads(data)
['2026-11-23', {'1': 'one'}]
>>> typed_decoder(serializer, tuple[datetime.date, dict[int, str]])(data)
(datetime.date(2026, 11, 23), {1: 'one'})
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import msgspec
import msgspec.inspect

from ._types import Serializer
from .errors import SerializationError

__all__ = (
    "DecodeError",
    "JsonSerializer",
    "MsgpackSerializer",
    "MsgspecJsonSerializer",
    "MsgspecMsgpackSerializer",
    "PickleSerializer",
    "TypedSerializer",
    "typed_decoder",
)


class JsonSerializer:
    """
    Compact UTF-8 JSON, the default. Safe to read from untrusted sources.

    Limitations:
        JSON has no tuples, sets, bytes or non-string dict keys: tuples come back as lists and
        integer keys as strings. Values JSON cannot encode raise `SerializationError`.
    """

    tag = 1
    __slots__ = ()

    def dumps(self, value: Any) -> bytes:
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"cannot encode {type(value).__name__} as JSON ({exc}); return JSON-compatible "
                "values (dict, list, str, int, float, bool, None) or pass "
                "serializer=MsgpackSerializer() / PickleSerializer() to the Cache"
            ) from exc

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackSerializer:
    """
    msgpack (``pip install 'aiocacheguard[msgpack]'``): smaller and faster than JSON, and keeps
    ``bytes`` values. Safe to read from untrusted sources.
    """

    tag = 2
    __slots__ = ("_msgpack",)

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SerializationError(
                "MsgpackSerializer needs msgpack: pip install 'aiocacheguard[msgpack]'"
            ) from exc
        self._msgpack = msgpack

    def dumps(self, value: Any) -> bytes:
        try:
            data: bytes = self._msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"cannot encode {type(value).__name__} as msgpack ({exc})"
            ) from exc
        return data

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False, strict_map_key=False)


class PickleSerializer:
    """
    pickle: encodes almost any Python object. Opt-in only.

    Limitations:
        Unpickling runs code chosen by whoever wrote the bytes. Use it only when nothing but
        your own trusted processes can write to the Redis database.
    """

    tag = 3
    __slots__ = ("protocol",)

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self.protocol = protocol

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=self.protocol)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"cannot pickle {type(value).__name__} ({exc})") from exc

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)  # noqa: S301  opt-in, and documented: docs/security.md


class DecodeError(SerializationError):
    """
    Stored bytes are not valid for the serializer, or do not decode into the declared type.

    The Cache treats the record as a miss and counts it, so a deploy that changes a return type
    reloads old entries instead of failing on them.
    """


@runtime_checkable
class TypedSerializer(Serializer, Protocol):
    """
    A `Serializer` that can also decode into a declared type.

    ``decoder(tp)`` returns a function from bytes to a value of type ``tp``; it raises
    `DecodeError` for bytes that do not match ``tp``, and `SerializationError` at once if the
    serializer cannot decode into ``tp`` at all. Ask for it once per type and keep it.
    """

    def decoder(self, tp: object) -> Callable[[bytes], Any]: ...


def typed_decoder(serializer: Serializer, tp: object) -> Callable[[bytes], Any]:
    """
    The function that decodes ``serializer``'s bytes into ``tp``.

    Args:
        serializer: Any serializer. One without ``decoder`` gets its plain ``loads``, so a
            tuple comes back as whatever that serializer makes of it.
        tp: The declared type: a class, ``list[int]``, ``Point | None``, ``typing.Any``...

    Returns:
        A function of one argument, the stored bytes; call it on every hit.

    Raises:
        SerializationError: ``serializer`` cannot decode into ``tp`` (for msgspec: a union of
            two types that share a wire form, such as ``date | str`` or ``tuple | list``).
    """
    make = getattr(serializer, "decoder", None)
    if make is None:
        return serializer.loads
    decode: Callable[[bytes], Any] = make(tp)
    return decode


def _type_name(tp: object) -> str:
    return tp.__qualname__ if isinstance(tp, type) else repr(tp)


def _pydantic_model(tp: object) -> bool:
    # Only look at pydantic if someone imported it: an instance of a model implies the import.
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _encode_json_extra(value: Any) -> Any:
    if _pydantic_model(type(value)):
        return msgspec.Raw(value.model_dump_json())
    raise TypeError(f"Encoding objects of type {type(value).__qualname__} is unsupported")


def _encode_msgpack_extra(value: Any) -> Any:
    if _pydantic_model(type(value)):
        return value.model_dump(mode="json")
    raise TypeError(f"Encoding objects of type {type(value).__qualname__} is unsupported")


def _decode_extra(tp: Any, obj: Any) -> Any:
    if tp is object:  # msgspec hands ``object`` (decoded as Any) to the hook once there is one
        return obj
    # Lax: the JSON form of a datetime is a string, even for a model configured strict.
    return tp.model_validate(obj, strict=False)


def _classes_left_to_a_hook(tp: object) -> set[type]:
    """The classes inside ``tp`` that msgspec cannot decode by itself, ``object`` aside."""
    found: set[type] = set()
    seen: set[int] = set()
    stack = [msgspec.inspect.type_info(tp)]
    while stack:
        node = stack.pop()
        if id(node) in seen:  # a recursive dataclass refers back to itself
            continue
        seen.add(id(node))
        if isinstance(node, msgspec.inspect.CustomType) and node.cls is not object:
            found.add(node.cls)
        for name in node.__struct_fields__:
            value = getattr(node, name)
            for item in value if isinstance(value, tuple) else (value,):
                child = item.type if isinstance(item, msgspec.inspect.Field) else item
                if isinstance(child, msgspec.inspect.Type):
                    stack.append(child)
    return found


class _MsgspecSerializer:
    """What the msgspec serializers share; a subclass names its format and msgspec module."""

    tag: int
    _format: ClassVar[str]
    __slots__ = ("_decode", "_decoders", "_encode", "_module")

    def __init__(self, module: Any, encode_extra: Callable[[Any], Any]) -> None:
        self._module = module
        self._encode: Callable[[Any], bytes] = module.Encoder(enc_hook=encode_extra).encode
        self._decode: Callable[[bytes], Any] = module.Decoder().decode
        self._decoders: dict[object, Callable[[bytes], Any]] = {}

    def dumps(self, value: Any) -> bytes:
        try:
            return self._encode(value)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SerializationError(
                f"cannot encode {type(value).__qualname__} as {self._format} ({exc}); return "
                "JSON types, tuples, sets, datetimes, dates, Decimal, UUID, enums, dataclasses, "
                "NamedTuples, TypedDicts, msgspec Structs or pydantic models"
            ) from exc

    def loads(self, data: bytes) -> Any:
        try:
            return self._decode(data)
        except msgspec.MsgspecError as exc:
            raise DecodeError(f"stored bytes are not valid {self._format} ({exc})") from exc

    def decoder(self, tp: object) -> Callable[[bytes], Any]:
        """
        The function that decodes this serializer's bytes into ``tp``, made once per type.

        Raises:
            SerializationError: msgspec cannot decode into ``tp``.
        """
        try:
            return self._decoders[tp]
        except KeyError:
            decode = self._decoders[tp] = self._make_decoder(tp)
        except TypeError:  # an unhashable annotation: correct, only not cached
            decode = self._make_decoder(tp)
        return decode

    def _make_decoder(self, tp: object) -> Callable[[bytes], Any]:
        name = _type_name(tp)
        try:
            custom = _classes_left_to_a_hook(tp)
        except TypeError as exc:
            raise SerializationError(f"cannot decode {self._format} into {name} ({exc})") from exc
        if unknown := sorted(c.__qualname__ for c in custom if not _pydantic_model(c)):
            raise SerializationError(
                f"cannot decode {self._format} into {name} ({', '.join(unknown)}: neither a type "
                "msgspec decodes nor a pydantic model)"
            )
        # The hook costs a call per value typed ``object``: only pydantic models need it.
        hook = _decode_extra if custom else None
        decode: Callable[[bytes], Any] = self._module.Decoder(tp, dec_hook=hook).decode
        wire = self._format

        def typed_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except msgspec.MsgspecError as exc:
                raise DecodeError(f"stored {wire} does not decode into {name} ({exc})") from exc

        return typed_decode


class MsgspecJsonSerializer(_MsgspecSerializer):
    """
    JSON through msgspec: faster than the stdlib, and decodes into a declared type. Safe to read
    from untrusted sources: it builds only the types you declare, never a type named in the bytes.

    Untyped, ``loads`` returns plain JSON types as `JsonSerializer` does. ``dumps`` also encodes
    tuples, sets, frozensets, datetimes, dates, times, timedeltas, Decimal (as a string), UUID,
    enums (by value), int-keyed dicts, dataclasses, NamedTuples, TypedDicts, msgspec Structs and
    pydantic models (their ``model_dump_json``); ``decoder(tp)`` turns them back into ``tp``.

    Limitations:
        NaN and infinities are written as ``null``, so a ``float`` that held one does not
        decode back (a miss each time). A datetime's zone comes back as a fixed offset
        (``+01:00``, not ``Europe/Paris``). A union may hold only one type of each wire form:
        ``date | str``, ``tuple | list`` or two dataclasses cannot be decoded into.
    """

    tag = 4
    _format = "JSON"
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(msgspec.json, _encode_json_extra)


class MsgspecMsgpackSerializer(_MsgspecSerializer):
    """
    MessagePack through msgspec: smaller than JSON, keeps ``bytes``, decodes into a declared
    type. Safe to read from untrusted sources. Encodes the same types as `MsgspecJsonSerializer`.

    Limitations:
        An aware datetime is stored as a timestamp: it comes back as the same instant in UTC.
        Integers must fit in 64 bits. Unions: as for `MsgspecJsonSerializer`.
    """

    tag = 5
    _format = "MessagePack"
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(msgspec.msgpack, _encode_msgpack_extra)
