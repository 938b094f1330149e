"""
How user keys become Redis keys.

Every Redis key of one cache entry starts with the same hash tag, ``{namespace:key}``, so a Lua
script that touches the value, its lock and its fill signal runs on one Redis Cluster node.
The namespace may not contain ``:``, ``{`` or ``}``, so two namespaces never share a key and a
user key can never pick the slot of another entry's internal keys.
"""

from __future__ import annotations

import re

from ._types import Key
from .errors import ConfigurationError, InvalidKeyError

__all__ = ("MAX_KEY_BYTES", "KeySpace", "hash_tag")

#: The longest user key accepted, in bytes after UTF-8 encoding. Redis allows far longer keys,
#: but every byte is stored, hashed and sent on every call; hash longer keys yourself.
MAX_KEY_BYTES = 1024

_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-/]{1,64}")


def hash_tag(namespace: bytes, name: bytes) -> bytes:
    """
    ``{namespace:name}``: the prefix of every Redis key of one entry (or of one Bloom filter).

    Redis Cluster hashes only what is between the first ``{`` and the next ``}``, so keys that
    start with one tag share a slot and one Lua script may touch them all. This is the one place
    the format is written; `KeySpace` and the Bloom filter both call it. Both parts are bytes,
    encoded once by the caller: `KeySpace.value` runs on every cache call.

    Example:
        >>> hash_tag(b"shop", b"leaderboard") + b":lock"
        b'{shop:leaderboard}:lock'
    """
    return b"{%b:%b}" % (namespace, name)


class KeySpace:
    """
    Builds the Redis keys of a namespace. Pure computation, no I/O.

    Example:
        >>> KeySpace("shop").value("leaderboard")
        b'{shop:leaderboard}'
    """

    __slots__ = ("_encoded", "_prefix_length", "namespace", "prefix")

    def __init__(self, namespace: str) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigurationError(
                "namespace",
                namespace,
                "1 to 64 characters from A-Z a-z 0-9 _ . - / (no ':', '{' or '}')",
            )
        self.namespace = namespace
        self._encoded = namespace.encode()
        #: What every Redis key of the namespace starts with, ``b"{namespace:"``.
        self.prefix = hash_tag(self._encoded, b"")[:-1]
        self._prefix_length = len(self.prefix)

    def value(self, key: Key) -> bytes:
        """
        The Redis key holding the record of ``key``.

        Raises:
            InvalidKeyError: ``key`` is not str/bytes, is empty, or is over `MAX_KEY_BYTES`.
        """
        if isinstance(key, str):
            raw = key.encode("utf-8", "surrogatepass")
        elif isinstance(key, bytes):
            raw = key
        else:
            raise InvalidKeyError(
                f"cache keys are str or bytes, not {type(key).__name__}; build a string key, "
                "for example f'user:{user_id}'"
            )
        if not raw:
            raise InvalidKeyError("cache keys may not be empty")
        if len(raw) > MAX_KEY_BYTES:
            raise InvalidKeyError(
                f"cache key is {len(raw)} bytes, over the limit of {MAX_KEY_BYTES} bytes; hash "
                "long keys first, for example hashlib.sha256(key.encode()).hexdigest()"
            )
        return hash_tag(self._encoded, raw)

    def user_key(self, value_key: bytes) -> bytes:
        """The user's key (as bytes) back from a value key."""
        return value_key[self._prefix_length : -1]

    @staticmethod
    def lock(value_key: bytes) -> bytes:
        """The rebuild lock of the entry stored at ``value_key`` (same hash slot)."""
        return value_key + b":lock"

    @staticmethod
    def channel(value_key: bytes) -> bytes:
        """The pub/sub channel announcing fills of ``value_key``."""
        return value_key + b":fill"
