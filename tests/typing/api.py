"""
Checked by mypy (strict), never run: the public API keeps its types through the decorator.

Each ``# type: ignore[code]`` marks a call mypy must reject; with ``warn_unused_ignores`` (part
of ``--strict``) the check fails if it stops rejecting it.
"""

from __future__ import annotations

from typing import Any, assert_type

from aiocacheguard import Cache, Cached, CacheRef, Policy, Statistics, cached


async def cache_api(cache: Cache) -> None:
    async def load_board() -> list[str]:
        return ["ada"]

    assert_type(await cache.get_or_load("k", load_board), list[str])
    assert_type(await cache.refresh("k", load_board), list[str])
    assert_type(await cache.get("k"), Any)
    assert_type(await cache.delete("k"), bool)
    assert_type(cache.statistics(), Statistics)
    await cache.set("k", [1], ttl=1.0)
    await cache.get_or_load(1, load_board)  # type: ignore[arg-type]
    await cache.get_or_load("k", load_board, policy=30)  # type: ignore[arg-type]


async def decorator_api(cache: Cache) -> None:
    @cached(cache, ttl=30.0)
    async def get_user(user_id: int, *, fresh: bool = False) -> dict[str, object] | None:
        return None

    assert isinstance(get_user, Cached)
    assert_type(await get_user(1), dict[str, object] | None)
    assert_type(await get_user(user_id=1, fresh=True), dict[str, object] | None)
    assert_type(await get_user.invalidate(1), bool)
    assert_type(await get_user.refresh(1), dict[str, object] | None)
    assert_type(get_user.cache_key(1), str)
    await get_user("1")  # type: ignore[arg-type]
    await get_user.invalidate()  # type: ignore[call-arg]
    get_user.cache_key(nope=1)  # type: ignore[call-arg]

    class Repository:
        @cached(cache, key="sku:{sku}", policy=Policy(ttl=5.0))
        async def price(self, sku: str) -> int:
            return 1

    repo = Repository()
    assert_type(await repo.price("a"), int)
    assert_type(await repo.price.invalidate("a"), bool)
    await repo.price(1)  # type: ignore[arg-type]


cache_ref = CacheRef()


@cached(cache_ref, ttl=30.0, key="user:{user_id}")
async def get_user_later(user_id: int) -> dict[str, object] | None:
    return None


async def cache_ref_api(cache: Cache) -> None:
    with cache_ref.bind(cache) as bound:
        assert_type(bound, Cache)
        assert_type(cache_ref.cache, Cache)
        assert_type(await get_user_later(1), dict[str, object] | None)
        assert_type(await get_user_later.invalidate(user_id=1), bool)
        await get_user_later("1")  # type: ignore[arg-type]
    cache_ref.bind(cache)
    cache_ref.unbind()
    cache_ref.bind(cache_ref)  # type: ignore[arg-type]
    cached("cache")  # type: ignore[arg-type]
