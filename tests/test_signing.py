"""
Issue 23, item 2: signed records (item 1, forged fill messages, is tests/test_forged_fills.py).

With ``signing_key``, only records signed for their key with it (or a ``verify_keys`` key) are
served: an attacker's pickle record is refused before it is unpickled, as are a record with one
byte changed, one signed with an unknown key, one moved from another key, and an unsigned one;
each is a miss counted in ``forged_records``, said once per episode. Keys are checked before
any I/O and never printed. Pickle without signing warns.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import secrets
import time
from typing import Any

import pytest
import redis.asyncio as redis

from aiocacheguard import (
    Cache,
    ConfigurationError,
    InsecurePickleWarning,
    PickleSerializer,
    Policy,
    cached,
)
from aiocacheguard.ops import inspect, stats
from aiocacheguard.record import Record, Signer
from aiocacheguard.serializers import MsgspecJsonSerializer
from aiocacheguard.testing import FaultProxy, RedisServer

from .helpers import GatedLoader, wait_until
from .test_forged_fills import RAN, Exploit

OLD_KEY = b"o" * 16 + secrets.token_bytes(16)
NEW_KEY = secrets.token_bytes(32)
ATTACKER_KEY = secrets.token_bytes(32)
#: A lease far longer than any bound below: a waiter served within the bound was served by
#: the fill, not by the lease running out.
POLICY = Policy(ttl=30.0, lock_ttl=10.0, jitter=0.0)
BOUND = 5.0
MISSING = object()
JSON = MsgspecJsonSerializer.tag  # the default serializer's


def planted(payload: bytes, *, tag: int, signer: Signer | None = None, rkey: bytes = b"") -> bytes:
    """A well-formed record an attacker writes with plain Redis commands (fresh for 300 s)."""
    now = time.time()
    record = Record(
        payload=payload, negative=False, serializer_tag=tag, stored_at=now, expires_at=now + 300
    )
    return record.encode() if signer is None else record.encode(signer, rkey)


async def test_attacker_pickle_record_is_refused_unread(
    client: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Cache(
        client,
        namespace=namespace,
        policy=POLICY,
        serializer=PickleSerializer(),
        signing_key=NEW_KEY,
    ) as cache:
        rkey = cache.keys.value("k")
        exploit = pickle.dumps(Exploit(namespace))
        # Unsigned (what the probe wrote), and dressed as a signed record without the key.
        unsigned = planted(exploit, tag=PickleSerializer.tag)
        wrong_key = planted(
            exploit, tag=PickleSerializer.tag, signer=Signer(ATTACKER_KEY), rkey=rkey
        )
        caplog.set_level(logging.WARNING, logger="aiocacheguard")
        for record in (unsigned, wrong_key):
            await client.set(rkey, record)
            assert await cache.get("k", default=MISSING) is MISSING
        assert RAN.count(namespace) == 0, "an attacker's pickle ran"
        assert cache.statistics().forged_records == 2
        assert cache.statistics().decode_errors == 0
        warnings = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(warnings) == 1, "one warning per episode"
        assert NEW_KEY.hex() not in caplog.text and repr(NEW_KEY) not in caplog.text

        # get_or_load: refused on read and on the lock's read, loaded once, replaced.
        loader = GatedLoader({"real": True})
        loader.release.set()
        assert await cache.get_or_load("k", loader) == {"real": True}
        assert loader.calls == 1
        assert RAN.count(namespace) == 0
        assert await cache.get("k") == {"real": True}
        stored = await client.get(rkey)
        assert isinstance(stored, bytes) and stored[2] == 3  # signed


async def test_tampered_byte_is_refused(client: redis.Redis, namespace: str) -> None:
    async with Cache(client, namespace=namespace, policy=POLICY, signing_key=NEW_KEY) as cache:
        await cache.set("k", {"balance": 100})
        rkey = cache.keys.value("k")
        good = await client.get(rkey)
        assert isinstance(good, bytes)
        # A byte of the header (its expiry), of the signature, and of the payload.
        for offset in (25, 50, len(good) - 3):
            tampered = bytearray(good)
            tampered[offset] ^= 0x01
            await client.set(rkey, bytes(tampered))
            assert await cache.get("k", default=MISSING) is MISSING, offset
        # Truncated to its header, and cut before its signature ends.
        for cut in (good[:41], good[:60]):
            await client.set(rkey, cut)
            assert await cache.get("k", default=MISSING) is MISSING
        assert cache.statistics().forged_records == 5
        await client.set(rkey, good)
        assert await cache.get("k") == {"balance": 100}


async def test_record_moved_to_another_key_is_refused(client: redis.Redis, namespace: str) -> None:
    async with Cache(client, namespace=namespace, policy=POLICY, signing_key=NEW_KEY) as cache:
        await cache.set("user:1:balance", 1_000_000_000)
        moved = await client.get(cache.keys.value("user:1:balance"))
        assert isinstance(moved, bytes)
        await client.set(cache.keys.value("user:2:balance"), moved)
        assert await cache.get("user:2:balance", default=MISSING) is MISSING
        assert cache.statistics().forged_records == 1
    # Nor under the same key in another namespace signed with the same key.
    async with Cache(
        client, namespace=f"{namespace}-other", policy=POLICY, signing_key=NEW_KEY
    ) as other:
        await client.set(other.keys.value("user:1:balance"), moved)
        assert await other.get("user:1:balance", default=MISSING) is MISSING
        assert other.statistics().forged_records == 1


async def test_key_rotation(client: redis.Redis, namespace: str) -> None:
    async with (
        Cache(client, namespace=namespace, policy=POLICY, signing_key=OLD_KEY) as old,
        Cache(
            client, namespace=namespace, policy=POLICY, signing_key=NEW_KEY, verify_keys=(OLD_KEY,)
        ) as rotated,
        Cache(client, namespace=namespace, policy=POLICY, signing_key=NEW_KEY) as new_only,
        # Step 1 of a rotation: every process accepts the new key before any signs with it.
        Cache(
            client, namespace=namespace, policy=POLICY, signing_key=OLD_KEY, verify_keys=(NEW_KEY,)
        ) as preparing,
    ):
        await old.set("written-old", "old")
        assert await rotated.get("written-old") == "old"  # old-key records still served
        assert await preparing.get("written-old") == "old"
        assert await new_only.get("written-old", default=MISSING) is MISSING

        await rotated.set("written-new", "new")  # signed with the first key only
        assert await new_only.get("written-new") == "new"
        assert await preparing.get("written-new") == "new"
        assert await old.get("written-new", default=MISSING) is MISSING

        rkey = rotated.keys.value("unknown")
        await client.set(rkey, planted(b'"evil"', tag=JSON, signer=Signer(ATTACKER_KEY), rkey=rkey))
        assert await rotated.get("unknown", default=MISSING) is MISSING
        assert await preparing.get("unknown", default=MISSING) is MISSING
        assert rotated.statistics().forged_records == 1
        assert new_only.statistics().forged_records == 1
        assert old.statistics().forged_records == 1
        assert preparing.statistics().forged_records == 1


async def test_signed_fill_reaches_waiters_of_another_process(
    client: redis.Redis, namespace: str
) -> None:
    # The fenced fill (a Lua script) writes the bytes the holder signed; the waiter checks them.
    async with (
        Cache(client, namespace=namespace, policy=POLICY, signing_key=NEW_KEY) as holder,
        Cache(client, namespace=namespace, policy=POLICY, signing_key=NEW_KEY) as waiter,
    ):
        loader = GatedLoader(["ada", "grace"])
        holding = asyncio.create_task(holder.get_or_load("board", loader))
        await loader.started.wait()
        waiting = [asyncio.create_task(waiter.get_or_load("board", loader)) for _ in range(50)]
        await wait_until(lambda: waiter.statistics().lock_waits == 1, within=BOUND)
        loader.release.set()
        async with asyncio.timeout(BOUND):
            results = await asyncio.gather(holding, *waiting)
        assert results == [["ada", "grace"]] * 51
        assert loader.calls == 1
        assert waiter.statistics().forged_records == 0


async def test_unsigned_records_are_refused_and_signed_ones_read_without_a_key(
    client: redis.Redis, namespace: str
) -> None:
    async with (
        Cache(client, namespace=namespace, policy=POLICY) as unsigned,
        Cache(client, namespace=namespace, policy=POLICY, signing_key=NEW_KEY) as signed,
    ):
        await unsigned.set("a", 1)
        assert await signed.get("a", default=MISSING) is MISSING  # e.g. a writer not yet keyed
        assert signed.statistics().forged_records == 1
        await signed.set("b", 2)
        assert await unsigned.get("b") == 2  # a Cache without a key trusts Redis anyway
        assert unsigned.statistics().forged_records == 0


async def test_decorated_loader_and_from_url_pass_the_key_through(
    redis_server: RedisServer, client: redis.Redis, namespace: str
) -> None:
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    cache = Cache.from_url(
        url,
        namespace=namespace,
        policy=POLICY,
        serializer=PickleSerializer(),  # no InsecurePickleWarning: signed
        signing_key=NEW_KEY,
    )
    calls = 0

    @cached(cache)
    async def balance(user_id: int) -> int:
        nonlocal calls
        calls += 1
        return 100

    async with cache:
        rkey = cache.keys.value(balance.cache_key(1))
        exploit = pickle.dumps(Exploit(namespace))
        await client.set(rkey, planted(exploit, tag=PickleSerializer.tag))
        assert await balance(1) == 100
        assert calls == 1 and RAN.count(namespace) == 0
        assert cache.statistics().forged_records >= 1
        stored = await client.get(rkey)
        assert isinstance(stored, bytes) and Signer(NEW_KEY).verify(rkey, stored)
        assert await balance(1) == 100 and calls == 1


# Configuration: checked before any I/O, never printed.


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"signing_key": b"short" * 6}, "signing_key"),  # 30 bytes
        ({"signing_key": "x" * 40}, "signing_key"),  # text, not bytes
        ({"signing_key": NEW_KEY, "verify_keys": OLD_KEY}, "verify_keys"),  # a lone key
        ({"signing_key": NEW_KEY, "verify_keys": (b"short" * 6,)}, "verify_keys"),
        ({"verify_keys": (OLD_KEY,)}, "verify_keys"),  # nothing to sign with
    ],
)
async def test_bad_keys_are_refused_before_io_and_never_printed(
    redis_server: RedisServer, options: dict[str, Any], field: str
) -> None:
    async with FaultProxy(redis_server.port) as proxy, redis.Redis.from_url(proxy.url) as client:
        with pytest.raises(ConfigurationError) as info:
            Cache(client, namespace="ns", policy=POLICY, **options)
        assert proxy.statistics().connections_accepted == 0
    assert info.value.field == field
    shown = f"{info.value} {info.value!r} {info.value.value!r}"
    for secret in (b"short" * 6, OLD_KEY, NEW_KEY):
        assert repr(secret) not in shown and secret.hex() not in shown
    assert "short" not in shown and "x" * 40 not in shown


async def test_pickle_without_signing_warns_once_per_cache(client: redis.Redis) -> None:
    for _ in range(2):
        with pytest.warns(InsecurePickleWarning, match="signing_key") as seen:
            cache = Cache(client, namespace="ns", policy=POLICY, serializer=PickleSerializer())
        assert len(seen) == 1
        await cache.aclose()
    # Signed, or another serializer: no warning (the suite turns warnings into errors).
    await Cache(
        client, namespace="ns", policy=POLICY, serializer=PickleSerializer(), signing_key=NEW_KEY
    ).aclose()
    await Cache(client, namespace="ns", policy=POLICY).aclose()


def test_signer_repr_shows_no_key() -> None:
    signer = Signer(NEW_KEY, verify_keys=(OLD_KEY,))
    assert repr(signer) == "<Signer: 1 signing key, 1 more verify>"


async def test_stats_and_inspect_read_signed_records(client: redis.Redis, namespace: str) -> None:
    policy = Policy(ttl=60.0, soft_ttl=0.001, jitter=0.0)
    async with Cache(client, namespace=namespace, policy=policy, signing_key=NEW_KEY) as cache:
        await cache.set("k", {"a": 1})
        await cache.set("absent", None)
    found = (await stats(client, namespace, sample=10**9, interval=0)).namespace
    assert found is not None
    assert (found.entries, found.negative, found.soft_expired, found.foreign) == (2, 1, 1, 0)
    seen = await inspect(client, namespace, "k")
    assert not seen.problem and seen.format_version == 3 and seen.value == {"a": 1}
