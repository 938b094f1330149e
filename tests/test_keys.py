from __future__ import annotations

from typing import cast

import pytest
from redis.crc import key_slot

from aiocacheguard import BloomFilter, ConfigurationError, InvalidKeyError
from aiocacheguard._types import ScriptRunner
from aiocacheguard.keys import MAX_KEY_BYTES, KeySpace, hash_tag


def test_namespaced_with_hash_tag() -> None:
    keys = KeySpace("shop")
    assert keys.value("leaderboard") == b"{shop:leaderboard}"
    assert keys.value(b"\x00\xff") == b"{shop:\x00\xff}"
    assert keys.value("ü") == "{shop:ü}".encode()


@pytest.mark.parametrize("key", ["user:1", "a}b", "{x}", "}", "{", "a" * MAX_KEY_BYTES])
def test_all_keys_of_an_entry_share_a_slot(key: str) -> None:
    value_key = KeySpace("shop").value(key)
    for suffix in (b":lock", b":fill", b":anything"):
        assert key_slot(value_key + suffix) == key_slot(value_key)


def test_a_namespace_cannot_contain_the_separator() -> None:
    # Otherwise namespace "a:b" with key "c" and namespace "a" with key "b:c" would collide.
    with pytest.raises(ConfigurationError, match="namespace"):
        KeySpace("a:b")


@pytest.mark.parametrize("namespace", ["", "a:b", "{a}", "a b", "x" * 65, 5])
def test_bad_namespaces(namespace: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        KeySpace(namespace)  # type: ignore[arg-type]
    assert info.value.field == "namespace"


def test_empty_key() -> None:
    with pytest.raises(InvalidKeyError, match="empty"):
        KeySpace("ns").value("")


def test_oversized_key_names_the_limit() -> None:
    with pytest.raises(InvalidKeyError, match=f"limit of {MAX_KEY_BYTES} bytes"):
        KeySpace("ns").value("é" * MAX_KEY_BYTES)  # 2 bytes a character


@pytest.mark.parametrize("key", [1, None, 1.5, ("a",)])
def test_wrong_key_type(key: object) -> None:
    with pytest.raises(InvalidKeyError, match="str or bytes"):
        KeySpace("ns").value(key)  # type: ignore[arg-type]


def test_entries_and_bloom_filters_share_one_hash_tag_format() -> None:
    keys = KeySpace("shop")
    assert keys.value("user:1") == hash_tag(b"shop", b"user:1") == b"{shop:user:1}"
    assert keys.user_key(keys.value("user:1")) == b"user:1"
    bloom = BloomFilter("users", capacity=10, error_rate=0.01)
    bloom.bind(cast("ScriptRunner", object()), namespace="shop")  # binding stores, no I/O
    assert bloom.key == hash_tag(b"shop", b"users") + b":bloom"
