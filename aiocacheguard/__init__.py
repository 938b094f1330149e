"""
An asyncio Redis cache that keeps a hot key's expiry from taking your database down.

When a popular key expires, every request that wants it misses at once and asks the database
(a stampede); lookups of rows that do not exist go straight through; a hung Redis stalls every
request. A `Cache` wraps a ready ``redis.asyncio`` client and answers ``get_or_load(key,
loader)`` so that:

- concurrent misses of a key in one process share one flight (one read, at most one loader
  call), and across processes a rebuild lock with a lease and a fenced fill lets one process
  load while the others wait for its fill;
- a loader's ``None`` is cached as "absent" for a while, TTLs are jittered, every Redis
  command has a budget, and corrupt bytes in Redis are a miss rather than an error;
- on request, a value past its soft TTL is served while one background refresh replaces it
  (or XFetch refreshes early), the previous value is served while the loader fails, and a
  Bloom filter turns away keys that exist nowhere.

The parts: `Cache` (the facade), `Policy` (every knob of an entry's life, see
``docs/policy.md``), `cached` (a decorator keeping the function's signature) and `CacheRef`
(loaders declared before the Cache exists, bound in an app's lifespan, see
``docs/recipes.md``), `BloomFilter`, the serializers, `Statistics` and `Event` for metrics.
Everything the library raises derives from `CacheGuardError`; a loader's own exceptions reach
its callers untouched and are never cached. Throwaway Redis servers for tests are in
`aiocacheguard.testing`.

Importing the package does no I/O and creates no instances.

Example:
    >>> import asyncio, redis.asyncio as redis
    >>> from aiocacheguard import Cache, Policy
    >>> from aiocacheguard.testing import RedisServer
    >>> async def main(port: int) -> list[str]:
    ...     async def load_board() -> list[str]:  # the database query
    ...         return ["ada", "grace"]
    ...     client = redis.Redis(port=port)
    ...     async with Cache(client, namespace="doc", policy=Policy(ttl=30.0)) as cache:
    ...         board: list[str] = await cache.get_or_load("board", load_board)
    ...     await client.aclose()
    ...     return board
    >>> with RedisServer() as server:
    ...     asyncio.run(main(server.port))
    ['ada', 'grace']
"""

from ._types import Key, Loader, Serializer
from ._version import __version__
from .cache import Cache
from .decorator import Cached, CacheRef, cached
from .errors import (
    AuthenticationError,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CacheClosedError,
    CacheGuardError,
    CacheGuardWarning,
    CacheNotBoundError,
    ConfigurationError,
    InsecurePickleWarning,
    InsecureTLSWarning,
    InvalidKeyError,
    LoadTimeout,
    LockError,
    LockTimeout,
    PermissionDeniedError,
    SerializationError,
    ValueTooLargeError,
)
from .guards.bloom import BloomFilter
from .guards.breaker import Breaker
from .guards.local import LocalCache
from .metrics import Event, Hook, Statistics
from .policy import Policy
from .serializers import (
    JsonSerializer,
    MsgpackSerializer,
    MsgspecJsonSerializer,
    MsgspecMsgpackSerializer,
    PickleSerializer,
)

__all__ = (
    "AuthenticationError",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "BloomFilter",
    "Breaker",
    "Cache",
    "CacheClosedError",
    "CacheGuardError",
    "CacheGuardWarning",
    "CacheNotBoundError",
    "CacheRef",
    "Cached",
    "ConfigurationError",
    "Event",
    "Hook",
    "InsecurePickleWarning",
    "InsecureTLSWarning",
    "InvalidKeyError",
    "JsonSerializer",
    "Key",
    "LoadTimeout",
    "Loader",
    "LocalCache",
    "LockError",
    "LockTimeout",
    "MsgpackSerializer",
    "MsgspecJsonSerializer",
    "MsgspecMsgpackSerializer",
    "PermissionDeniedError",
    "PickleSerializer",
    "Policy",
    "SerializationError",
    "Serializer",
    "Statistics",
    "ValueTooLargeError",
    "__version__",
    "cached",
)
