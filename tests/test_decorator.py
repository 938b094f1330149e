"""@cached on real Redis: keys, errors at decoration time, methods, and the guards through it."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from dataclasses import dataclass

import pytest

from aiocacheguard import (
    BloomFilter,
    Cache,
    Cached,
    ConfigurationError,
    InvalidKeyError,
    Policy,
    cached,
)

from .helpers import command_calls


def test_default_key_is_stable_and_spelling_independent(cache: Cache) -> None:
    @cached(cache)
    async def search(term: str, limit: int = 10, *, exact: bool = False) -> list[str]:
        return []

    key = search.cache_key("ada", 10)
    assert key == search.cache_key("ada") == search.cache_key(term="ada", limit=10)
    assert key == search.cache_key("ada", exact=False)
    assert key == f'{__name__}.{search.__qualname__}(term="ada",limit=10,exact=false)'
    assert search.cache_key("ada", 11) != key
    assert search.cache_key("grace") != key
    assert search.cache_key("ada", exact=True) != key


def test_default_key_is_the_same_in_another_process(cache: Cache) -> None:
    code = "from tests.test_decorator import key_in_a_fresh_process as f; print(f())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == key_in_a_fresh_process()


async def lookup(user_id: int, fields: tuple[str, ...] = ("name",)) -> None:
    return None


def key_in_a_fresh_process() -> str:
    """The default key of one call, computed with no connection (building a key needs none)."""
    import redis.asyncio as redis

    cache = Cache(redis.Redis(port=1), namespace="keys", policy=Policy(ttl=1.0))
    return cached(cache)(lookup).cache_key(42, fields=("name", "email"))


def test_long_arguments_are_hashed(cache: Cache) -> None:
    @cached(cache)
    async def report(ids: list[int]) -> int:
        return 0

    key = report.cache_key(list(range(1000)))
    assert "sha256:" in key and len(key) < 300
    assert key == report.cache_key(ids=list(range(1000)))


def test_template_is_checked_when_decorating(cache: Cache) -> None:
    with pytest.raises(ConfigurationError, match=r"'userid' is not one \(it has: user_id\)"):

        @cached(cache, key="user:{userid}")
        async def get_user(user_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match="template"):

        @cached(cache, key="user:{")
        async def broken(user_id: int) -> None: ...


def test_sync_functions_are_refused_when_decorating(cache: Cache) -> None:
    with pytest.raises(ConfigurationError, match="async def"):

        @cached(cache)  # type: ignore[arg-type]
        def get_user(user_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match="async def"):

        @cached(cache)  # type: ignore[arg-type]
        async def stream() -> object:  # an async generator
            yield 1


def test_unserializable_argument_names_the_parameter(cache: Cache) -> None:
    @cached(cache)
    async def price(item: object, currency: str) -> int:
        return 1

    with pytest.raises(InvalidKeyError, match=r"argument 'item' .*\(object\)"):
        price.cache_key(object(), "EUR")


def test_wrong_arguments_fail_like_the_function(cache: Cache) -> None:
    @cached(cache)
    async def get(user_id: int) -> int:
        return user_id

    with pytest.raises(TypeError, match="get"):
        get.cache_key(1, 2)  # type: ignore[call-arg]


async def test_calls_hit_the_cache_and_invalidate_and_refresh(cache: Cache) -> None:
    calls = 0

    @cached(cache, ttl=30.0, key="user:{user_id}")
    async def get_user(user_id: int) -> dict[str, object]:
        nonlocal calls
        calls += 1
        return {"id": user_id, "version": calls}

    assert await get_user(1) == {"id": 1, "version": 1}
    assert await get_user(user_id=1) == {"id": 1, "version": 1}
    assert calls == 1
    assert await cache.get("user:1") == {"id": 1, "version": 1}
    assert await get_user.refresh(1) == {"id": 1, "version": 2}
    assert await get_user(1) == {"id": 1, "version": 2}
    assert await get_user.invalidate(1) is True
    assert await get_user.invalidate(1) is False
    assert await get_user(1) == {"id": 1, "version": 3}


async def test_single_flight_through_the_decorator(cache: Cache, client: object) -> None:
    release = asyncio.Event()
    calls = 0

    @cached(cache)
    async def board() -> list[int]:
        nonlocal calls
        calls += 1
        await release.wait()
        return [1, 2]

    tasks = [asyncio.create_task(board()) for _ in range(1000)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == [[1, 2]] * 1000
    assert calls == 1


async def test_negative_results_and_bloom_through_the_decorator(
    client: object, namespace: str
) -> None:
    bloom = BloomFilter("users", capacity=1000, error_rate=0.01)
    import redis.asyncio as redis

    assert isinstance(client, redis.Redis)
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0), bloom=bloom) as cache:
        calls = 0

        @cached(cache, key="user:{user_id}")
        async def find(user_id: int) -> dict[str, int] | None:
            nonlocal calls
            calls += 1
            return {"id": user_id} if user_id == 1 else None

        await bloom.add("user:1", "user:2")
        assert await find(1) == {"id": 1}
        assert await find(2) is None and await find(2) is None
        assert await find(3) is None  # the filter: never added
        assert calls == 2
        stats = cache.statistics()
        assert (stats.negative_hits, stats.bloom_rejected) == (1, 1)


@dataclass
class Shop:
    tenant: str
    calls: int = 0


async def test_methods_share_entries_unless_the_template_names_self(cache: Cache) -> None:
    class Catalog:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant
            self.calls = 0

        @cached(cache)
        async def price(self, sku: str) -> int:
            self.calls += 1
            return len(sku)

        @cached(cache, key="{self.tenant}:stock:{sku}")
        async def stock(self, sku: str) -> str:
            self.calls += 1
            return f"{self.tenant}:{sku}"

    a, b = Catalog("a"), Catalog("b")
    assert await a.price("xyz") == 3 and await b.price("xyz") == 3
    assert a.calls + b.calls == 1  # self is not part of the default key
    assert a.price.cache_key("xyz") == b.price.cache_key("xyz")
    assert await a.stock("1") == "a:1" and await b.stock("1") == "b:1"
    assert b.stock.cache_key("1") == "b:stock:1"
    assert await a.stock.invalidate("1") is True
    assert isinstance(Catalog.price, Cached)


def test_a_bound_method_is_made_once_per_instance(cache: Cache) -> None:
    """Binding used to rebuild the wrapper (signature, template check) on every access."""

    class Catalog:
        @cached(cache, key="{self.tenant}:{sku}")
        async def price(self, sku: str) -> int:
            return len(sku)

        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

    a, b = Catalog("a"), Catalog("b")
    assert a.price is a.price and b.price is b.price and a.price is not b.price
    assert a.price.cache_key("x") == "a:x" and b.price.cache_key("x") == "b:x"

    class Slotted:
        __slots__ = ("tenant",)

        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

        @cached(cache, key="{self.tenant}:{sku}")
        async def price(self, sku: str) -> int:
            return len(sku)

    assert Slotted("s").price.cache_key("x") == "s:x"  # no __dict__: a fresh binding each time


def test_frameworks_see_a_coroutine_function(cache: Cache) -> None:
    @cached(cache)
    async def get() -> int:
        return 1

    assert inspect.iscoroutinefunction(get.__call__)
    assert get.__name__ == "get" and get.__wrapped__ is not None
    assert "get" in repr(get)


async def test_one_read_for_a_present_key(cache: Cache, client: object) -> None:
    import redis.asyncio as redis

    assert isinstance(client, redis.Redis)

    @cached(cache)
    async def value() -> int:
        return 7

    await value()
    before = await command_calls(client, "get", "getrange", "mget")
    assert await asyncio.gather(*(value() for _ in range(500))) == [7] * 500
    assert await command_calls(client, "get", "getrange", "mget") - before == 1
