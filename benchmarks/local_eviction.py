"""
Which eviction policy the L1 (`aiocacheguard.guards.local`) keeps: LRU, CLOCK or W-TinyLFU,
measured on a skewed (Zipf) workload, and how fast a hit is.

    python benchmarks/local_eviction.py [--keys 100000] [--requests 1000000] [--seed 1]

Part 1 replays one Zipf trace (``--keys`` distinct keys, exponent ``--zipf``) through each
policy at two capacities (1 % and 10 % of the keys) and prints the hit ratio. The policies are
small reference models of the same size as the store would hold:

    lru        exact LRU: an OrderedDict, ``move_to_end`` on every hit
    clock      CLOCK (second chance): a dict in insertion order as the ring, a hit only sets a
               reference bit; eviction re-queues referenced entries once
    w-tinylfu  Caffeine's W-TinyLFU: a 1 % LRU window, a segmented LRU main space (20 %
               probation, 80 % protected), admission from the window to the main space by a
               4-row count-min sketch (halved every 10 x capacity additions)
    shipped    `LocalStore` itself, driven as the Cache drives it (get; on a miss, begin_fill
               and finish_fill): LRU with TinyLFU admission fed by misses

It then weighs each hit ratio by what a miss costs the L1's user (``--miss-us``, a Redis round
trip, 140 us by default: the ~7 k/s raw GET measured in issue 12) against the policy's own cost
per operation, measured in the same replay.

Part 2 measures `LocalStore.get` on present keys (hits/s), with and without copy_on_read, and
the store's eviction cost (fills/s into a full store).

Every result line carries the configuration and the seed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Hashable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiocacheguard.guards.local import LocalCache, LocalStore


class LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: collections.OrderedDict[Hashable, int] = collections.OrderedDict()

    def contains(self, key: Hashable) -> bool:
        return key in self.data

    def access(self, key: Hashable) -> bool:
        data = self.data
        if key in data:
            data.move_to_end(key)
            return True
        data[key] = 1
        if len(data) > self.capacity:
            data.popitem(last=False)
        return False


class Clock:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: dict[Hashable, list[int]] = {}

    def contains(self, key: Hashable) -> bool:
        return key in self.data

    def access(self, key: Hashable) -> bool:
        data = self.data
        entry = data.get(key)
        if entry is not None:
            entry[0] = 1
            return True
        data[key] = [0]
        while len(data) > self.capacity:
            oldest = next(iter(data))
            bit = data.pop(oldest)
            if bit[0]:
                bit[0] = 0
                data[oldest] = bit
        return False


class Sketch:
    """
    Count-min sketch: 4 rows of saturating counters (at most 15), all halved every 10 x
    capacity additions (Caffeine's aging). One ``hash()`` a key, its bits split between rows.
    """

    _HALF = bytes(c >> 1 for c in range(256))

    def __init__(self, capacity: int) -> None:
        width = 1
        while width < capacity:
            width <<= 1
        self.mask = width - 1
        self.bits = width.bit_length() - 1
        self.rows = [bytearray(width) for _ in range(4)]
        self.additions = 0
        self.sample = 10 * capacity

    def add(self, key: Hashable) -> None:
        h = hash(key) * 0x9E3779B97F4A7C15
        mask, bits = self.mask, self.bits
        for row in self.rows:
            i = h & mask
            if row[i] < 15:
                row[i] += 1
            h >>= bits
        self.additions += 1
        if self.additions >= self.sample:
            self.additions //= 2
            for row in self.rows:
                row[:] = row.translate(self._HALF)

    def estimate(self, key: Hashable) -> int:
        h = hash(key) * 0x9E3779B97F4A7C15
        mask, bits = self.mask, self.bits
        least = 15
        for row in self.rows:
            least = min(least, row[h & mask])
            h >>= bits
        return least


class Shipped:
    """`LocalStore` itself, as the Cache drives it: get, and on a miss begin + finish a fill."""

    def __init__(self, capacity: int) -> None:
        self.store: LocalStore[Hashable, int] = LocalStore(
            LocalCache(max_entries=capacity, ttl=3600.0)
        )

    def contains(self, key: Hashable) -> bool:
        return self.store.get(key) is not None

    def access(self, key: Hashable) -> bool:
        store = self.store
        if store.get(key) is not None:
            return True
        store.finish_fill(key, store.begin_fill(key), 1)
        return False


class WTinyLFU:
    def __init__(self, capacity: int) -> None:
        self.window_cap = max(1, capacity // 100)
        main = capacity - self.window_cap
        self.protected_cap = int(main * 0.8)
        self.probation_cap = main - self.protected_cap
        self.window: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self.probation: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self.protected: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self.sketch = Sketch(capacity)

    def contains(self, key: Hashable) -> bool:
        return key in self.window or key in self.probation or key in self.protected

    def access(self, key: Hashable) -> bool:
        self.sketch.add(key)
        if key in self.window:
            self.window.move_to_end(key)
            return True
        if key in self.protected:
            self.protected.move_to_end(key)
            return True
        if key in self.probation:
            del self.probation[key]
            self.protected[key] = None
            if len(self.protected) > self.protected_cap:
                demoted, _ = self.protected.popitem(last=False)
                self.probation[demoted] = None
            return True
        self.window[key] = None
        if len(self.window) > self.window_cap:
            candidate, _ = self.window.popitem(last=False)
            if len(self.probation) + len(self.protected) < self.probation_cap + self.protected_cap:
                self.probation[candidate] = None
            else:
                victim = next(iter(self.probation)) if self.probation else None
                if victim is None:
                    victim = next(iter(self.protected))
                    if self.sketch.estimate(candidate) > self.sketch.estimate(victim):
                        del self.protected[victim]
                        self.probation[candidate] = None
                elif self.sketch.estimate(candidate) > self.sketch.estimate(victim):
                    del self.probation[victim]
                    self.probation[candidate] = None
        return False


POLICIES: dict[str, type[LRU | Clock | WTinyLFU | Shipped]] = {
    "lru": LRU,
    "clock": Clock,
    "w-tinylfu": WTinyLFU,
    "shipped": Shipped,
}


def zipf_trace(keys: int, requests: int, exponent: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1) ** exponent
    ranks = rng.choice(keys, size=requests, p=weights / weights.sum())
    # Hot keys are not the small integers: a permutation spreads them over the key space.
    labels = rng.permutation(keys)
    return [int(k) for k in labels[ranks]]


def eviction(args: argparse.Namespace) -> None:
    trace = zipf_trace(args.keys, args.requests, args.zipf, args.seed)
    print(
        f"# eviction: keys={args.keys:_} requests={args.requests:_} zipf={args.zipf} "
        f"seed={args.seed} miss_cost={args.miss_us} us"
    )
    print(
        f"{'capacity':>9} {'policy':>10} {'hit ratio':>9} {'us/op':>6} {'us/hit':>6} "
        f"{'us/request':>10}"
    )
    for capacity in (args.keys // 100, args.keys // 10):
        for name, policy_class in POLICIES.items():
            policy = policy_class(capacity)
            access = policy.access
            started = time.perf_counter()
            hits = sum(access(key) for key in trace)
            per_op = (time.perf_counter() - started) / len(trace) * 1e6
            ratio = hits / len(trace)
            # What a request costs the user: the policy's own work, plus a Redis trip per miss.
            per_request = per_op + (1 - ratio) * args.miss_us
            # The hit alone: replay keys the policy holds now.
            resident = [key for key in trace[-50_000:] if policy.contains(key)][:20_000]
            started = time.perf_counter()
            for key in resident:
                access(key)
            per_hit = (time.perf_counter() - started) / max(1, len(resident)) * 1e6
            print(
                f"{capacity:>9_} {name:>10} {ratio:>9.4f} {per_op:>6.2f} {per_hit:>6.2f} "
                f"{per_request:>10.1f}"
            )


def hit_speed(args: argparse.Namespace) -> None:
    print(f"# store: LocalStore.get on present keys, {args.hit_ops:_} reads, best of 5")
    for copy_on_read in (False, True):
        hot: LocalStore[str, dict[str, object]] = LocalStore(
            LocalCache(max_entries=10_000, ttl=60.0, copy_on_read=copy_on_read)
        )
        keys = [f"k{i}" for i in range(1000)]
        for key in keys:
            token = hot.begin_fill(key)
            hot.finish_fill(key, token, {"id": 1, "name": "x" * 20}, size=40)
        get = hot.get
        reads = (keys * (args.hit_ops // len(keys) + 1))[: args.hit_ops]
        best = 0.0
        for _ in range(5):
            started = time.perf_counter()
            for key in reads:
                get(key)
            best = max(best, len(reads) / (time.perf_counter() - started))
        print(f"copy_on_read={copy_on_read!s:<5}  hits/s={best:>12,.0f}")
    plain = {f"k{i}": {"id": 1} for i in range(1000)}
    reads = (list(plain) * (args.hit_ops // len(plain) + 1))[: args.hit_ops]
    best = 0.0
    for _ in range(5):
        lookup = plain.get
        started = time.perf_counter()
        for key in reads:
            lookup(key)
        best = max(best, len(reads) / (time.perf_counter() - started))
    print(f"baseline: dict.get      hits/s={best:>12,.0f}")
    store: LocalStore[str, int] = LocalStore(LocalCache(max_entries=10_000, ttl=60.0))
    started = time.perf_counter()
    fills = 200_000
    for i in range(fills):
        key = f"f{i}"
        store.finish_fill(key, store.begin_fill(key), i, size=8)
    elapsed = time.perf_counter() - started
    stats = store.statistics()
    print(
        f"one-off fills into a full store (max_entries=10_000): {fills / elapsed:,.0f}/s, "
        f"evictions={stats.local_evictions:_} refused={stats.refused:_}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--zipf", type=float, default=0.9, help="Zipf exponent")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--miss-us", type=float, default=140.0, help="cost of a miss, us")
    parser.add_argument("--hit-ops", type=int, default=1_000_000)
    parser.add_argument("--skip-eviction", action="store_true")
    args = parser.parse_args()
    if not args.skip_eviction:
        eviction(args)
    hit_speed(args)


if __name__ == "__main__":
    main()
