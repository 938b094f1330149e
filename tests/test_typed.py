"""
Typed decoding: a value goes through ``dumps`` and comes back from ``decoder(tp)`` as what it was,
types included; bytes that do not fit ``tp`` raise `DecodeError`. Pure: no Redis.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import subprocess
import sys
import uuid
from typing import Any, NamedTuple, TypedDict

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiocacheguard import JsonSerializer, SerializationError, Serializer
from aiocacheguard.serializers import (
    DecodeError,
    MsgspecJsonSerializer,
    MsgspecMsgpackSerializer,
    TypedSerializer,
    typed_decoder,
)

SERIALIZERS = [MsgspecJsonSerializer(), MsgspecMsgpackSerializer()]
by_format = pytest.mark.parametrize("serializer", SERIALIZERS, ids=["json", "msgpack"])

UTC = datetime.UTC
PARIS_SUMMER = datetime.timezone(datetime.timedelta(hours=2))


class Opaque:
    """A class msgspec knows nothing of."""


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Row:
    id: int
    updated: datetime.datetime
    span: tuple[int, int]
    counts: dict[int, str]
    price: decimal.Decimal | None = None


@dataclasses.dataclass
class Node:
    """Refers to itself: decoding must not chase the type forever."""

    name: str
    children: list[Node] = dataclasses.field(default_factory=list)


class Point(NamedTuple):
    x: float
    y: float


class Movie(TypedDict):
    title: str
    year: int
    released: datetime.date


class User(pydantic.BaseModel):
    id: uuid.UUID
    name: str
    joined: datetime.datetime
    roles: frozenset[str]
    level: Level


class StrictUser(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    joined: datetime.datetime
    span: tuple[int, int]


ROW = Row(
    id=7,
    updated=datetime.datetime(2026, 11, 23, 9, 30, 15, 250, tzinfo=UTC),
    span=(3, 9),
    counts={1: "one", 20: "twenty"},
    price=decimal.Decimal("19.90"),
)
USER = User(
    id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    name="Ada",
    joined=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    roles=frozenset({"admin", "ops"}),
    level=Level.HIGH,
)

# (declared type, value): every type issue 16 names, alone, optional, in unions and nested.
CASES: list[tuple[object, object]] = [
    (tuple[int, str], (1, "a")),
    (tuple[int, ...], (1, 2, 3)),
    (tuple[()], ()),
    (set[int], {3, 1, 2}),
    (frozenset[str], frozenset({"a", "b"})),
    (datetime.datetime, datetime.datetime(2026, 11, 23, 9, 30, 15, 123456, tzinfo=UTC)),
    (datetime.datetime, datetime.datetime(2026, 11, 23, 9, 30, 15, 123456)),
    (datetime.date, datetime.date(2026, 11, 23)),
    (decimal.Decimal, decimal.Decimal("0.10")),
    (uuid.UUID, uuid.UUID("12345678-1234-5678-1234-567812345678")),
    (Colour, Colour.GREEN),
    (Level, Level.HIGH),
    (dict[int, str], {1: "one", -2: "minus two"}),
    (dict[uuid.UUID, datetime.date], {uuid.UUID(int=1): datetime.date(2026, 1, 1)}),
    (Row, ROW),
    (Point, Point(1.5, -2.0)),
    (Node, Node("root", [Node("leaf"), Node("branch", [Node("leaf")])])),
    (Movie, Movie(title="Metropolis", year=1927, released=datetime.date(1927, 1, 10))),
    (Row | None, ROW),
    (Row | None, None),
    (datetime.date | None, datetime.date(2026, 1, 1)),
    (int | str | None, 3),
    (int | str | None, "3"),
    (int | str | None, None),
    (Row | int, 5),
    (
        list[tuple[datetime.date, decimal.Decimal]],
        [(datetime.date(2026, 1, 1), decimal.Decimal(1))],
    ),
    (dict[str, list[Point]], {"path": [Point(0.0, 0.5), Point(1.5, 1.0)]}),
    (dict[int, set[Colour]], {1: {Colour.RED}, 2: set()}),
    (tuple[Row, ...], (ROW, dataclasses.replace(ROW, id=8, price=None))),
    (User, USER),
    (User | None, USER),
    (list[User], [USER, USER.model_copy(update={"name": "Grace"})]),
    (dict[int, User], {1: USER}),
    (Any, {"plain": ["json", 1, 2.5, True, None]}),
    (dict[str, object], {"plain": ["json", 1, 2.5, True, None], "nested": {"a": None}}),
    (tuple[User, dict[str, object]], (USER, {"plain": [1, "two"]})),
]


def assert_same(got: object, expected: object) -> None:
    """Equal, of the same type all the way down, datetimes with the same UTC offset."""
    assert type(got) is type(expected), (got, expected)
    assert got == expected
    if isinstance(expected, datetime.datetime):
        assert isinstance(got, datetime.datetime)
        assert got.utcoffset() == expected.utcoffset()
    if isinstance(expected, dict):
        assert isinstance(got, dict)
        assert list(got) == list(expected)
        for key in expected:
            got_key = next(k for k in got if k == key)
            assert_same(got_key, key)
            assert_same(got[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert isinstance(got, list | tuple)
        for got_item, expected_item in zip(got, expected, strict=True):
            assert_same(got_item, expected_item)
    elif isinstance(expected, set | frozenset):
        assert isinstance(got, set | frozenset)
        for item in expected:
            assert_same(next(g for g in got if g == item), item)
    elif dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        for field in dataclasses.fields(expected):
            assert_same(getattr(got, field.name), getattr(expected, field.name))
    elif isinstance(expected, pydantic.BaseModel):
        assert isinstance(got, pydantic.BaseModel)
        for name in type(expected).model_fields:
            assert_same(getattr(got, name), getattr(expected, name))


@by_format
@pytest.mark.parametrize(("tp", "value"), CASES, ids=[repr(tp) for tp, _ in CASES])
def test_a_value_comes_back_as_its_declared_type(
    serializer: TypedSerializer, tp: object, value: object
) -> None:
    assert_same(serializer.decoder(tp)(serializer.dumps(value)), value)


def test_untyped_loads_does_not_keep_the_types() -> None:
    # The reason decoder(tp) exists: the same bytes, untyped, lose what the round trip keeps.
    serializer = MsgspecJsonSerializer()
    assert serializer.loads(serializer.dumps(ROW)) == {
        "id": 7,
        "updated": "2026-11-23T09:30:15.000250Z",
        "span": [3, 9],
        "counts": {"1": "one", "20": "twenty"},
        "price": "19.90",
    }


def test_json_keeps_a_datetimes_utc_offset() -> None:
    serializer = MsgspecJsonSerializer()
    summer = datetime.datetime(2026, 7, 1, 12, 0, tzinfo=PARIS_SUMMER)
    assert_same(serializer.decoder(datetime.datetime)(serializer.dumps(summer)), summer)


def test_msgpack_returns_an_aware_datetime_as_the_same_instant_in_utc() -> None:
    # The documented limitation of MsgspecMsgpackSerializer: a timestamp carries no offset.
    serializer = MsgspecMsgpackSerializer()
    summer = datetime.datetime(2026, 7, 1, 12, 0, tzinfo=PARIS_SUMMER)
    got = serializer.decoder(datetime.datetime)(serializer.dumps(summer))
    assert got == summer
    assert got.tzinfo == UTC
    assert got.hour == 10


@by_format
def test_a_pydantic_model_configured_strict_still_decodes(serializer: TypedSerializer) -> None:
    # Stored as its JSON form, so a strict model must be validated leniently on the way back.
    value = StrictUser(joined=datetime.datetime(2026, 1, 1, tzinfo=UTC), span=(1, 2))
    assert_same(serializer.decoder(StrictUser)(serializer.dumps(value)), value)


@dataclasses.dataclass
class RowV2:
    """Row after a deploy that added a required field."""

    id: int
    updated: datetime.datetime
    span: tuple[int, int]
    counts: dict[int, str]
    owner: str


class UserV2(pydantic.BaseModel):
    id: int
    name: str


# (value written by the old code, type declared by the new code)
MISMATCHES: list[tuple[object, object]] = [
    (ROW, RowV2),
    ([1, 2], dict[str, int]),
    ({"a": 1}, list[int]),
    ((1, 2, 3), tuple[int, int]),
    ("soon", datetime.datetime),
    ("x", int),
    (1.5, int),
    ({"one": 1}, dict[int, int]),
    ("purple", Colour),
    (3, Level),
    ([1, "a"], list[int]),
    (ROW, Point),
    ({"title": "Metropolis"}, Movie),
    (USER, UserV2),
    ({"id": 1}, User | None),
    ("not-a-uuid", uuid.UUID),
]


@by_format
@pytest.mark.parametrize(("value", "tp"), MISMATCHES, ids=[repr(tp) for _, tp in MISMATCHES])
def test_a_value_of_another_type_raises_decode_error(
    serializer: TypedSerializer, value: object, tp: object
) -> None:
    decode = serializer.decoder(tp)
    with pytest.raises(DecodeError, match="does not decode into") as info:
        decode(serializer.dumps(value))
    assert isinstance(info.value, SerializationError)


@by_format
@pytest.mark.parametrize("data", [b"", b"\xc1", b'{"id": 7', b"\xff\xfe\x00"])
def test_bytes_that_are_not_the_format_raise_decode_error(
    serializer: TypedSerializer, data: bytes
) -> None:
    with pytest.raises(DecodeError):
        serializer.decoder(Row)(data)
    with pytest.raises(DecodeError):
        serializer.loads(data)


def test_the_decode_error_names_the_declared_type_and_the_place() -> None:
    serializer = MsgspecJsonSerializer()
    with pytest.raises(DecodeError) as info:
        serializer.decoder(list[int])(b'[1, 2, "3"]')
    assert "list[int]" in str(info.value)
    assert "$[2]" in str(info.value)


@by_format
@pytest.mark.parametrize(
    "tp",
    [
        datetime.date | str,
        tuple[int, ...] | list[int],
        Row | RowV2,
        User | int,
        "Row",
        Opaque,
        list[Opaque] | None,
        dict[str, tuple[int, Opaque]],
    ],
)
def test_a_type_msgspec_cannot_decode_into_is_refused_at_once(
    serializer: TypedSerializer, tp: object
) -> None:
    # Refused when the decoder is made (decoration time for @cached), not on every hit.
    with pytest.raises(SerializationError, match="cannot decode") as info:
        serializer.decoder(tp)
    assert not isinstance(info.value, DecodeError)


@by_format
def test_decoders_are_made_once_per_type(serializer: TypedSerializer) -> None:
    assert serializer.decoder(list[Row]) is serializer.decoder(list[Row])
    assert serializer.decoder(list[Row]) is not serializer.decoder(list[Point])


@by_format
@pytest.mark.parametrize(
    ("value", "named"),
    [
        (Opaque(), "Opaque"),
        ({"nested": [Opaque()]}, "Opaque"),
        (1j, "complex"),
        (lambda: None, "function"),
    ],
)
def test_a_value_that_cannot_be_encoded_raises_serialization_error_naming_its_type(
    serializer: TypedSerializer, value: object, named: str
) -> None:
    with pytest.raises(SerializationError, match=named) as info:
        serializer.dumps(value)
    assert not isinstance(info.value, DecodeError)
    assert type(value).__qualname__ in str(info.value)


def test_json_refuses_a_key_that_is_neither_string_nor_number() -> None:
    with pytest.raises(SerializationError, match="type tuple"):
        MsgspecJsonSerializer().dumps({(1, 2): "tuple key"})


def test_msgpack_refuses_an_integer_wider_than_64_bits() -> None:
    with pytest.raises(SerializationError, match="int"):
        MsgspecMsgpackSerializer().dumps({"big": 2**64})


@by_format
def test_a_value_that_contains_itself_raises_serialization_error(
    serializer: TypedSerializer,
) -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="list"):
        serializer.dumps(loop)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_untyped_json_matches_todays_json_serializer(value: object) -> None:
    today = JsonSerializer()
    serializer = MsgspecJsonSerializer()
    assert serializer.loads(serializer.dumps(value)) == today.loads(today.dumps(value)) == value
    assert serializer.loads(today.dumps(value)) == value
    assert today.loads(serializer.dumps(value)) == value


def test_untyped_json_is_plain_json_for_richer_values() -> None:
    serializer = MsgspecJsonSerializer()
    value = {"when": datetime.date(2026, 1, 1), "t": (1, 2), 3: {4}, "d": decimal.Decimal("1.5")}
    data = serializer.dumps(value)
    assert serializer.loads(data) == json.loads(data)
    assert serializer.loads(data) == {"when": "2026-01-01", "t": [1, 2], "3": [4], "d": "1.5"}


def test_untyped_msgpack_reads_what_the_msgpack_serializer_wrote() -> None:
    from aiocacheguard import MsgpackSerializer

    value = {"blob": b"\x00\xff", "n": [1, 2], 3: "int key"}
    assert MsgspecMsgpackSerializer().loads(MsgpackSerializer().dumps(value)) == value


def test_typed_decoder_uses_decoder_and_falls_back_to_loads() -> None:
    data = b'[1, "a"]'
    assert typed_decoder(MsgspecJsonSerializer(), tuple[int, str])(data) == (1, "a")
    # A serializer without decoder() keeps its own behaviour: JSON has no tuples.
    assert typed_decoder(JsonSerializer(), tuple[int, str])(data) == [1, "a"]


def test_the_msgspec_serializers_meet_both_protocols_with_their_own_tags() -> None:
    for serializer in SERIALIZERS:
        assert isinstance(serializer, Serializer)
        assert isinstance(serializer, TypedSerializer)
    assert not isinstance(JsonSerializer(), TypedSerializer)
    assert [s.tag for s in SERIALIZERS] == [4, 5]


def test_importing_the_serializers_does_not_import_pydantic() -> None:
    code = (
        "import sys, aiocacheguard.serializers as s\n"
        "s.MsgspecJsonSerializer().decoder(int)\n"
        "s.MsgspecJsonSerializer().dumps({'a': (1, 2)})\n"
        "assert 'pydantic' not in sys.modules, 'pydantic was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
