from __future__ import annotations

import dataclasses
import math

import pytest

from aiocacheguard import ConfigurationError, Policy


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
