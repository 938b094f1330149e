"""
A hit returns what the miss returned: values decoded into the declared type, through a second
Cache (another process's view: a real Redis hit, nothing shared in memory).
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple, TypedDict

import pydantic  # the dev extra's: typed decoding supports its models
import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy, SerializationError, cached


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Row:
    id: int
    name: str
    tags: tuple[str, ...]
    seen: dt.datetime


class Point(NamedTuple):
    x: int
    y: int


class Movie(TypedDict):
    title: str
    year: int


CASES: list[tuple[object, Any]] = [
    ((1, "a", 2.5), tuple[int, str, float]),
    ({1, 2, 3}, set[int]),
    (frozenset({"a", "b"}), frozenset[str]),
    (dt.datetime(2026, 11, 26, 9, 30, tzinfo=dt.UTC), dt.datetime),
    (dt.datetime(2026, 11, 26, 9, 30), dt.datetime),
    (dt.date(2026, 11, 26), dt.date),
    (Decimal("12.3400"), Decimal),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.UUID),
    (Color.BLUE, Color),
    ({1: "one", 2: "two"}, dict[int, str]),
    (Row(7, "ada", ("x", "y"), dt.datetime(2026, 1, 1, tzinfo=dt.UTC)), Row),
    (Point(1, 2), Point),
    (Movie(title="Alien", year=1979), Movie),
    (None, Row | None),
    (Point(3, 4), Point | None),
    ([Point(1, 2), Point(3, 4)], list[Point]),
]


@pytest.mark.parametrize(("value", "declared"), CASES, ids=[repr(t) for _, t in CASES])
async def test_a_hit_returns_what_the_miss_returned(
    client: redis.Redis, namespace: str, value: object, declared: Any
) -> None:
    policy = Policy(ttl=30.0, negative_ttl=30.0)

    async def load() -> object:
        return value

    async with Cache(client, namespace=namespace, policy=policy) as writer:
        assert await writer.get_or_load("k", load, returns=declared) == value

    async def never() -> object:
        raise AssertionError("a hit")

    async with Cache(client, namespace=namespace, policy=policy) as reader:
        got = await reader.get_or_load("k", never, returns=declared)
        assert got == value and type(got) is type(value)
        assert await reader.get("k", returns=declared) == value
        assert reader.statistics().hits + reader.statistics().negative_hits == 2


async def test_without_a_declared_type_a_hit_is_plain_json(cache: Cache) -> None:
    async def load() -> tuple[int, int]:
        return (1, 2)

    assert await cache.get_or_load("k", load) == (1, 2)  # the miss: the loader's tuple
    assert await cache.get("k") == [1, 2]  # untyped hits are JSON's list


async def test_a_stored_value_of_another_type_is_a_counted_miss(
    client: redis.Redis, namespace: str
) -> None:
    """A deploy that changes a return type reloads old entries instead of failing on them."""
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as old:
        await old.set("k", {"id": 1})
    calls = 0

    async def load() -> Point:
        nonlocal calls
        calls += 1
        return Point(5, 6)

    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as new:
        assert await new.get_or_load("k", load, returns=Point) == Point(5, 6)
        assert calls == 1 and new.statistics().decode_errors >= 1
        assert await new.get_or_load("k", load, returns=Point) == Point(5, 6)
        assert calls == 1  # replaced by the fill: now a hit


async def test_a_type_the_serializer_cannot_decode_into_fails_before_any_io(
    cache: Cache,
) -> None:
    async def load() -> object:
        raise AssertionError("never called")

    with pytest.raises(SerializationError):
        await cache.get_or_load("k", load, returns=dt.date | str)


async def test_cached_decodes_hits_into_the_declared_return_type(
    client: redis.Redis, namespace: str
) -> None:
    async with (
        Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as first,
        Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as second,
    ):

        @cached(first, key="row:{row_id}")
        async def load_row(row_id: int) -> Row:
            return Row(row_id, "ada", ("a",), dt.datetime(2026, 1, 1, tzinfo=dt.UTC))

        @cached(second, key="row:{row_id}")
        async def read_row(row_id: int) -> Row:
            raise AssertionError("a hit")

        miss = await load_row(3)
        hit = await read_row(3)
        assert hit == miss and isinstance(hit, Row) and isinstance(hit.tags, tuple)


async def test_a_pydantic_model_round_trips(client: redis.Redis, namespace: str) -> None:
    class User(pydantic.BaseModel):
        id: int
        joined: dt.datetime
        roles: tuple[str, ...]

    user = User(id=1, joined=dt.datetime(2026, 1, 2, tzinfo=dt.UTC), roles=("admin",))

    async def load() -> object:
        return user

    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as writer:
        assert await writer.get_or_load("u", load, returns=User) == user
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as reader:
        got = await reader.get("u", returns=User)
        assert got == user and isinstance(got, User) and got.roles == ("admin",)
