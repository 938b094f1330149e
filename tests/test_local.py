"""The L1 store (aiocacheguard.guards.local): bounds, expiry, the fill/invalidate race, bypass."""

from __future__ import annotations

import pytest

from aiocacheguard.errors import ConfigurationError
from aiocacheguard.guards.local import ENTRY_OVERHEAD, LocalCache, LocalStore

from .helpers import Clock


def fill(store: LocalStore[str, object], key: str, value: object, **kwargs: object) -> bool:
    token = store.begin_fill(key)
    return store.finish_fill(key, token, value, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_entries", 0),
        ("max_entries", True),
        ("ttl", 0.0),
        ("ttl", float("inf")),
        ("max_bytes", ENTRY_OVERHEAD - 1),
        ("copy_on_read", 1),
    ],
)
def test_config_rejects_out_of_range(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=field):
        LocalCache(**{field: value})  # type: ignore[arg-type]


def test_config_defaults() -> None:
    config = LocalCache()
    assert (config.max_entries, config.ttl, config.max_bytes, config.copy_on_read) == (
        10_000,
        5.0,
        None,
        False,
    )


def test_hit_and_miss_are_counted(clock: Clock) -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(), clock=clock)
    assert store.get("k", "absent") == "absent"
    assert fill(store, "k", "v")
    assert store.get("k") == "v"
    stats = store.statistics()
    assert (stats.local_hits, stats.local_misses, stats.entries) == (1, 1, 1)


def test_expiry_is_the_local_ttl_when_the_record_lives_longer(clock: Clock) -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(ttl=5.0), clock=clock)
    fill(store, "k", "v", not_after=clock.now + 60.0)
    clock.now += 4.9
    assert store.get("k") == "v"
    clock.now += 0.2
    assert store.get("k") is None
    assert store.stale("k") == "v"  # kept for the fallback chain until evicted or replaced


def test_expiry_never_outlives_the_record(clock: Clock) -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(ttl=5.0), clock=clock)
    fill(store, "k", "v", not_after=clock.now + 1.0)  # the record's soft expiry
    clock.now += 0.9
    assert store.get("k") == "v"
    clock.now += 0.2
    assert store.get("k") is None


def test_a_record_already_expired_is_not_stored(clock: Clock) -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(), clock=clock)
    assert not fill(store, "k", "v", not_after=clock.now - 0.1)
    assert len(store) == 0


def test_a_policy_ttl_overrides_the_config(clock: Clock) -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(ttl=5.0), clock=clock)
    fill(store, "k", "v", ttl=0.5)
    clock.now += 0.6
    assert store.get("k") is None


def test_an_invalidation_during_the_read_drops_its_result() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache())
    token = store.begin_fill("k")  # before the Redis read
    store.invalidate("k")  # arrives before the read's reply
    assert not store.finish_fill("k", token, "old")
    assert store.get("k") is None
    assert store.statistics().invalidations == 1


def test_an_invalidation_of_another_key_does_not_drop_the_read() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache())
    token = store.begin_fill("k")
    store.invalidate("other")
    assert store.finish_fill("k", token, "v")
    assert store.get("k") == "v"


def test_a_flush_during_the_read_drops_its_result() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache())
    token = store.begin_fill("k")
    store.clear()
    assert not store.finish_fill("k", token, "old")


def test_a_newer_fill_supersedes_an_older_one() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache())
    older = store.begin_fill("k")
    newer = store.begin_fill("k")
    assert not store.finish_fill("k", older, "read earlier")
    assert store.finish_fill("k", newer, "read later")
    assert store.get("k") == "read later"
    assert not store.finish_fill("k", newer, "twice")  # a token is spent once


def test_an_abandoned_fill_leaves_nothing_behind() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(max_entries=2))
    token = store.begin_fill("k")
    store.abandon_fill("k", token)
    assert not store.finish_fill("k", token, "v")
    # Fills never finished are bounded too: the oldest placeholders are dropped.
    tokens = [(f"x{i}", store.begin_fill(f"x{i}")) for i in range(5)]
    assert not store.finish_fill(*tokens[0], "v")
    assert store.finish_fill(*tokens[-1], "v")


def test_invalidate_removes_the_entry() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache())
    fill(store, "k", "v", size=10)
    store.invalidate("k")
    assert store.get("k") is None
    assert store.bytes == 0


def test_entries_are_bounded_least_recently_used_first() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(max_entries=3))
    for key in "abc":
        fill(store, key, key)
    assert store.get("a") == "a"  # now the most recently used
    store.begin_fill("d")  # asked of Redis twice: more often than the victim, admitted
    fill(store, "d", "d")
    assert store.get("b") is None
    assert [store.get(key) for key in "acd"] == ["a", "c", "d"]
    assert len(store) == 3
    assert store.statistics().local_evictions == 1


def test_a_full_store_refuses_a_key_asked_less_often_than_its_victim() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(max_entries=100))
    resident = [f"r{i}" for i in range(100)]
    for key in resident:
        for _ in range(3):
            store.begin_fill(key)
        fill(store, key, key)  # each asked four times
    # A scan of one-off reads (fewer than the sketch's aging period of 10 x 100 additions).
    # The sketch over-counts a few of them (collisions in every row), which let them in:
    # plain LRU would have admitted all 500 and evicted every resident.
    admitted = sum(fill(store, f"once:{i}", i) for i in range(500))
    assert admitted <= 10
    assert sum(store.get(key) == key for key in resident) >= 90
    assert store.statistics().refused == 500 - admitted
    for _ in range(9):
        store.begin_fill("hot")
    assert fill(store, "hot", "h")  # asked ten times: admitted
    assert store.get("hot") == "h"


def test_expired_entries_make_room_whatever_their_popularity(clock: Clock) -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(max_entries=2, ttl=1.0), clock=clock)
    for key in "ab":
        for _ in range(5):
            store.begin_fill(key)
        fill(store, key, key)
    clock.now += 2.0
    assert fill(store, "new", "n")  # asked once, but the others are dead
    assert store.get("new") == "n"
    assert store.statistics().refused == 0


def test_100_000_small_entries_stay_within_max_bytes() -> None:
    max_bytes = 1_000_000
    store: LocalStore[str, object] = LocalStore(
        LocalCache(max_entries=1_000_000, max_bytes=max_bytes)
    )
    for i in range(100_000):
        if i > 20_000 and i % 3 == 0:
            for _ in range(2):  # asked three times: they displace one-off reads
                store.begin_fill(f"key:{i}")
        fill(store, f"key:{i}", i, size=20 + i % 30)
        assert store.bytes <= max_bytes
    # Accounted exactly: the entries held add up to what the store says it holds.
    held = [i for i in range(100_000) if store.get(f"key:{i}") is not None]
    assert store.bytes == sum(20 + i % 30 + ENTRY_OVERHEAD for i in held)
    assert max_bytes - (50 + ENTRY_OVERHEAD) < store.bytes  # full, not emptied
    stats = store.statistics()
    assert stats.local_evictions > 0
    assert stats.refused > 0  # admission judged by bytes too, not by the entry count alone
    assert len(held) + stats.local_evictions + stats.refused == 100_000


def test_an_entry_larger_than_max_bytes_is_not_stored() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache(max_bytes=1_000))
    fill(store, "small", "v", size=10)
    assert not fill(store, "big", "v", size=1_000)
    assert store.get("big") is None
    assert store.get("small") == "v"  # nothing was evicted for it


def test_bypass_stops_serving_and_refuses_until_resumed() -> None:
    store: LocalStore[str, object] = LocalStore(LocalCache())
    fill(store, "k", "v")
    fill(store, "gone", "v")
    before = store.begin_fill("j")  # a read under way when the connection is lost
    store.bypass()
    assert store.get("k") is None
    assert store.stale("k") == "v"  # set aside for the fallback chain only
    store.invalidate("gone")  # a local write while bypassing
    assert store.stale("gone") is None
    assert not fill(store, "k", "v")
    during = store.begin_fill("i")  # a read while invalidations are not arriving
    store.resume()
    assert store.stale("k") is None  # it may have missed invalidations: dropped
    assert not store.finish_fill("j", before, "v")
    assert not store.finish_fill("i", during, "v")
    assert store.statistics().bypassing is False
    assert fill(store, "k", "v2")
    assert store.get("k") == "v2"


def test_values_are_shared_unless_copy_on_read() -> None:
    shared: LocalStore[str, object] = LocalStore(LocalCache())
    value = {"items": [1]}
    fill(shared, "k", value)
    assert shared.get("k") is value

    copied: LocalStore[str, object] = LocalStore(LocalCache(copy_on_read=True))
    fill(copied, "k", value)
    first = copied.get("k")
    assert first == value and first is not value
    first["items"].append(2)
    assert copied.get("k") == {"items": [1]}
