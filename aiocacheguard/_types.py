"""Shared protocols and type aliases. No I/O, no state."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeVar, runtime_checkable

__all__ = ("Key", "Loader", "LuaScript", "ScriptArg", "ScriptRunner", "Serializer", "Subscriber")

T = TypeVar("T")

#: A cache key as users give it. ``str`` is encoded as UTF-8.
Key: TypeAlias = str | bytes

#: An async function of no arguments that fetches a value from the origin (the database).
#: Returning ``None`` means "this does not exist", which is cached as a negative result.
Loader: TypeAlias = Callable[[], Awaitable[T]]


@runtime_checkable
class Serializer(Protocol):
    """
    Turns values into bytes and back. Bytes in, bytes out.

    ``tag`` is one byte (0-255) stored with every record, so a record written with another
    serializer is treated as a miss instead of being fed to the wrong decoder. The built-in
    serializers use 1 (JSON), 2 (msgpack) and 3 (pickle); pick 100 or above for your own.

    ``loads`` may raise anything on bad input: the Cache counts it as a decode error and treats
    the record as a miss.
    """

    tag: int

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script the backend runs with EVALSHA, loading it again after NOSCRIPT."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        # Redis names a script by the SHA-1 of its source: an identifier, not a use for
        # security, which a FIPS build allows only when told so.
        sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", sha)


#: Arguments of a script: Redis encodes numbers and strings itself.
ScriptArg: TypeAlias = bytes | str | int | float


class ScriptRunner(Protocol):
    """What a guard needs of the backend to run its scripts (implemented by `RedisBackend`)."""

    async def eval(
        self, script: LuaScript, keys: Sequence[bytes], args: Sequence[ScriptArg]
    ) -> Any: ...

    def denied(self, detail: str) -> None:
        """Redis refused this user part of a script (a PUBLISH): counted, said once."""


class Subscriber(Protocol):
    """A pub/sub subscription the backend keeps open (implemented by `RedisBackend`)."""

    def prepare(self) -> None:
        """Start opening the connection in the background, if it is not open yet."""

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe; returns once Redis has confirmed the subscription."""

    async def unsubscribe(self, channel: bytes) -> None: ...
