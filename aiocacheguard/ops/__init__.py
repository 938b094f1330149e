"""
The operator's API behind the ``aiocacheguard`` command: `doctor`, `stats`, `inspect`,
`top_keys`, `clear_preview` and `acl` (no I/O: the least-privileged user's ACL line). Each
takes a ready ``redis.asyncio`` client (standalone, Sentinel ``master_for`` or cluster) and
returns frozen dataclasses; nothing is printed here.

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

from .acl import AclUser, acl
from .doctor import Check, Status, doctor, server_checks
from .keyspace import (
    BloomStats,
    ClearPreview,
    Inspection,
    KeySize,
    LockStats,
    NamespaceStats,
    ServerStats,
    Stats,
    TopKeys,
    clear_preview,
    inspect,
    stats,
    top_keys,
)

__all__ = (
    "AclUser",
    "BloomStats",
    "Check",
    "ClearPreview",
    "Inspection",
    "KeySize",
    "LockStats",
    "NamespaceStats",
    "ServerStats",
    "Stats",
    "Status",
    "TopKeys",
    "acl",
    "clear_preview",
    "doctor",
    "inspect",
    "server_checks",
    "stats",
    "top_keys",
)
