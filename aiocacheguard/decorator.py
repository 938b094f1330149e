"""
`cached`: turn an async loader into a cached one, with its exact signature kept for type checkers.

`CacheRef`: a place for a Cache that does not exist yet, so loaders can be decorated at module
level and bound to the Cache an app creates when it starts (a FastAPI or Starlette lifespan).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import string
import sys
import typing
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import SimpleNamespace, TracebackType
from typing import Any, Concatenate, Final, Generic, ParamSpec, Self, TypeVar, overload

from .cache import Cache
from .errors import CacheNotBoundError, ConfigurationError, InvalidKeyError
from .policy import Policy

__all__ = ("CacheRef", "Cached", "cached")

P = ParamSpec("P")
Q = ParamSpec("Q")
T = TypeVar("T")
S = TypeVar("S")

#: Default keys whose argument part is longer than this are hashed (SHA-256), so any
#: arguments make a key within the Cache's limit.
_MAX_PLAIN_ARGS = 200

#: `Cached.returns` before its annotation could be resolved (it names something defined later).
_UNRESOLVED: Final[Any] = object()


def cached(
    cache: Cache | CacheRef,
    *,
    ttl: float | None = None,
    key: str | None = None,
    policy: Policy | None = None,
) -> Callable[[Callable[P, Awaitable[T]]], Cached[P, T]]:
    """
    Cache an ``async def`` through ``cache.get_or_load``: everything the Cache guards
    (single-flight, rebuild lock, soft expiry, negative results, Bloom) applies unchanged.

    Args:
        cache: The `Cache` to use, or a `CacheRef` bound to one later (a loader declared at
            module level, before the app that creates the Cache has started).
        ttl: Shortcut for ``policy=replace(cache.policy, ttl=ttl)``. With a `CacheRef` and
            no ``policy``, the policy is that of the Cache the ref is bound to at call time.
        key: A `str.format` template naming the function's parameters, e.g.
            ``"user:{user_id}"`` (attributes work too: ``"{self.tenant}:{user_id}"``). Checked
            against the signature when the decorator is applied. Default: the function's
            module and qualified name with its bound arguments as JSON, the same in every
            process and for positional and keyword spellings of a call; ``self``/``cls`` are
            left out, so instances share entries unless a template names them.
        policy: The `Policy` of the entries; default the Cache's.

    Returns:
        A decorator giving a `Cached` wrapper with ``.invalidate(...)``, ``.refresh(...)`` and
        ``.cache_key(...)`` taking the function's own arguments, and ``.returns``, its
        declared return type.

    Raises:
        ConfigurationError: ``cache`` is neither a `Cache` nor a `CacheRef`, ``ttl`` is out
            of range, the function is not ``async def``, or the template names a parameter
            the function does not have. A return type that does not resolve (see `Cached.returns`)
            raises it too: here, or at the first call if it names something defined later.

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
    if not isinstance(cache, Cache | CacheRef):
        raise ConfigurationError("cache", cache, "an aiocacheguard.Cache or CacheRef")
    if policy is None and isinstance(cache, Cache):
        policy = cache.policy
    if ttl is not None:
        if policy is not None:
            policy = replace(policy, ttl=ttl)
        else:
            Policy(ttl=ttl)  # checks it now; the ref's Cache gives the other fields later

    def decorate(fn: Callable[P, Awaitable[T]]) -> Cached[P, T]:
        # The scope applying the decorator: the return annotation may name a class local to it
        # (a function's, a class body's), which the function's globals do not hold.
        frame = sys._getframe(1)
        scope = None if frame.f_locals is frame.f_globals else dict(frame.f_locals)
        return Cached(fn, cache=cache, policy=policy, key=key, ttl=ttl, _scope=scope)

    return decorate


class CacheRef:
    """
    A Cache named before it exists: decorate loaders with ``@cached(cache_ref, ...)`` at module
    level, and bind the ref to the Cache the app creates when it starts.

    A Cache belongs to the event loop it runs in and cannot be used after `Cache.aclose`,
    while an app's lifespan can run more than once in one process (each test client runs it
    again). So the Cache is created in the lifespan, and bound there:

        cache_ref = CacheRef()

        @cached(cache_ref, ttl=30.0, key="user:{user_id}")
        async def get_user(user_id: int) -> dict[str, object] | None: ...

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with Cache(client, namespace="shop", policy=Policy(ttl=30.0)) as cache:
                with cache_ref.bind(cache):
                    yield

    Guarantees:
        - `bind` takes effect at once and replaces any Cache bound before, so the next
          lifespan simply binds its new Cache. Used in ``with``, it also unbinds when the
          block ends (if no other Cache was bound since).
        - Calling a loader of an unbound ref, or reading `cache`, raises `CacheNotBoundError`
          saying how to bind, rather than reaching a closed Cache or a global default.
        - A call through a ref costs one attribute read more than one through a Cache.

    Limitations:
        - One Cache at a time: two apps running at the same time in one process (two test
          clients open together) need a ref each, or the second bind takes over the first
          app's loaders.
        - With ``ttl=`` and no ``policy=``, a decorated loader's policy is derived from the
          bound Cache's at its first call through that Cache, so a ``ttl`` that contradicts
          the Cache's policy (not above its ``soft_ttl``) raises `ConfigurationError` then.

    Example:
        >>> import asyncio, redis.asyncio as redis
        >>> from aiocacheguard import Cache, CacheNotBoundError, CacheRef, Policy, cached
        >>> from aiocacheguard.testing import RedisServer
        >>> cache_ref = CacheRef()
        >>> @cached(cache_ref, key="user:{user_id}")
        ... async def get_user(user_id: int) -> dict[str, object] | None:
        ...     return {"id": user_id}
        >>> async def lifespan(port: int) -> None:
        ...     client = redis.Redis(port=port)
        ...     async with Cache(client, namespace="doc-ref", policy=Policy(ttl=30.0)) as cache:
        ...         with cache_ref.bind(cache):
        ...             print(await get_user(1), cache_ref)
        ...     await client.aclose()
        >>> with RedisServer() as server:
        ...     asyncio.run(lifespan(server.port))
        ...     asyncio.run(lifespan(server.port))  # a second lifespan, a new Cache
        {'id': 1} <CacheRef bound to namespace 'doc-ref'>
        {'id': 1} <CacheRef bound to namespace 'doc-ref'>
        >>> asyncio.run(get_user(1))
        Traceback (most recent call last):
        ...
        aiocacheguard.errors.CacheNotBoundError: ...get_user uses a CacheRef that is not bound...
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: Cache | None = None

    def __repr__(self) -> str:
        if self._cache is None:
            return "<CacheRef unbound>"
        return f"<CacheRef bound to namespace {self._cache.namespace!r}>"

    def bind(self, cache: Cache) -> _Binding:
        """
        Make ``cache`` the Cache of this ref, now; ``with ref.bind(cache):`` also unbinds at
        the end of the block.

        Returns:
            A context manager whose ``as`` target is ``cache``.

        Raises:
            ConfigurationError: ``cache`` is not a `Cache`.
        """
        if not isinstance(cache, Cache):
            raise ConfigurationError("cache", cache, "an aiocacheguard.Cache")
        self._cache = cache
        return _Binding(self, cache)

    def unbind(self) -> None:
        """Bind no Cache: calls through this ref raise `CacheNotBoundError` until `bind`."""
        self._cache = None

    @property
    def bound(self) -> bool:
        """Whether a Cache is bound."""
        return self._cache is not None

    @property
    def cache(self) -> Cache:
        """
        The bound Cache (for a FastAPI dependency, say).

        Raises:
            CacheNotBoundError: no Cache is bound.
        """
        return self._require("this CacheRef")

    def _require(self, user: str) -> Cache:
        cache = self._cache
        if cache is None:
            raise CacheNotBoundError(
                f"{user} uses a CacheRef that is not bound to a Cache: create the Cache when "
                "the app starts and bind it there, e.g. in the lifespan: "
                "`async with Cache(...) as cache: with cache_ref.bind(cache): yield`"
            )
        return cache


class _Binding:
    """What `CacheRef.bind` returns: ``with`` it to unbind at the end of the block."""

    __slots__ = ("_cache", "_ref")

    def __init__(self, ref: CacheRef, cache: Cache) -> None:
        self._ref = ref
        self._cache = cache

    def __enter__(self) -> Cache:
        return self._cache

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ref._cache is self._cache:  # not if the next lifespan has bound its own
            self._ref.unbind()


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
        cache: Cache | CacheRef,
        policy: Policy | None,
        key: str | None,
        ttl: float | None = None,
        _scope: dict[str, Any] | None = None,
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
        self._source = cache
        # A fixed policy, or (a CacheRef's loader without one) the bound Cache's policy with
        # ``ttl`` replaced, derived once per Cache: `replace` validates, too slow for each call.
        self._policy = cache.policy if policy is None and isinstance(cache, Cache) else policy
        self._ttl = ttl
        self._derived: tuple[Cache, Policy] | None = None
        self._signature = inspect.signature(fn)
        self._template = key
        self._bound = _bound
        self._has_instance = _has_instance
        self._prefix = f"{fn.__module__}.{fn.__qualname__}"
        if key is not None:
            _check_template(key, self._signature, self._prefix)
        functools.update_wrapper(self, fn)
        try:
            self._returns = _declared_return(fn, _scope)
            self._scope = None
        except ConfigurationError:  # names something defined later: resolved at first use
            self._returns = _UNRESOLVED
            self._scope = _scope

    @property
    def returns(self) -> Any:
        """
        The declared return type of the function, which cached hits are to be decoded into;
        `typing.Any` when it has none. Resolved when decorated (in the function's module and the
        scope it is decorated in), or at first use if it names something defined later.

        Raises:
            ConfigurationError: the annotation names something neither defines, or a class
                it names (a dataclass, NamedTuple, TypedDict, msgspec Struct) has a field
                annotation that does not resolve in that class's module. Checked when
                decorated where that succeeds; else here, at first use (every call asks), so
                a class defined further down the module is fine.
        """
        if self._returns is _UNRESOLVED:
            self._returns = _declared_return(self.__wrapped__, self._scope)
            self._scope = None
        return self._returns

    @property
    def cache(self) -> Cache:
        """
        The Cache that calls go to: the one given, or the one its `CacheRef` is bound to now.

        Raises:
            CacheNotBoundError: the `CacheRef` is bound to no Cache.
        """
        return self._target()[0]

    @property
    def policy(self) -> Policy:
        """
        The policy of the entries (see `cache` for its `CacheRef` case).

        Raises:
            CacheNotBoundError: the policy comes from a `CacheRef` bound to no Cache.
        """
        if self._policy is not None:
            return self._policy
        return self._target()[1]

    def _target(self) -> tuple[Cache, Policy]:
        source = self._source
        cache = source if isinstance(source, Cache) else source._require(self._prefix)
        if self._policy is not None:
            return cache, self._policy
        derived = self._derived
        if derived is None or derived[0] is not cache:
            policy = cache.policy if self._ttl is None else replace(cache.policy, ttl=self._ttl)
            derived = self._derived = (cache, policy)
        return derived

    def __repr__(self) -> str:
        source = self._source
        where = f"namespace={source.namespace!r}" if isinstance(source, Cache) else repr(source)
        return f"<Cached {self._prefix} {where}>"

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
        cache, policy = self._target()
        key = self.cache_key(*args, **kwargs)
        loader = self._loader(args, kwargs)
        return await cache.get_or_load(key, loader, policy=policy, returns=self.returns)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the entry of a call with these arguments; whether one was cached."""
        cache = self._target()[0]
        return await cache.delete(self.cache_key(*args, **kwargs))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """
        Call the function again for these arguments, cache and return the new value; raises
        as `Cache.refresh` does when it could not be written (a `BackendError`, say).
        """
        cache, policy = self._target()
        key = self.cache_key(*args, **kwargs)
        loader = self._loader(args, kwargs)
        return await cache.refresh(key, loader, policy=policy, returns=self.returns)

    def _loader(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Awaitable[T]]:
        fn: Callable[..., Awaitable[T]] = self.__wrapped__
        if self._has_instance:
            return functools.partial(fn, self._bound, *args, **kwargs)
        return functools.partial(fn, *args, **kwargs)


def _declared_return(fn: Callable[..., object], scope: dict[str, Any] | None) -> Any:
    """The return annotation of ``fn`` evaluated (strings included), or `typing.Any`."""
    annotation = inspect.get_annotations(fn).get("return", Any)
    # Only the return annotation: a parameter's that does not resolve must not matter here.
    holder = SimpleNamespace(__annotations__={"return": annotation})
    try:
        returns = typing.get_type_hints(
            holder, globalns=getattr(fn, "__globals__", {}), localns=scope
        )["return"]
    except Exception as exc:  # NameError mostly; any annotation that does not evaluate
        raise ConfigurationError(
            "returns",
            annotation,
            f"a return annotation of {fn.__module__}.{fn.__qualname__} naming types defined "
            f"where the function is ({type(exc).__name__}: {exc})",
        ) from None
    # The classes it names are decoded field by field: their annotations must resolve too
    # (msgspec resolves them on the first hit, and would raise the NameError there).
    try:
        _resolve_fields(returns)
    except Exception as exc:
        raise ConfigurationError(
            "returns",
            annotation,
            f"a return type of {fn.__module__}.{fn.__qualname__} whose classes' field "
            f"annotations resolve in their modules ({type(exc).__name__}: {exc})",
        ) from None
    return returns


def _resolve_fields(tp: object) -> None:
    """
    Evaluate the field annotations of every class with fields (dataclass, NamedTuple,
    TypedDict, msgspec Struct, attrs class) that ``tp`` names, recursively; raises what fails.
    """
    seen: set[int] = set()
    stack = [tp]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        stack += typing.get_args(item)
        origin = typing.get_origin(item)
        if origin is not None:
            stack.append(origin)
        if isinstance(item, type) and (
            dataclasses.is_dataclass(item)
            or typing.is_typeddict(item)
            or (issubclass(item, tuple) and hasattr(item, "_fields"))
            or hasattr(item, "__struct_fields__")
            or hasattr(item, "__attrs_attrs__")
        ):
            stack += typing.get_type_hints(item).values()


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
