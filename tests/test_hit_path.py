"""
The lone hit's own GET (`RedisBackend._get_standalone`): on a connection of the client's pool,
without ``execute_command``, yet with what the client does for a command kept.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocacheguard import BackendUnavailable, Cache, Policy
from aiocacheguard.testing import FaultProxy, RedisServer

VALUE = {"id": 7, "name": "seven"}


async def test_a_reply_cut_mid_hit_is_retried_as_the_clients_retry_policy_says(
    redis_server: RedisServer, namespace: str
) -> None:
    # redis-py's default client retries a command whose connection failed; the lean GET
    # must too (through the client), or a dropped connection becomes an error for the caller.
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port)  # redis-py's default retries
        try:
            async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
                await cache.set("k", VALUE)
                accepted = proxy.statistics().connections_accepted
                for _ in range(3):
                    proxy.truncate_next_reply(5)  # the GET's reply is cut, its connection closed
                    assert await cache.get("k") == VALUE
                assert proxy.statistics().connections_accepted - accepted == 3  # 3 cut, 3 redone
                assert cache.statistics().redis_errors == 0
        finally:
            await client.aclose()


async def test_a_reply_cut_mid_hit_fails_when_the_client_does_not_retry(
    redis_server: RedisServer, namespace: str
) -> None:
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
        try:
            async with Cache(
                client, namespace=namespace, policy=Policy(ttl=30.0), breaker=None
            ) as cache:
                await cache.set("k", VALUE)
                proxy.truncate_next_reply(5)
                with pytest.raises(BackendUnavailable):
                    await cache.get("k")
                assert cache.statistics().redis_errors == 1
                assert await cache.get("k") == VALUE  # the next one, on a new connection
        finally:
            await client.aclose()


class CountingRedis(redis.Redis):
    """A client subclass that does something around each command (as instrumentation does)."""

    commands: list[Any]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(args[0])
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


async def test_a_client_subclass_runs_every_hit_through_its_execute_command(
    redis_server: RedisServer, namespace: str
) -> None:
    client = CountingRedis(port=redis_server.port)
    client.commands = []
    try:
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            await cache.set("k", VALUE)
            before = client.commands.count("GET")
            for _ in range(5):
                assert await cache.get("k") == VALUE
            assert client.commands.count("GET") - before == 5
    finally:
        await client.aclose()


async def test_a_single_connection_client_keeps_to_its_one_connection(
    redis_server: RedisServer, namespace: str
) -> None:
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port, single_connection_client=True)
        try:
            async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
                await cache.set("k", VALUE)
                for _ in range(5):
                    assert await cache.get("k") == VALUE
                assert proxy.statistics().connections_accepted == 1
        finally:
            await client.aclose()


async def test_execute_command_instrumented_after_the_cache_was_made_sees_every_hit(
    redis_server: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What OpenTelemetry's redis instrumentation does: replace the class's execute_command.
    seen: list[Any] = []
    original = redis.Redis.execute_command

    async def traced(self: redis.Redis, *args: Any, **options: Any) -> Any:
        seen.append(args[0])
        return await original(self, *args, **options)  # type: ignore[no-untyped-call]

    client = redis.Redis(port=redis_server.port)
    try:
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            await cache.set("k", VALUE)
            monkeypatch.setattr(redis.Redis, "execute_command", traced)
            for _ in range(5):
                assert await cache.get("k") == VALUE
            assert seen.count("GET") == 5
    finally:
        await client.aclose()
