from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, ConfigurationError, Policy


def test_defaults() -> None:
    policy = Policy(ttl=30.0)
    assert (policy.ttl, policy.soft_ttl, policy.negative_ttl) == (30.0, None, 5.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ttl": -1.0}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"ttl": math.inf}, "ttl"),
        ({"ttl": -math.inf}, "ttl"),
        ({"ttl": 10 * 365 * 24 * 3600.0}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": "30"}, "ttl"),
        ({"ttl": 30.0, "soft_ttl": 30.0}, "soft_ttl"),
        ({"ttl": 30.0, "soft_ttl": 31.0}, "soft_ttl"),
        ({"ttl": 30.0, "soft_ttl": 0.0}, "soft_ttl"),
        ({"ttl": 30.0, "soft_ttl": math.nan}, "soft_ttl"),
        ({"ttl": 30.0, "negative_ttl": -5.0}, "negative_ttl"),
        ({"ttl": 30.0, "negative_ttl": math.inf}, "negative_ttl"),
        # Below Redis's millisecond: it would be stored as a millisecond anyway.
        ({"ttl": 1e-9}, "ttl"),
        ({"ttl": 0.0009}, "ttl"),
        ({"ttl": 30.0, "negative_ttl": 1e-6}, "negative_ttl"),
    ],
)
def test_rejects_out_of_range(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Policy(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field}=")
    assert "seconds" in message  # says what is accepted
    assert isinstance(info.value, ValueError)


def test_ttl_is_required_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        Policy()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Policy(30.0)  # type: ignore[call-arg]


def test_frozen_and_hashable() -> None:
    policy = Policy(ttl=30.0, soft_ttl=20.0, negative_ttl=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.ttl = 1.0  # type: ignore[misc]
    assert {policy: 1}[Policy(ttl=30.0, soft_ttl=20.0, negative_ttl=None)] == 1
    assert policy.negative_ttl is None


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        ({"jitter": 1.0}, "a number >= 0 and < 1"),
        ({"jitter": True}, "a number >= 0 and < 1"),
        ({"early_beta": -0.5}, "a number >= 0 and <= 100"),
        ({"early_beta": math.nan}, "a number >= 0 and <= 100"),
        ({"lock_ttl": 0.01}, "a finite number of seconds >= 0.05 and <= 31536000"),
        ({"load_timeout": False}, "a finite number of seconds > 0 and <= 31536000, or None"),
    ],
)
def test_other_fields_name_their_range(kwargs: dict[str, object], accepted: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Policy(ttl=30.0, **kwargs)  # type: ignore[arg-type]
    (field,) = kwargs
    assert (info.value.field, info.value.accepted) == (field, accepted)


def test_a_ttl_below_a_millisecond_says_the_minimum() -> None:
    with pytest.raises(ConfigurationError) as info:
        Policy(ttl=1e-9)
    assert info.value.accepted == "a finite number of seconds >= 0.001 and <= 31536000"
    assert Policy(ttl=0.001).ttl == 0.001  # the minimum itself is accepted


async def test_set_refuses_a_ttl_below_a_millisecond_before_any_io() -> None:
    # A Cache on a port nothing listens on: any I/O would fail with a BackendError instead.
    cache = Cache(redis.Redis(port=1), namespace="policy", policy=Policy(ttl=30.0))
    with pytest.raises(ConfigurationError) as info:
        await cache.set("k", 1, ttl=1e-9)
    assert info.value.field == "ttl"
    await cache.aclose()


@pytest.mark.parametrize(
    "kwargs",
    [
        # A negative answer may be kept longer than a value (ids probed by a scanner), and
        # the default negative_ttl (5 s) must stay valid with a short ttl.
        {"ttl": 1.0},
        {"ttl": 10.0, "negative_ttl": 300.0},
        # The lease bounds a dead holder's hold on waiters, not a value's life.
        {"ttl": 1.0, "lock_ttl": 30.0},
        # A latency-bound caller caps its wait below the holder's load time.
        {"ttl": 30.0, "wait_timeout": 0.2, "load_timeout": 10.0},
    ],
)
def test_combinations_accepted_on_purpose(kwargs: dict[str, Any]) -> None:
    policy = Policy(**kwargs)
    assert dataclasses.asdict(policy).items() >= kwargs.items()


def test_the_accepted_combinations_are_documented() -> None:
    doc = Policy.__doc__ or ""
    page = (Path(__file__).parent.parent / "docs" / "policy.md").read_text()
    for combination in ("negative_ttl > ttl", "lock_ttl > ttl", "wait_timeout < load_timeout"):
        assert combination in doc and combination in page, combination
