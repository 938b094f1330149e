from __future__ import annotations

import datetime
from typing import Any

import pytest

from aiocacheguard import (
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    SerializationError,
    Serializer,
)


@pytest.mark.parametrize(
    ("serializer", "value"),
    [
        (JsonSerializer(), {"name": "Ada", "scores": [1, 2.5, None, True], "ü": "ß"}),
        (MsgpackSerializer(), {"blob": b"\x00\xff", "n": [1, 2]}),
        (PickleSerializer(), {"when": datetime.date(2026, 11, 23), "t": (1, 2)}),
    ],
)
def test_round_trip(serializer: Serializer, value: Any) -> None:
    data = serializer.dumps(value)
    assert isinstance(data, bytes)
    assert serializer.loads(data) == value


def test_tags_are_distinct_and_protocol_is_met() -> None:
    serializers: list[object] = [JsonSerializer(), MsgpackSerializer(), PickleSerializer()]
    assert all(isinstance(s, Serializer) for s in serializers)
    assert len({s.tag for s in serializers if isinstance(s, Serializer)}) == 3


def test_json_refuses_what_it_cannot_encode_with_advice() -> None:
    with pytest.raises(SerializationError, match="PickleSerializer") as info:
        JsonSerializer().dumps({"when": datetime.datetime(2026, 1, 1)})
    assert isinstance(info.value, TypeError)
    with pytest.raises(SerializationError):
        JsonSerializer().dumps({1j: 2})


def test_msgpack_refuses_unknown_types() -> None:
    with pytest.raises(SerializationError):
        MsgpackSerializer().dumps(object())


def test_pickle_refuses_unpicklable() -> None:
    with pytest.raises(SerializationError):
        PickleSerializer().dumps(lambda: None)
