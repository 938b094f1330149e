"""CacheRef: loaders decorated before their Cache exists, bound when the app starts."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from aiocacheguard import (
    Cache,
    CacheClosedError,
    CacheNotBoundError,
    CacheRef,
    ConfigurationError,
    Policy,
    cached,
)
from aiocacheguard.testing import RedisServer


async def test_an_unbound_loader_says_how_to_bind() -> None:
    ref = CacheRef()

    @cached(ref, key="user:{user_id}")
    async def get_user(user_id: int) -> int:
        raise AssertionError("never called while unbound")

    assert get_user.cache_key(1) == "user:1"  # building a key needs no Cache
    message = r"test_cache_ref\..*get_user uses a CacheRef that is not bound .*cache_ref\.bind"
    with pytest.raises(CacheNotBoundError, match=message):
        await get_user(1)
    with pytest.raises(CacheNotBoundError):
        await get_user.invalidate(1)
    with pytest.raises(CacheNotBoundError):
        await get_user.refresh(1)
    with pytest.raises(CacheNotBoundError, match="this CacheRef"):
        ref.cache  # noqa: B018
    assert isinstance(CacheNotBoundError("x"), RuntimeError)
    assert repr(ref) == "<CacheRef unbound>" and "<CacheRef unbound>" in repr(get_user)


async def test_bind_in_a_with_block_unbinds_at_its_end(client: redis.Redis, namespace: str) -> None:
    ref = CacheRef()
    calls = 0

    @cached(ref, key="user:{user_id}")
    async def get_user(user_id: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"id": user_id, "calls": calls}

    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        with ref.bind(cache) as bound:
            assert bound is cache and ref.cache is cache and get_user.cache is cache
            assert await get_user(1) == await get_user(1) == {"id": 1, "calls": 1}
            assert await get_user.invalidate(1) is True
            assert await get_user.refresh(1) == {"id": 1, "calls": 2}
            assert repr(ref) == f"<CacheRef bound to namespace {namespace!r}>"
        assert not ref.bound
        with pytest.raises(CacheNotBoundError):
            await get_user(1)


def test_each_lifespan_binds_its_own_cache(redis_server: RedisServer, namespace: str) -> None:
    """As a test client runs an app's lifespan: each time in a new event loop, a new Cache."""
    ref = CacheRef()
    calls = 0

    @cached(ref, key="board")
    async def board() -> list[int]:
        nonlocal calls
        calls += 1
        return [calls]

    caches: list[Cache] = []

    async def lifespan() -> list[int]:
        client = redis.Redis(port=redis_server.port)
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            caches.append(cache)
            with ref.bind(cache):
                value = await board()
        await client.aclose()
        return value

    assert asyncio.run(lifespan()) == [1]
    assert asyncio.run(lifespan()) == [1]  # the second Cache reads what the first wrote
    assert calls == 1 and caches[0] is not caches[1]
    assert caches[1].statistics().hits == 1


async def test_binding_again_replaces_and_an_old_block_leaves_the_new_binding(
    client: redis.Redis, namespace: str
) -> None:
    ref = CacheRef()

    @cached(ref, key="k")
    async def value() -> str:
        return "v"

    first = Cache(client, namespace=namespace + "-1", policy=Policy(ttl=30.0))
    second = Cache(client, namespace=namespace + "-2", policy=Policy(ttl=30.0))
    with ref.bind(first):
        await value()
        await first.aclose()
        with pytest.raises(CacheClosedError):  # a closed Cache stays closed...
            await value()
        ref.bind(second)  # ...and the next lifespan binds a new one (no unbind needed)
        assert await value() == "v" and value.cache is second
    assert ref.cache is second  # leaving the first block did not unbind the second Cache
    assert second.statistics().loader_calls == 1
    ref.unbind()
    assert not ref.bound
    await second.aclose()


async def test_ttl_applies_to_the_policy_of_whichever_cache_is_bound(
    client: redis.Redis, namespace: str
) -> None:
    ref = CacheRef()

    @cached(ref, ttl=7.0)
    async def short() -> int:
        return 1

    @cached(ref)
    async def default() -> int:
        return 1

    @cached(ref, ttl=9.0, policy=Policy(ttl=1.0, negative_ttl=None))
    async def explicit() -> int:
        return 1

    assert explicit.policy == Policy(ttl=9.0, negative_ttl=None)  # known without a Cache
    with pytest.raises(CacheNotBoundError):
        short.policy  # noqa: B018
    a = Cache(client, namespace=namespace, policy=Policy(ttl=30.0, soft_ttl=5.0))
    b = Cache(client, namespace=namespace, policy=Policy(ttl=60.0, lock=False))
    with ref.bind(a):
        assert short.policy == Policy(ttl=7.0, soft_ttl=5.0)
        assert short.policy is short.policy  # derived once per Cache, not per call
        assert default.policy is a.policy
    with ref.bind(b):
        assert short.policy == Policy(ttl=7.0, lock=False)
        assert default.policy is b.policy
    c = Cache(client, namespace=namespace, policy=Policy(ttl=30.0, soft_ttl=8.0))
    with ref.bind(c), pytest.raises(ConfigurationError, match="soft_ttl"):
        await short()  # 7 s is not above this Cache's soft TTL: said at the first call
    for cache in (a, b, c):
        await cache.aclose()


def test_arguments_are_checked_when_decorating() -> None:
    with pytest.raises(ConfigurationError, match="ttl=-1"):
        cached(CacheRef(), ttl=-1)
    with pytest.raises(ConfigurationError, match="Cache or CacheRef"):
        cached("cache")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cache="):
        CacheRef().bind("cache")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="user_idd"):

        @cached(CacheRef(), key="user:{user_idd}")
        async def get_user(user_id: int) -> None: ...


async def test_methods_through_a_ref(client: redis.Redis, namespace: str) -> None:
    ref = CacheRef()

    class Repository:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

        @cached(ref, key="{self.tenant}:{sku}")
        async def price(self, sku: str) -> str:
            return f"{self.tenant}:{sku}"

    repo = Repository("a")
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        with ref.bind(cache):
            assert await repo.price("x") == "a:x"
            assert await cache.get("a:x") == "a:x"
            assert await repo.price.invalidate("x") is True
