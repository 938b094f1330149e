"""
Serializers: JSON by default; msgpack and pickle when asked for.

Every serializer is bytes in, bytes out, and carries a one-byte ``tag`` stored in each record so
that a record written by one serializer is never decoded by another.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

from .errors import SerializationError

__all__ = ("JsonSerializer", "MsgpackSerializer", "PickleSerializer")


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
        return pickle.loads(data)
