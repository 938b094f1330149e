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
 |    +-- ValueTooLargeError                its record would pass the Cache's max_value_bytes
 +-- CacheClosedError                       the Cache was used after aclose()
 +-- CacheNotBoundError (also RuntimeError) a CacheRef was used while bound to no Cache
 +-- LoadTimeout (also TimeoutError)        a loader ran past Policy.load_timeout
 +-- LockError                              the rebuild lock could not be had
 |    +-- LockTimeout (also TimeoutError)   waited wait_timeout for another process's fill
 +-- BackendError                           Redis answered with an error or could not be reached
      +-- BackendUnavailable                connection refused, reset, or pool exhausted
      +-- BackendTimeout (also TimeoutError) Redis did not answer within the command budget
      +-- PermissionDeniedError             Redis refused this user a command, key or channel
           +-- AuthenticationError          Redis refused the credentials (password, user)
```

Warnings derive from `CacheGuardWarning` (a ``UserWarning``), so one filter silences or raises
them all:

```
CacheGuardWarning
 +-- InsecureTLSWarning                     TLS that verifies no certificate (ssl_cert_reqs=none)
 +-- InsecurePickleWarning                  PickleSerializer without a signing_key
```

`PermissionDeniedError` and `AuthenticationError` are configuration errors of the Redis user,
not failures of Redis: they never open the circuit breaker (Redis answered), each is counted in
``Statistics.permission_errors`` and said once per episode. ``aiocacheguard acl`` prints the
ACL a Cache needs.
"""

from __future__ import annotations

__all__ = (
    "AuthenticationError",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "CacheClosedError",
    "CacheGuardError",
    "CacheGuardWarning",
    "CacheNotBoundError",
    "ConfigurationError",
    "InsecurePickleWarning",
    "InsecureTLSWarning",
    "InvalidKeyError",
    "LoadTimeout",
    "LockError",
    "LockTimeout",
    "PermissionDeniedError",
    "SerializationError",
    "ValueTooLargeError",
)


class CacheGuardError(Exception):
    """Base class of every exception aiocacheguard raises itself."""


class ConfigurationError(CacheGuardError, ValueError):
    """
    A configuration value is out of its accepted range.

    Raised when a `Policy` or a `Cache` is created, never later. The message names the field,
    the value given and what is accepted; a value whose repr is long (a client's runs to a
    thousand characters) comes after the reason, named by its type (a string: its start).
    """

    def __init__(self, field: str, value: object, accepted: str) -> None:
        self.field = field
        self.value = value
        self.accepted = accepted
        shown = repr(value)
        if len(shown) <= _MAX_SHOWN:
            super().__init__(f"{field}={shown} is not accepted: {accepted}")
            return
        if isinstance(value, str | bytes):  # the start of a long string says which it is
            got = f"{shown[: _MAX_SHOWN - 3]}..."
        else:
            got = f"a {type(value).__module__}.{type(value).__qualname__}"
        super().__init__(f"{field} is not accepted: {accepted} (got {got})")


#: The longest repr of a refused value that a `ConfigurationError` message quotes.
_MAX_SHOWN = 120


class InvalidKeyError(CacheGuardError, ValueError):
    """A cache key is empty, too long, or neither ``str`` nor ``bytes``."""


class SerializationError(CacheGuardError, TypeError):
    """
    A value could not be encoded by the Cache's serializer.

    The default serializer is JSON: return JSON-compatible values from loaders (dict, list, str,
    int, float, bool, None), or hand the Cache another serializer.
    """


class ValueTooLargeError(SerializationError):
    """
    A value's record (its encoded payload and header) is larger than the Cache's
    ``max_value_bytes``. Raised by ``set`` (and ``set_many``) before the value is sent; a
    loader's value that large is still returned to its callers, only not cached.

    Attributes:
        size: The record's size in bytes.
        limit: The Cache's ``max_value_bytes``.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"the encoded value is {size:,} bytes, more than max_value_bytes={limit:,}; "
            "store less (or a reference to it), or raise the Cache's max_value_bytes"
        )


class CacheClosedError(CacheGuardError):
    """The Cache was used after `Cache.aclose()`, or closed while a call was in flight."""


class LoadTimeout(CacheGuardError, TimeoutError):
    """A loader ran longer than ``Policy.load_timeout``; it was cancelled and nothing cached."""


class LockError(CacheGuardError):
    """The distributed rebuild lock could not be had."""


class LockTimeout(LockError, TimeoutError):
    """
    Another process held the rebuild lock for longer than ``Policy.wait_timeout`` without
    filling the key, and the policy says ``on_wait_timeout="raise"``.
    """


class BackendError(CacheGuardError):
    """Redis answered a command with an error, or could not be reached."""


class BackendUnavailable(BackendError):
    """Redis could not be reached: refused, reset, or no connection free in the client's pool."""


class BackendTimeout(BackendError, TimeoutError):
    """Redis did not answer within the Cache's ``command_timeout``."""


class PermissionDeniedError(BackendError):
    """
    Redis refused this Cache's user a command, a key or a channel (``NOPERM``): the user's ACL
    lacks something the Cache needs. ``aiocacheguard acl --namespace NS`` prints the
    ``ACL SETUSER`` line that grants it; ``aiocacheguard doctor --namespace NS`` says what is
    missing. Not a failure of Redis: the circuit breaker does not count it.
    """


class AuthenticationError(PermissionDeniedError):
    """
    Redis refused the client's credentials: a wrong password, an unknown or disabled user, or
    no ``AUTH`` where Redis requires one. Not a failure of Redis: the circuit breaker does not
    count it.
    """


class CacheNotBoundError(CacheGuardError, RuntimeError):
    """
    A loader decorated with ``@cached(cache_ref, ...)`` was called, or ``cache_ref.cache``
    read, while its `CacheRef` was bound to no Cache: before the app started or after it
    stopped. Bind it where the Cache is created: ``with cache_ref.bind(cache):`` in a lifespan.
    """


class CacheGuardWarning(UserWarning):
    """Base class of every warning aiocacheguard issues."""


class InsecureTLSWarning(CacheGuardWarning):
    """
    A client was built from a URL that turns TLS certificate verification off
    (``ssl_cert_reqs=none``): the traffic is encrypted, but anyone on the network path can
    pose as Redis and read it, the password included. Give the CA instead
    (``ssl_ca_certs=/path/to/ca.pem``); see docs/security.md.
    """


class InsecurePickleWarning(CacheGuardWarning):
    """
    A Cache uses `PickleSerializer` without a ``signing_key``: whoever can write to the Redis
    database runs code of their choosing in this process through any record it reads. Warned
    once, when the Cache is created; docs/security.md says what to do instead.
    """
