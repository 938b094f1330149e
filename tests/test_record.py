from __future__ import annotations

import struct

import pytest

from aiocacheguard.record import FORMAT_VERSION, HEADER_SIZE, Record, RecordError, header_of


def make(**overrides: object) -> Record:
    fields: dict[str, object] = {
        "payload": b'{"a":1}',
        "negative": False,
        "serializer_tag": 1,
        "stored_at": 1_700_000_000.25,
        "expires_at": 1_700_000_030.25,
        "soft_expires_at": 1_700_000_020.25,
        "compute_time": 0.125,
    }
    fields.update(overrides)
    return Record(**fields)  # type: ignore[arg-type]


def test_round_trip() -> None:
    record = make()
    assert Record.decode(record.encode()) == record


def test_round_trip_negative_without_soft_expiry() -> None:
    record = make(payload=b"", negative=True, soft_expires_at=None)
    decoded = Record.decode(record.encode())
    assert decoded.negative and decoded.payload == b"" and decoded.soft_expires_at is None


def test_version_byte_is_third() -> None:
    assert make().encode()[2] == FORMAT_VERSION == 2


def test_version_1_records_are_still_read() -> None:
    record = make()
    v1 = (
        struct.pack(
            ">2sBBBdddf",
            b"\xa7\xc6",
            1,
            0,
            1,
            record.stored_at,
            record.soft_expires_at,
            record.expires_at,
            record.compute_time,
        )
        + record.payload
    )
    assert Record.decode(v1) == record
    assert header_of(v1) == v1[:33]


def test_two_writes_in_one_clock_tick_have_different_headers() -> None:
    """The rebuild lock tells stored copies apart by header: equal times must not collide."""
    first, second = make().encode(), make().encode()
    assert header_of(first) != header_of(second)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"a": 1}',
        b"hello world, a value some other tool wrote" * 3,
        make().encode()[:20],  # truncated header
        b"\xa7\xc6" + bytes([3]) + make().encode()[3:],  # a future format version
        make(payload=b"", negative=True).encode() + b"x",  # negative with a payload
    ],
)
def test_foreign_or_corrupt_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(RecordError):
        Record.decode(data)


def test_header_is_fixed_size() -> None:
    assert len(make(payload=b"").encode()) == struct.calcsize(">2sBBBdddfQ") == HEADER_SIZE == 41


def test_signed_record_is_format_3_with_the_same_header() -> None:
    from aiocacheguard.record import SIGNED_HEADER_SIZE, Signer

    record, signer = make(), Signer(b"k" * 32)
    data = record.encode(signer, b"{ns:k}")
    assert data[2] == 3 and len(data) == SIGNED_HEADER_SIZE + len(record.payload)
    assert Record.decode(data) == record  # read (unchecked) like any other version
    assert header_of(data) == data[:HEADER_SIZE]  # the lock's identity of a stored copy
    assert data[:HEADER_SIZE] == record.encode()[:2] + b"\x03" + record.encode()[3:HEADER_SIZE]
    assert signer.verify(b"{ns:k}", data) and not signer.verify(b"{ns:k}", record.encode())
    with pytest.raises(RecordError):
        Record.decode(data[: SIGNED_HEADER_SIZE - 1])  # cut inside the signature
