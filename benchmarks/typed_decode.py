"""
Encode and decode cost of the serializers, on the hit path's side of Redis: today's stdlib
`JsonSerializer` against msgspec untyped and msgspec typed, in the same run, interleaved.

    python benchmarks/typed_decode.py [--number 20000] [--repeats 9] [--seed 0] [--json PATH]

Two values. A ~200 B dict of JSON types, which every serializer can store. A typed row (a
dataclass with an aware datetime, a tuple and an int-keyed dict), which today's JsonSerializer
cannot encode: its baselines are what a user does today, stdlib json with hand-written
conversion both ways, or pickle (unsafe on a shared Redis); "json.loads, untyped" decodes the very
bytes msgspec wrote, which is what today's hit path would cost on them, wrong types and all.

Each figure is the median over the repeats of one op's time (``--number`` ops per sample); the
ratio is the op rate over the baseline's, so above 1 means faster than today's JsonSerializer.
No Redis: a hit costs one GET plus one decode, and this measures the decode.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from aiocacheguard import JsonSerializer, PickleSerializer, __version__
from aiocacheguard.serializers import (
    MsgpackSerializer,
    MsgspecJsonSerializer,
    MsgspecMsgpackSerializer,
)

DICT_VALUE: dict[str, Any] = {
    "id": 1234,
    "name": "Ada Lovelace",
    "email": "ada@example.org",
    "tags": ["math", "engines", "poetry"],
    "score": 4.25,
    "active": True,
    "address": {"city": "London", "postcode": "W1J 7NT"},
    "visits": [3, 14, 15, 92, 65],
    "manager": None,
}


@dataclasses.dataclass
class Row:
    id: int
    name: str
    updated: datetime.datetime
    span: tuple[int, int]
    counts: dict[int, int]


ROW = Row(
    id=1234,
    name="Ada Lovelace",
    updated=datetime.datetime(2026, 11, 23, 9, 30, 15, 250000, tzinfo=datetime.UTC),
    span=(3, 9),
    counts={1: 10, 2: 20, 3: 30, 40: 400},
)


def row_to_json(row: Row) -> bytes:
    """What a user writes today to put a Row through stdlib json."""
    plain = dataclasses.asdict(row)
    plain["updated"] = row.updated.isoformat()
    return json.dumps(plain, separators=(",", ":")).encode()


def row_from_json(data: bytes) -> Row:
    plain = json.loads(data)
    return Row(
        id=plain["id"],
        name=plain["name"],
        updated=datetime.datetime.fromisoformat(plain["updated"]),
        span=(plain["span"][0], plain["span"][1]),
        counts={int(k): v for k, v in plain["counts"].items()},
    )


Op = tuple[Callable[[Any], Any], Any]


def contenders() -> dict[str, dict[str, Op]]:
    """Scenario -> contender -> (function, argument). The first contender is the baseline."""
    today = JsonSerializer()
    mjson = MsgspecJsonSerializer()
    mpack = MsgspecMsgpackSerializer()
    pack = MsgpackSerializer()
    pickler = PickleSerializer()
    dict_json = today.dumps(DICT_VALUE)
    row_json = mjson.dumps(ROW)
    assert mjson.decoder(Row)(row_json) == ROW == row_from_json(row_to_json(ROW))
    return {
        "dict encode": {
            "JsonSerializer (stdlib)": (today.dumps, DICT_VALUE),
            "msgspec JSON": (mjson.dumps, DICT_VALUE),
            "MsgpackSerializer": (pack.dumps, DICT_VALUE),
            "msgspec MessagePack": (mpack.dumps, DICT_VALUE),
        },
        "dict decode": {
            "JsonSerializer (stdlib)": (today.loads, dict_json),
            "msgspec JSON untyped": (mjson.loads, mjson.dumps(DICT_VALUE)),
            "msgspec JSON typed dict[str, object]": (
                mjson.decoder(dict[str, object]),
                mjson.dumps(DICT_VALUE),
            ),
            "MsgpackSerializer": (pack.loads, pack.dumps(DICT_VALUE)),
            "msgspec MessagePack untyped": (mpack.loads, mpack.dumps(DICT_VALUE)),
            "msgspec MessagePack typed dict[str, object]": (
                mpack.decoder(dict[str, object]),
                mpack.dumps(DICT_VALUE),
            ),
        },
        "row encode": {
            "stdlib json + hand conversion": (row_to_json, ROW),
            "PickleSerializer": (pickler.dumps, ROW),
            "msgspec JSON": (mjson.dumps, ROW),
            "msgspec MessagePack": (mpack.dumps, ROW),
        },
        "row decode": {
            "json.loads, untyped (today's hit path)": (today.loads, row_json),
            "stdlib json + hand conversion": (row_from_json, row_to_json(ROW)),
            "PickleSerializer": (pickler.loads, pickler.dumps(ROW)),
            "msgspec JSON untyped": (mjson.loads, row_json),
            "msgspec JSON typed Row": (mjson.decoder(Row), row_json),
            "msgspec MessagePack typed Row": (mpack.decoder(Row), mpack.dumps(ROW)),
        },
    }


def measure(number: int, repeats: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    rng = random.Random(seed)
    scenarios = contenders()
    timers = {
        scenario: {
            name: timeit.Timer("op(arg)", globals={"op": op, "arg": arg})
            for name, (op, arg) in ops.items()
        }
        for scenario, ops in scenarios.items()
    }
    samples: dict[str, dict[str, list[float]]] = {
        scenario: {name: [] for name in ops} for scenario, ops in scenarios.items()
    }
    for scenario, ops in timers.items():
        for timer in ops.values():  # warm up
            timer.timeit(number // 10 or 1)
        for _ in range(repeats):
            order = list(ops)
            rng.shuffle(order)  # interleaved, in random order: drift hits every contender alike
            for name in order:
                samples[scenario][name].append(ops[name].timeit(number) / number)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, by_name in samples.items():
        baseline = statistics.median(next(iter(by_name.values())))
        results[scenario] = {}
        for name, times in by_name.items():
            median = statistics.median(times)
            results[scenario][name] = {
                "ns_per_op": median * 1e9,
                "ops_per_s": 1 / median,
                "ratio_over_baseline": baseline / median,
                "spread_ns": (max(times) - min(times)) * 1e9,
            }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20_000, help="ops per sample")
    parser.add_argument("--repeats", type=int, default=9, help="samples per contender")
    parser.add_argument("--seed", type=int, default=0, help="seeds the interleaving order")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    config = {
        "number": args.number,
        "repeats": args.repeats,
        "seed": args.seed,
        "dict_json_bytes": len(JsonSerializer().dumps(DICT_VALUE)),
        "row_json_bytes": len(MsgspecJsonSerializer().dumps(ROW)),
        "aiocacheguard": __version__,
        "msgspec": msgspec.__version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(f"typed decode: {json.dumps(config)}")
    results = measure(args.number, args.repeats, args.seed)
    for scenario, by_name in results.items():
        print(f"\n{scenario}")
        for name, figures in by_name.items():
            print(
                f"  {name:44} {figures['ops_per_s'] / 1e6:6.2f} M ops/s  "
                f"{figures['ns_per_op']:7.0f} ns/op  ratio {figures['ratio_over_baseline']:5.2f}x"
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"config": config, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
