"""The Cache's everyday operations on a real redis-server."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from aiocacheguard import (
    BackendTimeout,
    BackendUnavailable,
    Cache,
    CacheClosedError,
    ConfigurationError,
    InsecurePickleWarning,
    InvalidKeyError,
    MsgpackSerializer,
    PickleSerializer,
    Policy,
    SerializationError,
)
from aiocacheguard.record import Record
from aiocacheguard.testing import FaultProxy, RedisServer

from .helpers import GatedLoader

MISSING = object()


async def test_set_get_delete(cache: Cache, client: redis.Redis) -> None:
    assert await cache.get("k") is None
    assert await cache.get("k", default=MISSING) is MISSING
    await cache.set("k", {"a": [1, 2]}, ttl=10.0)
    assert await cache.get("k") == {"a": [1, 2]}
    ttl_ms = await client.pttl(cache.keys.value("k"))
    assert 9_000 < ttl_ms <= 10_000
    assert await cache.delete("k") is True
    assert await cache.delete("k") is False
    assert await cache.get("k", default=MISSING) is MISSING


async def test_keys_are_namespaced(cache: Cache, client: redis.Redis) -> None:
    await cache.set("user:1", "Ada")
    raw = await client.get(f"{{{cache.namespace}:user:1}}")
    assert isinstance(raw, bytes) and Record.decode(raw).payload == b'"Ada"'
    assert await client.exists("user:1") == 0


async def test_default_ttl_comes_from_the_policy(client: redis.Redis, namespace: str) -> None:
    async with Cache(client, namespace=namespace, policy=Policy(ttl=42.0)) as cache:
        await cache.set("k", 1)
        # jittered down by up to Policy.jitter (0.1 by default)
        assert 42_000 * 0.9 - 50 < await client.pttl(cache.keys.value("k")) <= 42_000


async def test_loader_none_is_a_cached_negative(cache: Cache, client: redis.Redis) -> None:
    calls = 0

    async def find_user() -> dict[str, str] | None:
        nonlocal calls
        calls += 1
        return None

    assert await cache.get_or_load("user:404", find_user) is None
    assert await cache.get_or_load("user:404", find_user) is None
    assert calls == 1
    assert cache.statistics().negative_hits == 1
    # a cached None is not a miss
    assert await cache.get("user:404", default=MISSING) is None
    ttl_ms = await client.pttl(cache.keys.value("user:404"))
    assert 0 < ttl_ms <= 5_000  # negative_ttl, not ttl


async def test_negative_ttl_none_does_not_cache_absence(
    client: redis.Redis, namespace: str
) -> None:
    policy = Policy(ttl=30.0, negative_ttl=None)
    async with Cache(client, namespace=namespace, policy=policy) as cache:
        calls = 0

        async def find() -> None:
            nonlocal calls
            calls += 1

        await cache.get_or_load("k", find)
        await cache.get_or_load("k", find)
        assert calls == 2
        assert await cache.get("k", default=MISSING) is MISSING


async def test_per_call_policy(cache: Cache, client: redis.Redis) -> None:
    async def load() -> int:
        return 7

    assert await cache.get_or_load("k", load, policy=Policy(ttl=3.0, jitter=0)) == 7
    assert 2_900 < await client.pttl(cache.keys.value("k")) <= 3_000


@pytest.mark.parametrize(
    "garbage",
    [b"not a record", b"", b'{"a": 1}', b"\xa7\xc6\x01", b"\x80\x04\x95 pickled?"],
)
async def test_corrupt_payload_is_a_counted_miss(
    cache: Cache, client: redis.Redis, garbage: bytes
) -> None:
    await client.set(cache.keys.value("k"), garbage)
    assert await cache.get("k", default=MISSING) is MISSING
    # An empty string reads as a missing key (under max_value_bytes a read is GETRANGE, which
    # answers "" for both; a record is never empty): a plain miss, overwritten all the same.
    assert cache.statistics().decode_errors == (0 if garbage == b"" else 1)

    async def load() -> str:
        return "fresh"

    assert await cache.get_or_load("k", load) == "fresh"
    assert cache.statistics().loader_calls == 1
    assert await cache.get("k") == "fresh"  # the fill overwrote the garbage


async def test_record_whose_payload_does_not_decode(cache: Cache, client: redis.Redis) -> None:
    bad = Record(
        payload=b"{not json",
        negative=False,
        serializer_tag=1,
        stored_at=time.time(),
        expires_at=time.time() + 30,
    )
    await client.set(cache.keys.value("k"), bad.encode())
    assert await cache.get("k", default=MISSING) is MISSING
    assert cache.statistics().decode_errors == 1


async def test_record_of_another_serializer_is_a_miss_not_unpickled(
    client: redis.Redis, namespace: str
) -> None:
    policy = Policy(ttl=30.0)
    with pytest.warns(InsecurePickleWarning, match="PickleSerializer without signing_key"):
        pickled = Cache(client, namespace=namespace, policy=policy, serializer=PickleSerializer())
    async with pickled:
        await pickled.set("k", {"a": 1})
    async with Cache(client, namespace=namespace, policy=policy) as as_json:
        assert await as_json.get("k", default=MISSING) is MISSING
        assert as_json.statistics().decode_errors == 1


async def test_msgpack_round_trip(client: redis.Redis, namespace: str) -> None:
    async with Cache(
        client, namespace=namespace, policy=Policy(ttl=30.0), serializer=MsgpackSerializer()
    ) as cache:
        await cache.set("k", {"blob": b"\x00\x01"})
        assert await cache.get("k") == {"blob": b"\x00\x01"}


async def test_unencodable_loader_value_raises_a_clear_error(cache: Cache) -> None:
    async def load() -> object:
        return object()

    with pytest.raises(SerializationError, match="object"):
        await cache.get_or_load("k", load)
    with pytest.raises(SerializationError):
        await cache.set("k", object())


@pytest.mark.parametrize("key", ["", b"", "x" * 5000, 12])
async def test_bad_keys_raise_before_any_io(cache: Cache, key: object) -> None:
    async def load() -> int:
        raise AssertionError("must not be called")

    with pytest.raises(InvalidKeyError):
        await cache.get_or_load(key, load)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        await cache.get(key)  # type: ignore[arg-type]


async def test_bad_ttl_on_set(cache: Cache) -> None:
    with pytest.raises(ConfigurationError, match="ttl"):
        await cache.set("k", 1, ttl=-1.0)


async def test_decode_responses_client_is_refused(redis_server: object, namespace: str) -> None:
    client = redis.Redis(port=redis_server.port, decode_responses=True)  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="decode_responses=False") as refused:
        Cache(client, namespace=namespace, policy=Policy(ttl=1.0))
    await client.aclose()
    # The reason first and short: the client's repr (1,100 characters) used to come first.
    assert str(refused.value) == (
        "client is not accepted: a client created with decode_responses=False (records are "
        "binary) (got a redis.asyncio.client.Redis)"
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"command_timeout": 0}, "command_timeout"),
        ({"command_timeout": math.nan}, "command_timeout"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"policy": 30.0}, "policy"),
        ({"namespace": "a:b"}, "namespace"),
    ],
)
async def test_bad_cache_arguments(
    client: redis.Redis, kwargs: dict[str, object], field: str
) -> None:
    arguments: dict[str, object] = {"namespace": "ok", "policy": Policy(ttl=1.0), **kwargs}
    with pytest.raises(ConfigurationError) as info:
        Cache(client, **arguments)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.fixture
async def blackhole() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_every_command_has_a_budget(blackhole: int, namespace: str) -> None:
    client = redis.Redis(port=blackhole)  # redis-py's defaults would wait about a minute
    cache = Cache(client, namespace=namespace, policy=Policy(ttl=30.0), command_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(BackendTimeout) as info:
        await cache.get("k")
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 2.0
    with pytest.raises(BackendTimeout):
        await cache.set("k", 1)

    # get_or_load carries on without Redis: the loader is called, the error counted.
    async def load() -> str:
        return "from the database"

    started = time.monotonic()
    assert await cache.get_or_load("k", load) == "from the database"
    assert time.monotonic() - started < 2.0
    assert cache.statistics().redis_errors >= 3
    await cache.aclose()
    await client.aclose()


async def test_refused_connection_is_unavailable(namespace: str) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
        cache = Cache(client, namespace=namespace, policy=Policy(ttl=30.0))
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await cache.get("k")
        await cache.aclose()
        await client.aclose()


async def test_loader_and_policy_arguments_are_checked(cache: Cache) -> None:
    with pytest.raises(ConfigurationError, match="async function") as info:
        await cache.get_or_load("k", "not callable")  # type: ignore[arg-type]
    assert info.value.field == "loader"
    with pytest.raises(ConfigurationError, match="Policy") as info:
        await cache.get_or_load("k", _async_one, policy=30.0)  # type: ignore[arg-type]
    assert info.value.field == "policy"

    def sync_loader() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="non-awaitable"):
        await cache.get_or_load("k", sync_loader)  # type: ignore[arg-type]
    # The failed call left nothing behind: an async loader works for the key.
    assert await cache.get_or_load("k", _async_one) == 1


async def _async_one() -> int:
    return 1


async def test_redis_down_callers_served_and_loader_single_flighted(namespace: str) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: Redis is down
        client = redis.Redis(port=sock.getsockname()[1], retry=Retry(NoBackoff(), 0))
        load = GatedLoader("from the database")
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            tasks = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(100)]
            await load.started.wait()
            load.release.set()
            assert await asyncio.gather(*tasks) == ["from the database"] * 100
            assert load.calls == 1  # still once per key per process
            assert cache.statistics().redis_errors >= 1
        await client.aclose()


async def test_from_url_owns_and_closes_its_client(
    redis_server: RedisServer, namespace: str
) -> None:
    cache = Cache.from_url(redis_server.url, namespace=namespace, policy=Policy(ttl=30.0))
    async with cache:
        await cache.set("k", "v")
        assert await cache.get("k") == "v"
        client = cache._backend.client
        assert isinstance(client, redis.Redis)
        retry = client.get_retry()
        assert retry is not None and retry._retries == 0  # one command, one budget
    # Closed with the Cache: no connection of its pool is open any more.
    pool = client.connection_pool
    assert pool._available_connections  # it had connected...
    assert not any(c.is_connected for c in pool._available_connections)  # ...and is closed


def test_from_url_refuses_a_bad_url() -> None:
    with pytest.raises(ConfigurationError, match="url"):
        Cache.from_url("http://example.com", namespace="x", policy=Policy(ttl=1.0))


async def test_the_bulk_api_on_the_cache(cache: Cache) -> None:
    """DESIGN's names: get_many, set_many, warm and clear are methods of the Cache."""
    await cache.set_many({f"k{i}": i for i in range(300)}, ttl=60.0)
    assert await cache.get_many([f"k{i}" for i in range(300)] + ["absent"]) == [
        *range(300),
        None,
    ]

    async def load() -> str:
        return "loaded"

    assert await cache.warm([("w1", "v"), ("w2", load)], concurrency=2) == 2
    assert await cache.get_many(["w1", "w2"]) == ["v", "loaded"]
    assert await cache.clear("k1*") == 1 + 10 + 100  # k1, k10-k19, k100-k199
    assert await cache.clear() == 300 - 111 + 2
    assert await cache.get_many(["k0", "w1"]) == [None, None]


async def test_a_call_whose_read_outlives_aclose_starts_nothing(
    redis_server: RedisServer, namespace: str
) -> None:
    """A read on the wire when aclose() ran used to start a flight (and a lock) after it."""
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port)
        cache = Cache(client, namespace=namespace, policy=Policy(ttl=30.0))
        await cache.get("warm-up")
        proxy.hold()
        loader = GatedLoader("v")
        caller = asyncio.create_task(cache.get_or_load("k", loader))
        await proxy.wait_held(1)
        await cache.aclose()
        proxy.unhold()
        with pytest.raises(CacheClosedError):
            await caller
        assert loader.calls == 0
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("aiocacheguard-")]
        with pytest.raises(CacheClosedError):
            await cache.refresh("k", loader)
        await client.aclose()
