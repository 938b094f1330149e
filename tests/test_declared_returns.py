"""Cached.returns: the declared return type that hits are to be decoded into."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, CacheRef, ConfigurationError, Policy, cached


class Point(NamedTuple):
    x: int
    y: int


@cached(CacheRef())
async def module_level(day: dt.date) -> tuple[Point, ...] | None:
    return None


@cached(CacheRef())
async def defined_later() -> Later:  # names a class defined below it
    return Later()


class Later:
    pass


@dataclass
class Order:
    items: list[Item]  # a class defined below


@cached(CacheRef())
async def order_defined_before_its_fields() -> Order:
    return Order([])


@dataclass
class Item:
    sku: str


@dataclass
class Broken:
    id: int
    owner: Nowhere  # type: ignore[name-defined]  # noqa: F821


@cached(CacheRef())
async def broken_fields() -> list[Broken]:
    raise AssertionError


def test_a_module_level_annotation_is_resolved() -> None:
    assert module_level.returns == tuple[Point, ...] | None
    assert defined_later.returns is Later  # at first use
    assert order_defined_before_its_fields.returns is Order  # its fields, at first use


async def test_a_class_whose_fields_do_not_resolve_is_a_configuration_error(
    client: redis.Redis, namespace: str
) -> None:
    """It used to be resolved by msgspec on the first hit: a raw NameError from every call."""
    with pytest.raises(ConfigurationError, match=r"broken_fields .*field.*NameError.*Nowhere"):
        broken_fields.returns  # noqa: B018
    ref = broken_fields._source
    assert isinstance(ref, CacheRef)
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        with ref.bind(cache), pytest.raises(ConfigurationError, match="Nowhere"):
            await broken_fields()


def test_a_class_local_to_the_decorating_scope_is_resolved() -> None:
    @dataclass
    class Row:
        id: int

    @cached(CacheRef())
    async def load(row_id: int) -> list[Row]:
        return [Row(row_id)]

    assert load.returns == list[Row]

    class Repository:
        @dataclass
        class Price:
            cents: int

        @cached(CacheRef(), key="{sku}")
        async def price(self, sku: str) -> Price:
            return self.Price(1)

    assert Repository.price.returns is Repository.Price
    assert Repository().price.returns is Repository.Price


def test_no_annotation_is_any_and_a_parameter_annotation_does_not_matter() -> None:
    @cached(CacheRef())
    async def untyped(x: Undefined) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    @cached(CacheRef())
    async def unannotated():  # type: ignore[no-untyped-def]
        return 1

    assert untyped.returns is type(None)
    assert unannotated.returns is Any


def test_an_annotation_naming_nothing_says_so_when_asked() -> None:
    @cached(CacheRef())
    async def broken() -> Nowhere:  # type: ignore[name-defined]  # noqa: F821
        raise AssertionError

    with pytest.raises(ConfigurationError, match=r"broken .*NameError.*Nowhere"):
        broken.returns  # noqa: B018
