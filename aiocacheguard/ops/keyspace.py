"""
Walks of one namespace's keys: `stats` (with the server's counters), `top_keys` and
`clear_preview`; and `inspect`, one entry read closely.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from ..backend import RedisClient, budgeted
from ..bulk import COMMAND_TIMEOUT, SCAN_COUNT, NamespaceKeys, Node, nodes_of, scan_node
from ..keys import KeySpace
from ..record import SIGNED_HEADER_SIZE, Record, RecordError
from ._common import SERIALIZERS
from ._common import pipelined as _pipelined
from ._common import text as _text

__all__ = (
    "BloomStats",
    "ClearPreview",
    "Inspection",
    "KeySize",
    "LockStats",
    "NamespaceStats",
    "ServerStats",
    "Stats",
    "TopKeys",
    "clear_preview",
    "inspect",
    "stats",
    "top_keys",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerStats:
    """The deployment's counters, summed over its primaries."""

    nodes: int
    keys: int
    hits: int
    misses: int
    hit_ratio: float | None  # None before the first lookup
    used_memory: int
    maxmemory: int
    evicted_keys: int
    expired_keys: int
    ops_per_sec: float  # commands per second, measured over ``interval``
    interval: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LockStats:
    """A rebuild lock: its user key, and the lease left (None: no lease, held forever)."""

    key: str
    lease_left: float | None
    stuck: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class BloomStats:
    """A Bloom filter of the namespace: bits set of its size."""

    name: str
    bits: int
    set_bits: int

    @property
    def fill_ratio(self) -> float:
        return self.set_bits / self.bits if self.bits else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceStats:
    """
    One namespace's entries. With ``sampled``, the counts are estimates: what was seen in
    ``examined`` keys, scaled to the keyspace (per primary).
    """

    namespace: str
    entries: int
    negative: int
    soft_expired: int
    expired: int  # past their TTL, kept by Redis for stale_if_error
    foreign: int  # not records (another tool's data, another Redis type)
    locks: int
    stuck_locks: tuple[LockStats, ...]
    blooms: tuple[BloomStats, ...]
    examined: int
    sampled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    server: ServerStats
    namespace: NamespaceStats | None = None


async def stats(
    client: RedisClient,
    namespace: str | None = None,
    *,
    sample: int = 10_000,
    interval: float = 1.0,
    stuck_lease: float = 300.0,
    budget: float = COMMAND_TIMEOUT,
    progress: Callable[[int], None] | None = None,
) -> Stats:
    """
    The server's hit ratio, memory, evictions and ops/s (over ``interval`` seconds), and with a
    ``namespace``, its entries by state, its locks and its Bloom filters.

    Args:
        sample: Keys examined at most (over all primaries); beyond, figures are scaled.
        stuck_lease: A lock with more lease left than this (or none) is reported as stuck.
        progress: Called with the number of keys examined so far.

    Raises:
        ConfigurationError: the namespace is not a valid one.
        BackendError: Redis is unreachable, refused a command or ran past ``budget``.
    """
    if namespace is not None:
        KeySpace(namespace)
    nodes = await nodes_of(client, budget)
    # Ops/s first, over a quiet interval: the namespace scan below would count itself.
    before = [await budgeted(node.run("INFO"), budget) for node in nodes]
    started = time.monotonic()
    await asyncio.sleep(interval)
    after = [await budgeted(node.run("INFO"), budget) for node in nodes]
    elapsed = time.monotonic() - started
    found = None
    if namespace is not None:
        found = await _namespace_stats(
            client, nodes, namespace, sample, stuck_lease, budget, progress
        )

    def total(name: str, infos: list[Any] = after) -> int:
        return sum(int(i.get(name, 0) or 0) for i in infos)

    keys = sum(
        int(value.get("keys", 0))
        for i in after
        for name, value in i.items()
        if name.startswith("db") and isinstance(value, Mapping)
    )
    hits, misses = total("keyspace_hits"), total("keyspace_misses")
    commands = total("total_commands_processed") - total("total_commands_processed", before)
    server = ServerStats(
        nodes=len(nodes),
        keys=keys,
        hits=hits,
        misses=misses,
        hit_ratio=hits / (hits + misses) if hits + misses else None,
        used_memory=total("used_memory"),
        maxmemory=total("maxmemory"),
        evicted_keys=total("evicted_keys"),
        expired_keys=total("expired_keys"),
        ops_per_sec=max(0, commands - len(nodes)) / elapsed,  # not counting our INFO
        interval=elapsed,
    )
    return Stats(server=server, namespace=found)


async def _namespace_stats(
    client: RedisClient,
    nodes: list[Node],
    namespace: str,
    sample: int,
    stuck_lease: float,
    budget: float,
    progress: Callable[[int], None] | None,
) -> NamespaceStats:
    kinds = NamespaceKeys(namespace, "*", values=True, locks=True, blooms=True)
    sizes = [int(await budgeted(node.run("DBSIZE"), budget)) for node in nodes]
    everything = max(1, sum(sizes))
    examined_total = 0
    sampled = False
    counts = dict.fromkeys(("entries", "negative", "soft", "expired", "foreign", "locks"), 0.0)
    stuck: list[LockStats] = []
    blooms: list[BloomStats] = []
    now = time.time()
    for node, size in zip(nodes, sizes, strict=True):
        share = max(1, math.ceil(sample * size / everything))
        examined = 0
        values: list[bytes] = []
        locks: list[bytes] = []
        complete = True
        async for keys in scan_node(node, None, count=min(SCAN_COUNT, share), budget=budget):
            examined += len(keys)
            for key in keys:
                kind = kinds.kind(key)
                if kind == "value":
                    values.append(key)
                elif kind == "lock":
                    locks.append(key)
                elif kind == "bloom" and key.endswith(b"}:bloom"):
                    blooms.append(await _bloom(client, namespace, key, budget))
            if progress is not None:
                progress(examined_total + examined)
            if examined >= share and examined < size:  # else this was all of it
                complete = False
                break
        examined_total += examined
        scale = 1.0 if complete or not examined else max(1.0, size / examined)
        sampled = sampled or not complete
        # A signed record's header is followed by its signature: read both, so it decodes.
        reads = [("GETRANGE", k, 0, SIGNED_HEADER_SIZE - 1) for k in values]
        headers = await _pipelined(client, reads)
        for header in headers:
            counts["entries"] += scale
            try:
                record = Record.decode(bytes(header))
            except (RecordError, TypeError):
                counts["foreign"] += scale
                continue
            if record.negative:
                counts["negative"] += scale
            if record.expires_at <= now:
                counts["expired"] += scale
            elif record.soft_expires_at is not None and record.soft_expires_at <= now:
                counts["soft"] += scale
        leases = await _pipelined(client, [("PTTL", k) for k in locks])
        for key, pttl in zip(locks, leases, strict=True):
            counts["locks"] += scale
            if isinstance(pttl, int) and pttl >= -1:
                left = None if pttl == -1 else pttl / 1000
                if left is None or left > stuck_lease:
                    user = key[len(kinds.prefix) : -len(b"}:lock")]
                    stuck.append(LockStats(key=_text(user), lease_left=left, stuck=True))
    return NamespaceStats(
        namespace=namespace,
        entries=round(counts["entries"]),
        negative=round(counts["negative"]),
        soft_expired=round(counts["soft"]),
        expired=round(counts["expired"]),
        foreign=round(counts["foreign"]),
        locks=round(counts["locks"]),
        stuck_locks=tuple(stuck),
        blooms=tuple(blooms),
        examined=examined_total,
        sampled=sampled,
    )


async def _bloom(client: RedisClient, namespace: str, key: bytes, budget: float) -> BloomStats:
    size, ones = await _pipelined(client, [("STRLEN", key), ("BITCOUNT", key)], budget=budget)
    name = key[len(namespace) + 2 : -len(b"}:bloom")]
    return BloomStats(name=_text(name), bits=int(size) * 8, set_bits=int(ones))


@dataclass(frozen=True, slots=True, kw_only=True)
class Inspection:
    """One entry as stored: its record header, value, TTL and rebuild lock."""

    key: str
    redis_key: str
    exists: bool
    redis_type: str = "none"
    size: int = 0
    ttl_left: float | None = None  # None: no TTL (not written by this library)
    format_version: int | None = None
    serializer: str | None = None
    negative: bool | None = None
    stored_at: float | None = None
    soft_expires_at: float | None = None
    expires_at: float | None = None
    compute_time: float | None = None
    value: Any = None
    value_shown: bool = False  # False: the value was not decoded (pickle, unknown, foreign)
    problem: str = ""  # why the bytes are not a readable record
    lock_holder: str | None = None
    lock_lease_left: float | None = None


async def inspect(
    client: RedisClient, namespace: str, key: str, *, budget: float = COMMAND_TIMEOUT
) -> Inspection:
    """
    Read one entry and decode what can safely be decoded: JSON and msgpack values are shown,
    pickled ones never unpickled.

    Raises:
        ConfigurationError, InvalidKeyError: the namespace or key is not valid.
        BackendError: Redis is unreachable, refused a command or ran past ``budget``.
    """
    rkey = KeySpace(namespace).value(key)
    lock = KeySpace.lock(rkey)
    kind, pttl, holder, lease = await _pipelined(
        client, [("TYPE", rkey), ("PTTL", rkey), ("GET", lock), ("PTTL", lock)], budget=budget
    )
    for reply in (kind, pttl, holder, lease):
        if isinstance(reply, Exception):
            raise reply
    kind = _text(kind)
    common: dict[str, Any] = {
        "key": key,
        "redis_key": _text(rkey),
        "exists": kind != "none",
        "redis_type": kind,
        "ttl_left": None if int(pttl) < 0 else int(pttl) / 1000,
        "lock_holder": None if holder is None else _text(holder),
        "lock_lease_left": None if holder is None or int(lease) < 0 else int(lease) / 1000,
    }
    if kind == "none":
        return Inspection(**common)
    if kind != "string":
        return Inspection(**common, problem=f"a Redis {kind}, not a record")
    (data,) = await _pipelined(client, [("GET", rkey)], budget=budget)
    data = bytes(data or b"")
    common["size"] = len(data)
    try:
        record = Record.decode(data)
    except RecordError as exc:
        return Inspection(**common, problem=str(exc))
    serializer = SERIALIZERS.get(record.serializer_tag, f"tag {record.serializer_tag}")
    value, shown = None, False
    if not record.negative:
        try:
            if serializer in ("json", "msgspec-json"):
                value, shown = msgspec.json.decode(record.payload), True
            elif serializer in ("msgpack", "msgspec-msgpack"):
                value, shown = msgspec.msgpack.decode(record.payload), True
        except msgspec.DecodeError as exc:
            common["problem"] = f"the payload does not decode as {serializer}: {exc}"
    return Inspection(
        **common,
        format_version=data[2],
        serializer=serializer,
        negative=record.negative,
        stored_at=record.stored_at,
        soft_expires_at=record.soft_expires_at,
        expires_at=record.expires_at,
        compute_time=record.compute_time,
        value=value,
        value_shown=shown,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySize:
    key: str
    bytes: int
    ttl_left: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TopKeys:
    """The largest entries seen; ``matched`` entries were measured, out of ``sampled``."""

    keys: tuple[KeySize, ...]
    matched: int
    sampled: bool


async def top_keys(
    client: RedisClient,
    namespace: str,
    pattern: str = "*",
    *,
    top: int = 10,
    sample: int = 10_000,
    budget: float = COMMAND_TIMEOUT,
    progress: Callable[[int], None] | None = None,
) -> TopKeys:
    """
    The namespace's largest entries by MEMORY USAGE, of at most ``sample`` matching entries
    (like ``redis-cli --memkeys`` for one namespace).

    Raises:
        ConfigurationError: the namespace or pattern is not valid.
        BackendError: Redis is unreachable, refused a command or ran past ``budget``.
    """
    kinds = NamespaceKeys(namespace, pattern, values=True, locks=False, blooms=False)
    found: list[bytes] = []
    sampled = False
    async for batch in kinds.scan(client, budget=budget):
        found += batch
        if progress is not None:
            progress(len(found))
        if len(found) >= sample:
            found, sampled = found[:sample], True
            break
    measured = await _pipelined(
        client,
        [c for k in found for c in (("MEMORY", "USAGE", k), ("PTTL", k))],
        budget=budget,
    )
    sizes = []
    for index, key in enumerate(found):
        usage, pttl = measured[2 * index], measured[2 * index + 1]
        if isinstance(usage, int):
            ttl = None if not isinstance(pttl, int) or pttl < 0 else pttl / 1000
            user = _text(key[len(kinds.prefix) : -1])
            sizes.append(KeySize(key=user, bytes=usage, ttl_left=ttl))
    largest = heapq.nlargest(top, sizes, key=lambda s: s.bytes)
    return TopKeys(keys=tuple(largest), matched=len(found), sampled=sampled)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClearPreview:
    """What `aiocacheguard.bulk.clear` would remove: how many keys, and a few of them."""

    count: int
    examples: tuple[str, ...]


async def clear_preview(
    client: RedisClient,
    namespace: str,
    pattern: str = "*",
    *,
    locks: bool = False,
    blooms: bool = False,
    examples: int = 10,
    budget: float = COMMAND_TIMEOUT,
    progress: Callable[[int], None] | None = None,
) -> ClearPreview:
    """
    Count what `aiocacheguard.bulk.clear` would remove, without removing anything.

    Raises:
        ConfigurationError: the namespace or pattern is not valid.
        BackendError: Redis is unreachable, refused a command or ran past ``budget``.
    """
    kinds = NamespaceKeys(namespace, pattern, values=True, locks=locks, blooms=blooms)
    count, shown = 0, list[str]()
    async for batch in kinds.scan(client, budget=budget):
        count += len(batch)
        shown += [_text(k) for k in batch[: max(0, examples - len(shown))]]
        if progress is not None:
            progress(count)
    return ClearPreview(count=count, examples=tuple(shown))
