"""
aiocacheguard: an asyncio Redis cache that keeps a hot key's expiry from hurting the database.

Re-exports only: importing the package does no I/O and creates no instances.
"""

from ._types import Key, Loader, Serializer
from ._version import __version__
from .cache import Cache
from .decorator import Cached, CacheRef, cached
from .errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CacheClosedError,
    CacheGuardError,
    CacheNotBoundError,
    ConfigurationError,
    InvalidKeyError,
    LoadTimeout,
    LockError,
    LockTimeout,
    SerializationError,
)
from .guards.bloom import BloomFilter
from .metrics import Event, Hook, Statistics
from .policy import Policy
from .serializers import JsonSerializer, MsgpackSerializer, PickleSerializer

__all__ = (
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "BloomFilter",
    "Cache",
    "CacheClosedError",
    "CacheGuardError",
    "CacheNotBoundError",
    "CacheRef",
    "Cached",
    "ConfigurationError",
    "Event",
    "Hook",
    "InvalidKeyError",
    "JsonSerializer",
    "Key",
    "LoadTimeout",
    "Loader",
    "LockError",
    "LockTimeout",
    "MsgpackSerializer",
    "PickleSerializer",
    "Policy",
    "SerializationError",
    "Serializer",
    "Statistics",
    "__version__",
    "cached",
)
