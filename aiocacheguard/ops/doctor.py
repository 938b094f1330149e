"""
`doctor`: a server checked against what a cache needs, one row per finding with the config
line to set. The rules are `server_checks`, a pure function of INFO, CONFIG GET and CLUSTER
INFO, so each is tested without a server. Given a namespace, the user's permissions are
checked too, with ACL DRYRUN (`aiocacheguard.permissions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from .. import permissions
from ..backend import RedisClient, budgeted
from ..bulk import COMMAND_TIMEOUT, Node, nodes_of
from ._common import text as _text

__all__ = ("Check", "Status", "doctor", "server_checks")

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One row of `doctor`: what was checked, what was found, and the line to set if not ok."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    node: str = ""


async def doctor(
    client: RedisClient,
    *,
    pool_size: int | None = None,
    budget: float = COMMAND_TIMEOUT,
    namespace: str | None = None,
    user: str | None = None,
    local: bool = False,
    bloom: bool = False,
) -> list[Check]:
    """
    Check each primary against what a cache needs; one `Check` per finding.

    Args:
        pool_size: Connections one process may open (default: the client's pool limit), to
            compare with ``maxclients``.
        namespace: Also check, with ACL DRYRUN, that ``user`` (default: the client's own)
            may do what a Cache of this namespace needs (with an L1: ``local``; a Bloom
            filter: ``bloom``): a ``permissions`` row per primary.

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
    if namespace is not None:
        checks += await _permissions(client, namespace, user, local, bloom, budget, len(nodes))
    return checks


async def _permissions(
    client: RedisClient,
    namespace: str,
    user: str | None,
    local: bool,
    bloom: bool,
    budget: float,
    nodes: int,
) -> list[Check]:
    """One ``permissions`` row per primary: what the user lacks, and the line granting it."""
    user = permissions.user_of(client) if user is None else user
    flags = " --local" * local + " --bloom" * bloom
    fix = f"aiocacheguard acl --namespace {namespace}{flags} (then ACL SETUSER)"
    found = None
    if user is not None:
        found = await permissions.check(
            client, namespace, user=user, local=local, bloom=bloom, budget=budget
        )
    if found is None:
        return [
            Check(
                name="permissions",
                status="warn",
                detail=f"not checked: ACL DRYRUN is not available (Redis < 7) or not allowed "
                f"to this user; run doctor as an admin with --acl-user {user or 'USER'}",
            )
        ]
    return [
        Check(
            name="permissions",
            status="fail" if lacking else "ok",
            detail=f"user {user!r} lacks {' '.join(lacking)}"
            if lacking
            else f"user {user!r} may do all a Cache of {namespace!r}{flags} needs",
            fix=fix if lacking else "",
            node=node if nodes > 1 else "",
        )
        for node, lacking in found.items()
    ]


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
