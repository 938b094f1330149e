"""Small asyncio helpers shared by modules that may not import each other."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TypeVar

__all__ = ("aiter_of",)

T = TypeVar("T")


async def aiter_of(items: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    """Iterate ``items`` asynchronously, whether it is an async or a plain iterable."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
