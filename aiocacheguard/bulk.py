"""
Bulk operations on a `Cache`: many reads, many writes, warming before traffic, clearing a
namespace. `Cache.get_many`, `set_many`, `warm` and `clear` are thin wrappers over these.

Reads and writes go through the Cache itself, many at a time, so each one keeps its exact
semantics (a write is the same fenced `FILL` as `Cache.set`: a rebuild in progress is
superseded) while the backend's batching turns them into MGETs and pipelines, at most
`MAX_BATCH` keys a command. On Redis Cluster the MGETs are split per slot, and the scripts are
sent side by side, each routed to its slot's primary.

Clearing walks the keyspace with SCAN (on a cluster, every primary) and removes what matches
with UNLINK, a batch at a time, so the server never blocks on one huge command and freeing
memory happens in Redis's background thread.

Guarantees:
    - `clear` removes only keys of the Cache's namespace that match the pattern, and of those
      only values unless asked for locks and Bloom filters too.
    - `warm` runs at most ``concurrency`` writes or loads at once, however long the input; the
      first failure stops it and is raised as itself (not wrapped in an exception group).

Limitations:
    - None of these is atomic: a key written during `clear` may survive it, and a reader may
      see part of a `set_many`.
    - SCAN may return a key twice (Redis says so); `clear` counts what UNLINK removed, so the
      count is exact, but a progress callback may see a key twice.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import anyio

from ._aio import aiter_of
from ._types import Key
from .backend import MAX_BATCH, MAX_BATCHES, RedisClient, budgeted, is_cluster
from .errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    from .cache import Cache

__all__ = (
    "BulkOperations",
    "NamespaceKeys",
    "Node",
    "clear",
    "get_many",
    "nodes_of",
    "set_many",
    "warm",
)

KeyT = TypeVar("KeyT", bound=Key)

#: Keys handed to the Cache at once by `get_many` and `set_many`: every batch lane full.
CHUNK: Final = MAX_BATCH * MAX_BATCHES
#: Keys asked of SCAN per call (its COUNT hint), and removed per UNLINK.
SCAN_COUNT: Final = 1000
#: The budget of one SCAN or UNLINK call made here, in seconds, when no Cache gives one.
COMMAND_TIMEOUT: Final = 5.0

#: What `warm` accepts: ``(key, value)``, ``(key, value, ttl)``, or ``(key, loader)`` where
#: the loader is an async function of no arguments.
WarmItem = tuple[Key, Any] | tuple[Key, Any, float | None]


async def get_many(cache: Cache, keys: Iterable[Key], default: Any = None) -> list[Any]:
    """
    The cached values of ``keys``, in order; ``default`` for each key not cached (as `Cache.get`).

    Raises:
        InvalidKeyError: a key is empty, too long or not str/bytes (nothing is read).
        BackendError: Redis failed or did not answer within the Cache's ``command_timeout``.
    """
    keys = list(keys)
    for key in keys:
        cache.keys.value(key)  # every key checked before any is read
    await _ready(cache)
    results: list[Any] = []
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        results += await _all(cache.get(key, default) for key in chunk)
    return results


async def set_many(cache: Cache, mapping: Mapping[KeyT, Any], *, ttl: float | None = None) -> None:
    """
    Store every value of ``mapping`` as `Cache.set` would (same TTL rules, same fenced write).

    Raises:
        InvalidKeyError: a key is empty, too long or not str/bytes (nothing is written).
        ConfigurationError: ``ttl`` is out of range.
        SerializationError: a value cannot be encoded, or is too large (`ValueTooLargeError`)
            (nothing is written).
        BackendError: Redis failed or did not answer within the Cache's ``command_timeout``.
    """
    cache._check_open()
    # Every key, TTL and value is checked, and every value encoded, before anything is sent.
    writes = [cache._prepared_set(key, value, ttl) for key, value in mapping.items()]
    await _ready(cache)
    for start in range(0, len(writes), CHUNK):
        await _all(write() for write in writes[start : start + CHUNK])


async def _ready(cache: Cache) -> None:
    """
    Let a cluster client discover its nodes before many commands start at once: redis-py's
    `RedisCluster` breaks (``'NoneType' object has no attribute 'writelines'``) when
    concurrent first commands race to initialise it. A no-op once it is initialised.
    """
    client = cache._backend.client
    if is_cluster(client):
        await budgeted(client.initialize(), cache._backend.command_timeout)


async def _all(calls: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run ``calls`` together; wait for every one, then raise the first failure, if any."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def warm(
    cache: Cache,
    items: Iterable[WarmItem] | AsyncIterable[WarmItem],
    *,
    concurrency: int = 64,
    progress: Callable[[int], None] | None = None,
) -> int:
    """
    Fill the cache before traffic arrives; returns how many items were written or loaded.

    A ``(key, value)`` or ``(key, value, ttl)`` item is written as `Cache.set` writes it (it
    replaces what is cached), but with the policy's jitter on its TTL, an item's own ``ttl``
    too, so that keys warmed together do not expire together. A ``(key, loader)`` item, where
    ``loader`` is an async function of no arguments, goes through `Cache.get_or_load`: loaded
    only if not cached already, once across every process warming the same key. ``items`` is
    read lazily, so it may be a generator over a file or a database cursor of any length.

    Args:
        concurrency: Writes or loads at once.
        progress: Called with the number of items done so far, after each one.

    Raises:
        ConfigurationError: ``concurrency`` is below 1.
        Exception: the first failure (a bad key, a loader's error, a `BackendError`); the
            items in progress are cancelled and nothing more is read.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError("concurrency", concurrency, "an integer >= 1")
    await _ready(cache)
    limiter = anyio.CapacityLimiter(concurrency)
    done = 0
    failure: BaseException | None = None

    async def one(item: WarmItem, token: object) -> None:
        nonlocal done, failure
        try:
            await _warm_one(cache, item)
            done += 1
            if progress is not None:
                progress(done)
        except Exception as exc:
            if failure is None:
                failure = exc
            group.cancel_scope.cancel()
        finally:
            limiter.release_on_behalf_of(token)

    async with anyio.create_task_group() as group:
        try:
            async for item in aiter_of(items):
                token = object()
                await limiter.acquire_on_behalf_of(token)
                if failure is not None:
                    limiter.release_on_behalf_of(token)
                    break
                group.start_soon(one, item, token)
        except Exception as exc:  # reading the items failed: stop the writes in progress
            failure = failure or exc
            group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return done


async def _warm_one(cache: Cache, item: WarmItem) -> None:
    if not isinstance(item, tuple) or len(item) not in (2, 3):
        raise TypeError(
            f"warm items are (key, value), (key, value, ttl) or (key, loader): {item!r}"
        )
    key, value = item[0], item[1]
    ttl = item[2] if len(item) == 3 else None
    if callable(value):
        await cache.get_or_load(key, value)
    else:
        # Keys warmed together must not expire together: their TTLs get the policy's jitter,
        # an item's own TTL too (a plain `Cache.set` with a ttl writes it exactly).
        await cache._prepared_set(key, value, ttl, jitter=True)()


async def clear(
    cache: Cache,
    pattern: str = "*",
    *,
    locks: bool = False,
    blooms: bool = False,
    progress: Callable[[int], None] | None = None,
) -> int:
    """
    Remove the namespace's entries whose key matches ``pattern``; returns how many keys went.

    ``pattern`` is a Redis glob over user keys (``*``, ``?``, ``[a-z]``, ``\\`` escapes):
    ``"user:*"`` removes ``user:1`` and ``user:2``. Rebuild locks and Bloom filters (matched
    by their name) are removed only when asked: removing a held lock lets a second process
    load the same key.

    Args:
        progress: Called with the number of keys removed so far, after each batch.

    Raises:
        ConfigurationError: the pattern is not a Redis glob (nothing is sent).
        CacheClosedError: the Cache was closed with ``aclose()``.
        BackendError: Redis failed or a command ran past its budget (counted by the breaker,
            like any call); keys removed before that stay removed. `BackendUnavailable` at
            once while the breaker is open.
    """
    cache._check_open()
    backend = cache._backend
    found = NamespaceKeys(cache.namespace, pattern, values=True, locks=locks, blooms=blooms)
    refused = backend.refused()  # (on a cluster: the breaker of Redis as a whole)
    if refused is not None:
        raise refused
    removed = 0
    try:
        async for batch in found.scan(backend.client, budget=backend.command_timeout):
            removed += await budgeted(backend.client.unlink(*batch), backend.command_timeout)
            cache._reads.forget_all()  # this process reads what it removed as removed, at once
            if progress is not None:
                progress(removed)
    except BackendError as error:
        backend.errors += 1
        backend.record(error)
        raise
    backend.record(None)
    return removed


@dataclass(frozen=True, slots=True)
class Node:
    """One Redis primary: its name (``host:port``) and a way to run a command on it."""

    name: str
    run: Callable[..., Awaitable[Any]]


async def nodes_of(client: RedisClient, budget: float = COMMAND_TIMEOUT) -> list[Node]:
    """The primaries of ``client``'s deployment: itself, or every primary of a cluster."""
    if is_cluster(client):
        cluster = client
        await budgeted(cluster.initialize(), budget)  # the nodes are learnt on first use

        def on(node: Any) -> Callable[..., Awaitable[Any]]:
            async def run(*args: Any) -> Any:
                return await cluster.execute_command(*args, target_nodes=node)

            return run

        return [Node(node.name, on(node)) for node in cluster.get_primaries()]
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    name = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    return [Node(name, client.execute_command)]


async def scan_node(
    node: Node, match: bytes | None, *, count: int = SCAN_COUNT, budget: float = COMMAND_TIMEOUT
) -> AsyncIterator[list[bytes]]:
    """The keys of one primary matching ``match``, a SCAN call's worth at a time."""
    cursor: Any = 0
    while True:
        args: list[Any] = ["SCAN", cursor, "COUNT", count]
        if match is not None:
            args[2:2] = ["MATCH", match]
        cursor, keys = await budgeted(node.run(*args), budget)
        if isinstance(cursor, dict):  # a cluster client answers per node
            (cursor,) = cursor.values()
        if keys:
            yield [bytes(k) for k in keys]
        if int(cursor) == 0:
            return


_LOCK, _BLOOM, _BLOOM_REBUILD = b"}:lock", b"}:bloom", b"}:bloom:rebuild"


#: What Redis's glob reads as other than itself, outside a class: escaped when meant literally.
_GLOB_SPECIALS: Final = (b"*", b"?", b"[", b"]", b"\\")


def redis_glob(pattern: bytes) -> re.Pattern[bytes]:
    """
    A regex matching exactly what Redis's glob ``pattern`` matches (as KEYS and SCAN MATCH):
    ``*``, ``?``, ``[abc]``, ``[^a-z]`` and ``\\`` escapes.

    Raises:
        ConfigurationError: the pattern has a reversed range such as ``[z-a]``.
    """
    return _parse_glob(pattern)[0]


def _parse_glob(pattern: bytes) -> tuple[re.Pattern[bytes], bytes]:
    """
    `redis_glob`'s regex, and the same glob written so that it can be embedded in a longer
    one: every special character meant literally escaped, every class closed. A user's
    ``a\\`` (a trailing backslash, a literal one to Redis) would otherwise escape the ``}``
    that follows it in ``{ns:a\\}*``, and an unclosed ``[`` would swallow it.
    """
    regex, glob, i, n = [], [], 0, len(pattern)
    while i < n:
        c = pattern[i : i + 1]
        if c in (b"*", b"?"):
            regex.append(b".*" if c == b"*" else b".")
            glob.append(c)
        elif c == b"[":
            i += 1
            negate = pattern[i : i + 1] == b"^"
            i += negate
            members: list[tuple[bytes, bytes]] = []  # (first, last) of each range or char
            while i < n and pattern[i : i + 1] != b"]":
                char = pattern[i : i + 1]
                if char == b"\\" and i + 1 < n:
                    i += 1
                    members.append((pattern[i : i + 1],) * 2)
                elif char == b"-" and members and i + 1 < n and pattern[i + 1 : i + 2] != b"]":
                    i += 1
                    first, last = members.pop()[0], pattern[i : i + 1]
                    if first > last:
                        raise ConfigurationError(
                            "pattern",
                            pattern.decode(errors="replace"),
                            f"a Redis glob (bad character range {first!r}-{last!r})",
                        )
                    members.append((first, last))
                else:
                    members.append((char, char))
                i += 1
            if not members:  # Redis: ``[]`` matches nothing, ``[^]`` any one character
                regex.append(b"." if negate else b"(?!)")
                glob.append(b"?" if negate else b"[]")
            else:
                ranges = [
                    re.escape(a) if a == b else re.escape(a) + b"-" + re.escape(b)
                    for a, b in members
                ]
                regex.append(b"[" + b"^" * negate + b"".join(ranges) + b"]")
                # Redis reads a range's ends raw and an escaped member as one character:
                # a range with an end Redis would read otherwise is spelled out.
                spelled = [
                    a + b"-" + b if a != b and (a + b).isalnum() else _escaped(a, b)
                    for a, b in members
                ]
                glob.append(b"[" + b"^" * negate + b"".join(spelled) + b"]")
        else:
            if c == b"\\" and i + 1 < n:  # (a trailing backslash is a literal one)
                i += 1
                c = pattern[i : i + 1]
            regex.append(re.escape(c))
            glob.append(b"\\" + c if c in _GLOB_SPECIALS else c)
        i += 1
    try:
        return re.compile(b"".join(regex), re.DOTALL), b"".join(glob)
    except re.error as exc:
        raise ConfigurationError(
            "pattern", pattern.decode(errors="replace"), f"a Redis glob ({exc})"
        ) from None


def _escaped(first: bytes, last: bytes) -> bytes:
    """Every character from ``first`` to ``last``, each escaped (a class's members)."""
    return b"".join(b"\\" + bytes([c]) for c in range(first[0], last[0] + 1))


class NamespaceKeys:
    """
    The Redis keys of one namespace's entries matching a glob over user keys: values (always
    ``{ns:key}``), rebuild locks (``{ns:key}:lock``) and Bloom filters (``{ns:name}:bloom``
    and the ``:bloom:rebuild`` bitmap of a rebuild in progress), each kind only if asked.

    One SCAN pass finds them all: Redis matches ``{ns:PATTERN}*``, then each key's kind is
    told by its suffix (a value key ends in ``}``, a lock's never does) and its user key is
    matched against the pattern exactly.
    """

    __slots__ = ("_blooms", "_locks", "_regex", "_values", "match", "prefix")

    def __init__(
        self, namespace: str, pattern: str = "*", *, values: bool, locks: bool, blooms: bool
    ) -> None:
        from .keys import KeySpace

        KeySpace(namespace)  # validates the namespace
        raw = pattern.encode("utf-8", "surrogatepass")
        self.prefix = b"{" + namespace.encode() + b":"
        self._regex, glob = _parse_glob(raw)
        self.match = self.prefix + glob + b"}*"
        self._values, self._locks, self._blooms = values, locks, blooms

    def kind(self, key: bytes) -> str | None:
        """``"value"``, ``"lock"`` or ``"bloom"`` if ``key`` is one asked for, else None."""
        if not key.startswith(self.prefix):
            return None
        for suffix, kind, wanted in (
            (b"}", "value", self._values),
            (_LOCK, "lock", self._locks),
            (_BLOOM, "bloom", self._blooms),
            (_BLOOM_REBUILD, "bloom", self._blooms),
        ):
            if key.endswith(suffix):
                user = key[len(self.prefix) : -len(suffix)]
                if wanted and self._regex.fullmatch(user):
                    return kind
                return None
        return None

    async def scan(
        self, client: RedisClient, *, budget: float = COMMAND_TIMEOUT
    ) -> AsyncIterator[list[bytes]]:
        """The matching keys of every primary, a batch at a time (no batch is empty)."""
        for node in await nodes_of(client, budget):
            async for keys in scan_node(node, self.match, budget=budget):
                wanted = [k for k in keys if self.kind(k) is not None]
                if wanted:
                    yield wanted


class BulkOperations:
    """
    `Cache`'s bulk methods: thin, the functions of this module do the work (and take a Cache
    as their first argument, for code that prefers them).
    """

    __slots__ = ()

    async def get_many(self, keys: Iterable[Key], default: Any = None) -> list[Any]:
        """The cached values of ``keys`` in order (see `aiocacheguard.bulk.get_many`)."""
        return await get_many(cast("Cache", self), keys, default)

    async def set_many(self, mapping: Mapping[KeyT, Any], *, ttl: float | None = None) -> None:
        """Store every value of ``mapping`` as `set` would (see `aiocacheguard.bulk.set_many`)."""
        await set_many(cast("Cache", self), mapping, ttl=ttl)

    async def warm(
        self,
        items: Iterable[WarmItem] | AsyncIterable[WarmItem],
        *,
        concurrency: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Fill the cache before traffic arrives (see `aiocacheguard.bulk.warm`)."""
        return await warm(cast("Cache", self), items, concurrency=concurrency, progress=progress)

    async def clear(
        self,
        pattern: str = "*",
        *,
        locks: bool = False,
        blooms: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Remove the entries matching ``pattern``; how many (see `aiocacheguard.bulk.clear`)."""
        cache = cast("Cache", self)
        return await clear(cache, pattern, locks=locks, blooms=blooms, progress=progress)
