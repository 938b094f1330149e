"""
The operator's API behind the ``aiocacheguard`` command: `doctor`, `stats`, `inspect`,
`top_keys` and `clear_preview`. Each takes a ready ``redis.asyncio`` client (standalone,
Sentinel ``master_for`` or cluster) and returns frozen dataclasses; nothing is printed here.

Walks of the keyspace use SCAN, never KEYS, and stop after ``sample`` keys on large
keyspaces: the figures are then scaled up by the share of the keyspace examined, and the
result says so (``sampled``, ``examined``), as redis-cli ``--memkeys`` and RedisInsight do.
On a cluster every primary is asked, each for its share of the sample.

Guarantees:
    - Read-only: no function here writes to Redis.
    - Every command has a budget (``budget`` seconds); a Redis failure raises `BackendError`.

Limitations:
    - A lock's age cannot be known: its value is a random token and renewals reset its
      lease. `stats` reports the lease left, and calls a lock stuck when it has no lease or
      more than ``stuck_lease`` seconds of it.
    - Sampled figures are estimates; a namespace much smaller than the keyspace may not be
      seen by a sample at all. Pass a larger ``sample`` to count exactly.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import msgspec

from .backend import RedisClient
from .bulk import (
    COMMAND_TIMEOUT,
    SCAN_COUNT,
    NamespaceKeys,
    Node,
    budgeted,
    is_cluster,
    nodes_of,
    scan_node,
)
from .keys import KeySpace
from .record import HEADER_SIZE, Record, RecordError

__all__ = (
    "BloomStats",
    "Check",
    "ClearPreview",
    "Inspection",
    "KeySize",
    "LockStats",
    "NamespaceStats",
    "ServerStats",
    "Stats",
    "TopKeys",
    "clear_preview",
    "doctor",
    "inspect",
    "stats",
    "top_keys",
)

Status = Literal["ok", "warn", "fail"]

#: Serializer tags of the built-in serializers (`aiocacheguard.serializers`), by name.
SERIALIZERS: Final = {1: "json", 2: "msgpack", 3: "pickle", 4: "msgspec-json", 5: "msgspec-msgpack"}
#: Commands per pipeline when many keys are looked at.
PIPELINE: Final = 500


# --------------------------------------------------------------------------------------------
# doctor


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One row of `doctor`: what was checked, what was found, and the line to set if not ok."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    node: str = ""


async def doctor(
    client: RedisClient, *, pool_size: int | None = None, budget: float = COMMAND_TIMEOUT
) -> list[Check]:
    """
    Check each primary against what a cache needs; one `Check` per finding.

    Args:
        pool_size: Connections one process may open (default: the client's pool limit), to
            compare with ``maxclients``.

    Raises:
        BackendError: Redis is unreachable, refused a command or ran past ``budget``.
    """
    if pool_size is None:
        limit = getattr(getattr(client, "connection_pool", None), "max_connections", None)
        pool_size = limit if isinstance(limit, int) and 0 < limit < 2**31 else None
    checks: list[Check] = []
    nodes = await nodes_of(client, budget)
    for node in nodes:
        info = await budgeted(node.run("INFO"), budget)
        config = await _config(node, budget)
        cluster_info = None
        if str(info.get("cluster_enabled", "0")) == "1":
            cluster_info = _parse_fields(await budgeted(node.run("CLUSTER", "INFO"), budget))
        label = node.name if len(nodes) > 1 else ""
        checks += [
            replace(check, node=label)
            for check in server_checks(info, config, cluster_info, pool_size=pool_size)
        ]
    return checks


async def _config(node: Node, budget: float) -> dict[str, str] | None:
    """CONFIG GET *, or None where CONFIG is refused (managed services often rename it)."""
    try:
        raw = await budgeted(node.run("CONFIG", "GET", "*"), budget)
    except Exception as exc:
        if "unknown command" in str(exc).lower() or "noperm" in str(exc).lower():
            return None
        raise
    if isinstance(raw, list):  # RESP2 without a response callback: a flat list
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _parse_fields(raw: Any) -> dict[str, str]:
    if isinstance(raw, Mapping):
        return {_text(k): _text(v) for k, v in raw.items()}
    fields = {}
    for line in _text(raw).splitlines():
        name, _, value = line.partition(":")
        if value:
            fields[name.strip()] = value.strip()
    return fields


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def server_checks(
    info: Mapping[str, Any],
    config: Mapping[str, str] | None,
    cluster_info: Mapping[str, str] | None = None,
    *,
    pool_size: int | None = None,
) -> list[Check]:
    """
    The checks of one server from its INFO and CONFIG GET (None: CONFIG refused) and, on a
    cluster, CLUSTER INFO. Pure: no I/O, so every rule is tested without a server.
    """
    conf = dict(config or {})
    got = conf.get
    checks = []

    def add(name: str, status: Status, detail: str, fix: str = "") -> None:
        checks.append(Check(name=name, status=status, detail=detail, fix=fix))

    # Memory: a cache must be allowed to evict, and must evict keys without a TTL too.
    maxmemory = int(got("maxmemory") or info.get("maxmemory", 0) or 0)
    policy = got("maxmemory-policy") or str(info.get("maxmemory_policy", "unknown"))
    used = float(info.get("used_memory", 0) or 0)
    if maxmemory == 0:
        add(
            "maxmemory",
            "fail",
            f"no limit ({_mib(used)} used): Redis grows until the machine swaps or kills it",
            "maxmemory 4gb (about 3/4 of the memory the machine can give Redis)",
        )
    else:
        share = used / maxmemory
        add(
            "maxmemory",
            "warn" if share > 0.95 and policy == "noeviction" else "ok",
            f"{_mib(maxmemory)} ({share:.0%} used)",
        )
    if policy.startswith("allkeys-"):
        add("maxmemory-policy", "ok", policy)
    elif policy.startswith("volatile-"):
        add(
            "maxmemory-policy",
            "warn",
            f"{policy}: keys without a TTL are never evicted (noeviction for them)",
            "maxmemory-policy allkeys-lru",
        )
    else:
        add(
            "maxmemory-policy",
            "fail",
            f"{policy}: writes fail with OOM once maxmemory is reached",
            "maxmemory-policy allkeys-lru",
        )

    # Persistence: a pure cache rebuilds from its database; saving costs fork()s and disk.
    if config is None:
        add("persistence", "warn", "unknown (CONFIG refused)")
    else:
        saving = (got("save") or "").strip()
        aof = got("appendonly") == "yes"
        if saving or aof:
            what = " and ".join(
                x
                for x in (f"RDB snapshots ({saving})" if saving else "", "AOF" if aof else "")
                if x
            )
            add(
                "persistence",
                "warn",
                f"{what} on: a pure cache needs none (ignore if this Redis holds other data)",
                'save "" and appendonly no',
            )
        else:
            add("persistence", "ok", "off (a pure cache)")

    # Observability: latency monitor and slowlog, so a slow command can be found afterwards.
    threshold = got("latency-monitor-threshold")
    if threshold is None:
        add("latency-monitor", "warn", "unknown (CONFIG refused)")
    elif int(threshold) == 0:
        add(
            "latency-monitor",
            "warn",
            "off: LATENCY DOCTOR has nothing to report",
            "latency-monitor-threshold 100",
        )
    else:
        add("latency-monitor", "ok", f"records events over {threshold} ms")
    slower, length = got("slowlog-log-slower-than"), got("slowlog-max-len")
    if slower is None or length is None:
        add("slowlog", "warn", "unknown (CONFIG refused)")
    elif int(slower) < 0 or int(length) == 0:
        add("slowlog", "warn", "off", "slowlog-log-slower-than 10000 and slowlog-max-len 128")
    else:
        add("slowlog", "ok", f"commands over {int(slower) / 1000:g} ms, last {length} kept")
    lazy = got("lazyfree-lazy-eviction")
    if lazy is None:
        add("lazyfree-lazy-eviction", "warn", "unknown (CONFIG refused)")
    elif lazy == "yes":
        add("lazyfree-lazy-eviction", "ok", "evictions free memory in the background")
    else:
        add(
            "lazyfree-lazy-eviction",
            "warn",
            "no: evicting a large value blocks the server",
            "lazyfree-lazy-eviction yes",
        )

    # Connections: every process opens up to its pool size.
    maxclients = int(got("maxclients") or info.get("maxclients", 0) or 0)
    connected = int(info.get("connected_clients", 0) or 0)
    if maxclients == 0:
        add("maxclients", "warn", f"unknown; {connected} connected")
    else:
        detail = f"{connected} of {maxclients} connected"
        if pool_size:
            detail += f"; one process may open {pool_size} (room for {maxclients // pool_size})"
        if connected > 0.8 * maxclients:
            add("maxclients", "fail", detail, f"maxclients {max(10_000, 2 * maxclients)}")
        elif pool_size and maxclients < 4 * pool_size:
            add("maxclients", "warn", detail, f"maxclients {max(10_000, 8 * pool_size)}")
        else:
            add("maxclients", "ok", detail)

    # Cluster health.
    if cluster_info is not None:
        state = cluster_info.get("cluster_state", "?")
        assigned = cluster_info.get("cluster_slots_assigned", "?")
        if state == "ok" and assigned == "16384":
            add("cluster", "ok", f"state ok, {assigned} slots assigned")
        else:
            add(
                "cluster",
                "fail",
                f"state {state}, {assigned} of 16384 slots assigned",
                "CLUSTER INFO / redis-cli --cluster check",
            )

    # Fragmentation: only meaningful once the dataset is not tiny.
    ratio = float(info.get("mem_fragmentation_ratio", 0) or 0)
    if used < 100 * 2**20:
        add("fragmentation", "ok", f"ratio {ratio:.2f} (not meaningful under 100 MiB used)")
    elif ratio > 1.5:
        add("fragmentation", "warn", f"ratio {ratio:.2f}", "activedefrag yes")
    elif 0 < ratio < 1.0:
        add("fragmentation", "warn", f"ratio {ratio:.2f}: part of Redis is swapped out")
    else:
        add("fragmentation", "ok", f"ratio {ratio:.2f}")

    # Evictions: a few are what maxmemory is for; many mean the cache is too small.
    evicted = int(info.get("evicted_keys", 0) or 0)
    misses = int(info.get("keyspace_misses", 0) or 0)
    uptime = max(1, int(info.get("uptime_in_seconds", 1) or 1))
    if evicted == 0:
        add("evictions", "ok", "none since start")
    else:
        detail = f"{evicted:,} since start ({evicted / uptime:,.2f}/s)"
        if misses and evicted > 0.1 * misses:
            add(
                "evictions",
                "warn",
                detail + f", {evicted / misses:.0%} of the misses: the cache is too small",
                "maxmemory <larger>",
            )
        else:
            add("evictions", "ok", detail)

    # What the library uses of the server.
    version_text = str(info.get("redis_version", "0"))
    version = _version(version_text)
    if version >= (6,):
        add("client tracking", "ok", f"Redis {version_text}: L1 invalidation available")
    else:
        add("client tracking", "warn", f"Redis {version_text}: the L1 needs 6.0+", "upgrade")
    if version >= (7,):
        add("sharded pub/sub", "ok", f"Redis {version_text}")
    else:
        add(
            "sharded pub/sub",
            "warn",
            f"Redis {version_text}: fill notices are broadcast to every cluster node (7.0+ "
            "shards them)",
            "upgrade",
        )
    return checks


# --------------------------------------------------------------------------------------------
# stats


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
        headers = await _pipelined(client, [("GETRANGE", k, 0, HEADER_SIZE - 1) for k in values])
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


async def _pipelined(
    client: RedisClient, commands: list[tuple[Any, ...]], *, budget: float = COMMAND_TIMEOUT
) -> list[Any]:
    """Replies of keyed commands, `PIPELINE` at a time (per slot on a cluster); errors in place."""
    replies: list[Any] = []
    for start in range(0, len(commands), PIPELINE):
        pipe = client.pipeline() if is_cluster(client) else client.pipeline(transaction=False)
        for command in commands[start : start + PIPELINE]:
            pipe.execute_command(*command)
        replies += await budgeted(pipe.execute(raise_on_error=False), budget)
    return replies


# --------------------------------------------------------------------------------------------
# inspect


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


# --------------------------------------------------------------------------------------------
# keys --top, clear's dry run


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
