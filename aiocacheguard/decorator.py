"""
`cached`: turn an async loader into a cached one, with its exact signature kept for type checkers.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import string
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

from .cache import Cache
from .errors import ConfigurationError, InvalidKeyError
from .policy import Policy

__all__ = ("Cached", "cached")

P = ParamSpec("P")
Q = ParamSpec("Q")
T = TypeVar("T")
S = TypeVar("S")

#: Default keys whose argument part is longer than this are hashed (SHA-256), so any
#: arguments make a key within the Cache's limit.
_MAX_PLAIN_ARGS = 200


def cached(
    cache: Cache,
    *,
    ttl: float | None = None,
    key: str | None = None,
    policy: Policy | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], Cached[P, T]]:
    """
    Cache an ``async def`` through ``cache.get_or_load``: everything the Cache guards
    (single-flight, rebuild lock, soft expiry, negative results, Bloom) applies unchanged.

    Args:
        cache: The `Cache` to use.
        ttl: Shortcut for ``policy=replace(cache.policy, ttl=ttl)``.
        key: A `str.format` template naming the function's parameters, e.g.
            ``"user:{user_id}"`` (attributes work too: ``"{self.tenant}:{user_id}"``). Checked
            against the signature when the decorator is applied. Default: the function's
            module and qualified name with its bound arguments as JSON, the same in every
            process and for positional and keyword spellings of a call; ``self``/``cls`` are
            left out, so instances share entries unless a template names them.
        policy: The `Policy` of the entries; default the Cache's.

    Returns:
        A decorator giving a `Cached` wrapper with ``.invalidate(...)``, ``.refresh(...)`` and
        ``.cache_key(...)`` taking the function's own arguments.

    Raises:
        ConfigurationError: the function is not ``async def``, or the template names a
            parameter the function does not have.

    Example:
        >>> import asyncio, redis.asyncio as redis
        >>> from aiocacheguard import Cache, Policy, cached
        >>> from aiocacheguard.testing import RedisServer
        >>> async def main(port: int) -> None:
        ...     client = redis.Redis(port=port)
        ...     async with Cache(client, namespace="doc", policy=Policy(ttl=30.0)) as cache:
        ...         @cached(cache, key="user:{user_id}")
        ...         async def get_user(user_id: int) -> dict[str, object] | None:
        ...             return {"id": user_id, "name": "Ada"}
        ...         print(await get_user(1), get_user.cache_key(user_id=1))
        ...         print(await get_user.invalidate(1))
        ...     await client.aclose()
        >>> with RedisServer() as server:
        ...     asyncio.run(main(server.port))
        {'id': 1, 'name': 'Ada'} user:1
        True
    """
    if not isinstance(cache, Cache):
        raise ConfigurationError("cache", cache, "an aiocacheguard.Cache")
    effective = policy if policy is not None else cache.policy
    if ttl is not None:
        effective = replace(effective, ttl=ttl)

    def decorate(fn: Callable[P, Awaitable[T]]) -> Cached[P, T]:
        return Cached(fn, cache=cache, policy=effective, key=key)

    return decorate


class Cached(Generic[P, T]):
    """
    A cached async function (see `cached`). Call it like the function it wraps.

    Accessed on an instance (a decorated method) it binds that instance, like a function does.
    """

    __name__: str
    __qualname__: str

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]],
        *,
        cache: Cache,
        policy: Policy,
        key: str | None,
        _bound: object = None,
        _has_instance: bool = False,
    ) -> None:
        if inspect.isasyncgenfunction(fn) or not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                "fn",
                getattr(fn, "__qualname__", fn),
                "an async def function (cached() awaits it); wrap sync code in one",
            )
        self.__wrapped__ = fn
        self.cache = cache
        self.policy = policy
        self._signature = inspect.signature(fn)
        self._template = key
        self._bound = _bound
        self._has_instance = _has_instance
        self._prefix = f"{fn.__module__}.{fn.__qualname__}"
        if key is not None:
            _check_template(key, self._signature, self._prefix)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<Cached {self._prefix} namespace={self.cache.namespace!r}>"

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._attribute = name

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Self: ...

    @overload
    def __get__(
        self: Cached[Concatenate[S, Q], T], instance: S, owner: type[Any]
    ) -> Cached[Q, T]: ...

    def __get__(self, instance: object, owner: type[Any]) -> Any:
        if instance is None:
            return self
        # A shallow copy bound to the instance (signature and template were checked once),
        # kept in the instance's __dict__ where it has one, as functools.cached_property does:
        # later accesses find it there and never reach this method.
        bound = object.__new__(Cached)
        bound.__dict__.update(self.__dict__)
        bound._bound = instance
        bound._has_instance = True
        name = self.__dict__.get("_attribute")
        namespace = getattr(instance, "__dict__", None)
        if name is not None and namespace is not None:
            namespace[name] = bound
        return bound

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        if self._has_instance:
            args = (self._bound, *args)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self._prefix}(): {exc}") from None
        bound.apply_defaults()
        return bound

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key of a call with these arguments (no I/O)."""
        bound = self._arguments(args, kwargs)
        if self._template is not None:
            return self._template.format(**bound.arguments)
        parts = []
        for name, value in bound.arguments.items():
            if name in ("self", "cls") and next(iter(bound.arguments)) == name:
                continue
            try:
                encoded = json.dumps(value, sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError):
                raise InvalidKeyError(
                    f"argument {name!r} of {self._prefix} ({type(value).__name__}) cannot be "
                    f"part of a cache key; pass key='...{{{name}.id}}...' or another template "
                    "naming what identifies it"
                ) from None
            parts.append(f"{name}={encoded}")
        joined = ",".join(parts)
        if len(joined) > _MAX_PLAIN_ARGS:
            joined = "sha256:" + hashlib.sha256(joined.encode()).hexdigest()
        return f"{self._prefix}({joined})"

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        key = self.cache_key(*args, **kwargs)
        return await self.cache.get_or_load(key, self._loader(args, kwargs), policy=self.policy)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the entry of a call with these arguments; whether one was cached."""
        return await self.cache.delete(self.cache_key(*args, **kwargs))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the function again for these arguments, cache and return the new value."""
        key = self.cache_key(*args, **kwargs)
        return await self.cache.refresh(key, self._loader(args, kwargs), policy=self.policy)

    def _loader(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Awaitable[T]]:
        fn: Callable[..., Awaitable[T]] = self.__wrapped__
        if self._has_instance:
            return functools.partial(fn, self._bound, *args, **kwargs)
        return functools.partial(fn, *args, **kwargs)


def _check_template(template: str, signature: inspect.Signature, where: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigurationError("key", template, f"a valid str.format template ({exc})") from None
    names = set(signature.parameters)
    for field in fields:
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root not in names:
            raise ConfigurationError(
                "key",
                template,
                f"a template naming parameters of {where}; {root or '{}'!r} is not one "
                f"(it has: {', '.join(names) or 'none'})",
            )
