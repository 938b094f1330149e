"""
Family (e): bad keys, values and policies are refused before any I/O.

Each call goes to a Cache whose client talks through a `FaultProxy` in step mode, which holds
every command it is sent: a call that did any I/O would hang there (and the proxy would have
seen bytes). Asserted for every case:
    - the named library error (`InvalidKeyError`, `ConfigurationError`, `SerializationError`),
      raised within 0.5 s;
    - not one byte reached the proxy, and nothing is held in it;
    - the Cache still works afterwards for a good key (once the proxy lets commands through).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis

from aiocacheguard import (
    Cache,
    CacheGuardError,
    ConfigurationError,
    InvalidKeyError,
    Policy,
    SerializationError,
    cached,
)
from aiocacheguard.testing import FaultProxy

from .checks import assert_nothing_left, through

Call = Callable[[Cache], Awaitable[Any]]


async def load() -> Any:
    raise AssertionError("a loader of a refused call must not run")


BAD_KEYS: list[object] = ["", b"", "x" * 1025, "é" * 513, 12, 1.5, None, ("k",), ["k"]]

KEY_CALLS: dict[str, Callable[[object], Call]] = {
    "get": lambda key: lambda c: c.get(key),  # type: ignore[arg-type]
    "set": lambda key: lambda c: c.set(key, 1),  # type: ignore[arg-type]
    "delete": lambda key: lambda c: c.delete(key),  # type: ignore[arg-type]
    "get_or_load": lambda key: lambda c: c.get_or_load(key, load),  # type: ignore[arg-type]
    "refresh": lambda key: lambda c: c.refresh(key, load),  # type: ignore[arg-type]
    "get_many": lambda key: lambda c: c.get_many(["good", key]),  # type: ignore[list-item]
    "set_many": lambda key: lambda c: c.set_many({"good": 1, key: 2}),  # type: ignore[type-var]
}

OTHER_CALLS: dict[str, tuple[Call, type[CacheGuardError]]] = {
    "set ttl=0": (lambda c: c.set("k", 1, ttl=0), ConfigurationError),
    "set ttl=-1": (lambda c: c.set("k", 1, ttl=-1.0), ConfigurationError),
    "set ttl=nan": (lambda c: c.set("k", 1, ttl=math.nan), ConfigurationError),
    "set ttl=inf": (lambda c: c.set("k", 1, ttl=math.inf), ConfigurationError),
    "set ttl=1e-9": (lambda c: c.set("k", 1, ttl=1e-9), ConfigurationError),
    "set ttl=10 years": (lambda c: c.set("k", 1, ttl=10 * 365 * 86400.0), ConfigurationError),
    "set ttl=True": (lambda c: c.set("k", 1, ttl=True), ConfigurationError),
    "set_many ttl=0": (lambda c: c.set_many({"k": 1}, ttl=0), ConfigurationError),
    "set unencodable": (lambda c: c.set("k", object()), SerializationError),
    "set_many, one unencodable": (
        lambda c: c.set_many({"a": 1, "k": object()}),
        SerializationError,
    ),
    "loader not callable": (
        lambda c: c.get_or_load("k", "load"),  # type: ignore[arg-type]
        ConfigurationError,
    ),
    "policy not a Policy": (
        lambda c: c.get_or_load("k", load, policy=30.0),  # type: ignore[arg-type]
        ConfigurationError,
    ),
    "policy as a dict": (
        lambda c: c.get_or_load("k", load, policy={"ttl": 30.0}),  # type: ignore[arg-type]
        ConfigurationError,
    ),
}

BAD_POLICIES: list[dict[str, Any]] = [
    {"ttl": 0},
    {"ttl": 1e-9},
    {"ttl": math.nan},
    {"ttl": 30.0, "soft_ttl": 30.0},
    {"ttl": 30.0, "negative_ttl": 0.0},
    {"ttl": 30.0, "lock_ttl": 0.01},
    {"ttl": 30.0, "wait_timeout": -1.0},
    {"ttl": 30.0, "load_timeout": 0},
    {"ttl": 30.0, "on_wait_timeout": "wait"},
    {"ttl": 30.0, "jitter": 1.0},
    {"ttl": 30.0, "early_beta": -1.0},
    {"ttl": 30.0, "stale_if_error": math.inf},
    {"ttl": 30.0, "lock": "yes"},
    {"ttl": 30.0, "local_ttl": -1.0},
]


@pytest.fixture
async def held(proxy: FaultProxy, namespace: str) -> AsyncIterator[Cache]:
    """A Cache, warmed up, whose every later command would wait in the proxy."""
    client = through(proxy.port, namespace)
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        await cache.set("good", 0)  # connections open: a refused call cannot hide in a connect
        proxy.hold()
        sent = proxy.statistics().bytes_upstream
        yield cache
        assert proxy.held == [] and proxy.statistics().bytes_upstream == sent, "I/O was done"
        proxy.unhold()
        assert await cache.get_or_load("good", load) == 0  # still works
    await client.aclose()


async def refused(cache: Cache, call: Call, error: type[CacheGuardError]) -> CacheGuardError:
    with pytest.raises(error) as info:
        async with asyncio.timeout(0.5):
            await call(cache)
    return info.value


@pytest.mark.parametrize(
    ("operation", "key"),
    [
        (operation, key)
        for operation in sorted(KEY_CALLS)
        for key in BAD_KEYS
        if operation != "set_many" or not isinstance(key, list)  # a dict key is hashable
    ],
    ids=repr,
)
async def test_a_bad_key_is_refused_before_any_io(held: Cache, operation: str, key: object) -> None:
    error = await refused(held, KEY_CALLS[operation](key), InvalidKeyError)
    assert "key" in str(error)


@pytest.mark.parametrize("case", sorted(OTHER_CALLS))
async def test_a_bad_argument_is_refused_before_any_io(held: Cache, case: str) -> None:
    call, error = OTHER_CALLS[case]
    await refused(held, call, error)


@pytest.mark.parametrize("kwargs", BAD_POLICIES, ids=repr)
async def test_a_bad_policy_is_refused_before_any_io(held: Cache, kwargs: dict[str, Any]) -> None:
    # Whether built for the call or through @cached, a bad policy never reaches Redis.
    with pytest.raises(ConfigurationError) as info:
        Policy(**kwargs)
    assert info.value.field in kwargs
    if set(kwargs) == {"ttl"}:
        with pytest.raises(ConfigurationError):
            cached(held, ttl=kwargs["ttl"])(load)


async def test_a_loader_that_is_not_async_is_named_on_its_first_miss(
    client: redis.Redis, namespace: str
) -> None:
    """
    Not before I/O: a plain function returning a coroutine (a lambda) is a valid loader, so
    a sync one is found out when called, after the read that found a miss. It is still a
    named error, and it leaves no lock behind.
    """
    calls: list[int] = []

    def sync_load() -> int:
        calls.append(1)
        return 1

    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        with pytest.raises(ConfigurationError, match="non-awaitable"):
            await cache.get_or_load("k", sync_load)  # type: ignore[arg-type]
        assert calls == [1]
        assert await cache.get_or_load("k", lambda: load_one()) == 1
    await assert_nothing_left(client, namespace)


async def load_one() -> int:
    return 1
