"""
A soak of the library: a mixed workload from many concurrent workers for minutes, sampled every
15 s, so that a leak (memory, tasks, connections), a slowly growing p99 or a crossed reply shows.

    python benchmarks/soak.py [--duration 600] [--workers 200] [--fault-seconds 5] [--seed 0]

A throwaway redis-server is started for the run (never the machine's own). The Cache reaches it
through a `aiocacheguard.testing.FaultProxy` run in a child process, so the proxy's tasks and
CPU are not counted as the library's; ``--fault-seconds 0`` connects directly and injects no
fault. By default the proxy blackholes Redis for ``--fault-seconds`` (5) starting at 55 % of the
run, in the third quarter, so the quarters the verdict compares (second and fourth) are free of
it and the fourth shows what is left after recovery.

Workload: ``--workers`` coroutines, each in a loop: pick a key from ``--keys`` keys with Zipf
(``--zipf``) popularity, so the hottest keys draw many concurrent callers (stampedes after
each delete and expiry), then one operation (70 % get_or_load, 15 % get, 10 % set, 5 %
delete), then an exponential think time (``--think-ms`` mean). The policy has a soft TTL, so
hot keys are refreshed in the background, and ``stale_if_error``. Loaders sleep a few ms (the
database); ``--fail-rate`` of them raise `SoakLoaderError` and ``--slow-rate`` sleep past
``load_timeout`` (`LoadTimeout`); every 25th key is absent (its loader returns None, cached as
a negative result).

Correctness, checked on every call: values encode their key, so a result must be None, or a
dict whose ``key`` is the caller's key; a get_or_load of a present key must not return None,
nor a value for an absent one; a `SoakLoaderError` must name the caller's key; any other
exception must be one of the library's (`CacheGuardError`). Anything else is a violation.
``--local N`` puts an L1 of N entries (TTL a quarter of the TTL) in front of Redis; its
invalidation listener goes through the proxy too.

Every ``--interval`` seconds one sample: RSS (VmRSS of /proc/self/status), asyncio tasks (and
the most common task names), gc-tracked objects, Redis ``connected_clients`` (INFO clients, from
a separate client that counts itself) and pub/sub channels, calls/s, p50/p99 of call latency in
the window, loader calls, errors by type, the deltas of ``Cache.statistics()``, the event
loop's worst lag and the load average. The verdict (see `verdict`) compares the second quarter
of the run with the fourth, the first being warm-up. Results go to
``benchmarks/results/2026-11-26-python-svc-2cpu/soak-<commit>.{json,md}`` unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from aiocacheguard import Cache, CacheGuardError, Event, Policy
from aiocacheguard.guards.local import LocalCache
from aiocacheguard.testing import FaultProxy, RedisServer
from aiocacheguard.tools.bench import environment

RESULTS = Path(__file__).parent / "results" / "2026-11-26-python-svc-2cpu"
OPERATIONS = ("get_or_load", "get", "set", "delete")
MIX = (0.70, 0.15, 0.10, 0.05)
ABSENT_EVERY = 25  # key indexes k with k % 25 == 24 exist nowhere: their loader returns None
#: Samples' relative growth (fourth quarter over second) allowed before "not flat", and an
#: absolute slack for the small integers (tasks, connections) where 10 % is less than one.
FLAT_TOLERANCE = 0.10
FLAT_SLACK = {
    "rss_mb": 0.0, "tasks": 5.0, "lingering_tasks": 0.0, "redis_clients": 2.0, "gc_objects": 0.0
}  # fmt: skip
#: Tasks the library keeps for the Cache's life, by name prefix (the pub/sub listener, the L1's
#: invalidation listeners): all it may leave running once the workers have stopped.
LONG_LIVED = ("aiocacheguard-pubsub", "aiocacheguard-tracking")
P99_TOLERANCE = 1.5


class SoakLoaderError(Exception):
    """The failure a soak loader raises on purpose; it names its key, so a crossed one shows."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(slots=True)
class Window:
    """What happened since the last sample."""

    latencies: list[float] = field(default_factory=list)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    loader_calls: int = 0
    loader_failures: int = 0
    loader_slow: int = 0
    violations: int = 0
    max_lag: float = 0.0


@dataclass(slots=True)
class Soak:
    """The run's state, shared by the workers, the loaders and the sampler."""

    args: argparse.Namespace
    cache: Cache
    policy: Policy
    cumulative_weights: list[float]
    window: Window = field(default_factory=Window)
    stopping: bool = False
    load_rng: random.Random = field(default_factory=random.Random)
    load_serial: itertools.count[int] = field(default_factory=itertools.count)
    totals: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[dict[str, Any]] = field(default_factory=list)
    violation_count: int = 0
    log_records: collections.Counter[str] = field(default_factory=collections.Counter)
    first_seen: weakref.WeakKeyDictionary[asyncio.Task[Any], float] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    started: float = 0.0

    def now(self) -> float:
        return time.monotonic() - self.started

    def violation(self, what: str, key: str, op: str, detail: object) -> None:
        self.window.violations += 1
        self.violation_count += 1
        if len(self.violations) < 50:
            self.violations.append(
                {"t": round(self.now(), 3), "what": what, "key": key, "op": op, "detail": detail}
            )


def key_name(index: int) -> str:
    return f"k{index}"


def absent(index: int) -> bool:
    return index % ABSENT_EVERY == ABSENT_EVERY - 1


def zipf_weights(keys: int, exponent: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (rank**exponent) for rank in range(1, keys + 1)))


async def load(soak: Soak, index: int) -> dict[str, Any] | None:
    """The soak's loader: a few ms of "database", sometimes a failure or a hang."""
    window, args, rng = soak.window, soak.args, soak.load_rng
    window.loader_calls += 1
    soak.totals["loader_calls"] += 1
    draw = rng.random()
    if draw < args.fail_rate:
        window.loader_failures += 1
        await asyncio.sleep(args.loader_ms / 1000)
        raise SoakLoaderError(key_name(index))
    if draw < args.fail_rate + args.slow_rate:
        window.loader_slow += 1
        assert soak.policy.load_timeout is not None
        await asyncio.sleep(soak.policy.load_timeout * 3)  # cancelled by load_timeout first
    await asyncio.sleep(rng.uniform(0.5, 1.5) * args.loader_ms / 1000)
    if absent(index):
        return None
    return {"key": key_name(index), "n": next(soak.load_serial), "by": "loader"}


def check(soak: Soak, op: str, index: int, result: object) -> None:
    """A result must belong to its key (see the module's docstring)."""
    key = key_name(index)
    if result is None:
        if op == "get_or_load" and not absent(index):
            soak.violation("None for a present key", key, op, None)
        return
    if not isinstance(result, dict) or result.get("key") != key:
        soak.violation("another key's value", key, op, repr(result)[:200])
    elif op == "get_or_load" and absent(index):
        soak.violation("a value for an absent key", key, op, repr(result)[:200])


async def worker(soak: Soak, number: int) -> None:
    args, cache = soak.args, soak.cache
    rng = random.Random(args.seed * 1_000_003 + number)
    weights, keys = soak.cumulative_weights, args.keys
    think = args.think_ms / 1000
    while not soak.stopping:
        index = min(bisect.bisect(weights, rng.random() * weights[-1]), keys - 1)
        op = rng.choices(OPERATIONS, MIX)[0]
        if op in ("set", "delete") and absent(index):
            op = "get"  # absent keys stay absent: nothing but a loader's None is written there
        key = key_name(index)
        started = time.perf_counter()
        try:
            if op == "get_or_load":
                result = await cache.get_or_load(key, functools.partial(load, soak, index))
                check(soak, op, index, result)
            elif op == "get":
                check(soak, op, index, await cache.get(key))
            elif op == "set":
                await cache.set(key, {"key": key, "n": -1, "by": "set"})
            else:
                await cache.delete(key)
        except SoakLoaderError as exc:
            soak.window.errors[type(exc).__name__] += 1
            if exc.key != key:
                soak.violation("another key's loader error", key, op, exc.key)
        except CacheGuardError as exc:
            soak.window.errors[type(exc).__name__] += 1
        except Exception as exc:
            soak.window.errors[type(exc).__name__] += 1
            soak.violation("an exception not the library's nor the loader's", key, op, repr(exc))
        soak.window.latencies.append(time.perf_counter() - started)
        soak.window.calls[op] += 1
        if think:
            await asyncio.sleep(rng.expovariate(1 / think))


async def lag_meter(soak: Soak) -> None:
    """The event loop's lateness: how much later than asked a 50 ms sleep wakes."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(0.05)
        soak.window.max_lag = max(soak.window.max_lag, time.perf_counter() - asked - 0.05)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def task_kind(task: asyncio.Task[Any]) -> str:
    """A task's name with digits dropped ("Task-1234" -> "Task-"), so kinds can be counted."""
    return "".join(c for c in task.get_name() if not c.isdigit())


def other_tasks() -> list[asyncio.Task[Any]]:
    """Every task of the loop but the one asking (the soak's main task)."""
    return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]


def task_names() -> collections.Counter[str]:
    return collections.Counter(task_kind(task) for task in other_tasks())


def lingering(soak: Soak, now: float) -> collections.Counter[str]:
    """
    Tasks alive at the previous sample too (at least one interval old), but the soak's own:
    the library's work in flight lives a few seconds at most (wait_timeout, load_timeout), so
    beyond its pub/sub listener anything here is stuck or leaked.
    """
    found: collections.Counter[str] = collections.Counter()
    for task in other_tasks():
        kind = task_kind(task)
        born = soak.first_seen.setdefault(task, now)
        if now - born >= soak.args.interval * 0.99 and not kind.startswith("soak-"):
            found[kind] += 1
    return found


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def redis_figures(monitor: redis.Redis) -> dict[str, Any]:
    try:
        clients = await monitor.info("clients")
        stats = await monitor.info("stats")
        memory = await monitor.info("memory")
        keys = await monitor.dbsize()
    except (redis.RedisError, OSError) as exc:
        return {"redis_error": repr(exc)}
    return {
        "redis_clients": clients["connected_clients"],
        "redis_blocked_clients": clients.get("blocked_clients"),
        "redis_pubsub_channels": stats.get("pubsub_channels"),
        "redis_keys": keys,
        "redis_used_memory_mb": round(memory["used_memory"] / 2**20, 1),
    }


def take_sample(
    soak: Soak, elapsed: float, previous: dict[str, int], figures: dict[str, Any], fault: bool
) -> dict[str, Any]:
    window, soak.window = soak.window, Window()
    ordered = sorted(window.latencies)
    stats = dataclasses.asdict(soak.cache.statistics())
    deltas = {name: value - previous.get(name, 0) for name, value in stats.items()}
    previous.clear()
    previous.update(stats)
    errors = dict(window.errors.most_common())
    soak.errors.update(window.errors)
    for op, n in window.calls.items():
        soak.totals[f"calls_{op}"] += n
    names = task_names()
    stuck = lingering(soak, elapsed)
    return {
        "t": round(elapsed, 1),
        "rss_mb": round(rss_mb(), 1),
        "tasks": sum(names.values()),
        "task_names": dict(names.most_common(6)),
        "lingering_tasks": sum(stuck.values()),
        "lingering_task_names": dict(stuck),
        "gc_objects": len(gc.get_objects()),
        **figures,
        "window_s": soak.args.interval,
        "calls": len(ordered),
        "calls_per_s": round(len(ordered) / soak.args.interval, 1),
        "calls_by_op": dict(window.calls),
        "p50_ms": _ms(percentile(ordered, 0.50)),
        "p99_ms": _ms(percentile(ordered, 0.99)),
        "max_ms": _ms(ordered[-1] if ordered else None),
        "loader_calls": window.loader_calls,
        "loader_failures": window.loader_failures,
        "loader_slow": window.loader_slow,
        "errors": errors,
        "violations": window.violations,
        "statistics_delta": {name: n for name, n in deltas.items() if n},
        "max_loop_lag_ms": _ms(window.max_lag),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "log_records_total": sum(soak.log_records.values()),
        "fault_in_window": fault,
        **traced_memory(),
    }


def traced_memory() -> dict[str, float]:
    """With --tracemalloc: the live traced allocations and tracemalloc's own memory, in MB."""
    if not tracemalloc.is_tracing():
        return {}
    return {
        "traced_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 1),
        "tracemalloc_own_mb": round(tracemalloc.get_tracemalloc_memory() / 2**20, 1),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class LogCounter(logging.Handler):
    """Counts the library's log records by level and message template, instead of printing them."""

    def __init__(self, counts: collections.Counter[str]) -> None:
        super().__init__(logging.DEBUG)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname} {record.msg}"] += 1


class ProxyChild:
    """A FaultProxy in a child process, steered through its stdin: "blackhole", "heal"."""

    def __init__(self, upstream_port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-proxy", str(upstream_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def command(self, line: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        self.process.stdout.readline()  # "ok": the fault is in place

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.command("quit")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def serve_proxy(upstream_port: int) -> None:
    async with FaultProxy(upstream_port) as proxy:
        print(proxy.port, flush=True)
        while line := (await asyncio.to_thread(sys.stdin.readline)).strip():
            if line == "blackhole":
                proxy.blackhole()
            elif line == "heal":
                await proxy.heal()
            elif line == "quit":
                print("ok", flush=True)
                return
            print("ok", flush=True)


async def soak_run(server: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    proxy = ProxyChild(server.port) if args.fault_seconds > 0 else None
    port = proxy.port if proxy else server.port
    policy = Policy(
        ttl=args.ttl,
        soft_ttl=args.ttl / 2,
        negative_ttl=args.ttl / 3,
        lock_ttl=2.0,
        wait_timeout=3.0,
        load_timeout=args.load_timeout,
        stale_if_error=args.ttl / 2,
    )
    counts: collections.Counter[str] = collections.Counter()
    log_counter = LogCounter(counts)
    library_logger = logging.getLogger("aiocacheguard")
    library_logger.addHandler(log_counter)
    library_logger.propagate = False
    library_logger.setLevel(logging.DEBUG)
    events: list[tuple[float, str]] = []
    clock = time.monotonic

    def hook(event: Event) -> None:
        if event.kind.startswith("breaker"):
            events.append((clock(), event.kind))

    cache = Cache.from_url(
        f"redis://127.0.0.1:{port}/0",
        namespace=f"soak-{args.seed}",
        policy=policy,
        hook=hook,
        rng=random.Random(args.seed),
        local=LocalCache(max_entries=args.local, ttl=args.ttl / 4) if args.local else None,
    )
    soak = Soak(
        args=args,
        cache=cache,
        policy=policy,
        cumulative_weights=zipf_weights(args.keys, args.zipf),
        load_rng=random.Random(args.seed + 1),
        log_records=counts,
    )
    monitor = redis.Redis(port=server.port, socket_timeout=2.0)
    fault_start = args.duration * args.fault_at
    fault_end = fault_start + args.fault_seconds if proxy else -1.0
    healed_at: float | None = None
    samples: list[dict[str, Any]] = []
    previous: dict[str, int] = {}
    snapshots: list[tracemalloc.Snapshot] = []
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    soak.started = started = clock()
    events.clear()
    meter = asyncio.create_task(lag_meter(soak), name="soak-lag-meter")
    workers = [
        asyncio.create_task(worker(soak, n), name=f"soak-worker-{n}") for n in range(args.workers)
    ]
    print(
        f"{'t s':>6} {'RSS MB':>7} {'tasks':>6} {'linger':>6} {'clients':>7} {'calls/s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'loads':>6} {'lag ms':>7} {'load1':>5}  errors"
    )
    faulted = False
    next_sample = args.interval
    try:
        while next_sample <= args.duration + 1e-9:
            elapsed = clock() - started
            if proxy and not faulted and elapsed >= fault_start:
                await asyncio.to_thread(proxy.command, "blackhole")
                faulted = True
                print(f"{elapsed:6.1f} fault: Redis blackholed for {args.fault_seconds:g} s")
            if proxy and faulted and healed_at is None and elapsed >= fault_end:
                await asyncio.to_thread(proxy.command, "heal")
                healed_at = clock() - started
                print(f"{healed_at:6.1f} fault: healed")
            if elapsed >= next_sample:
                window_start = next_sample - args.interval
                fault = (
                    faulted and window_start < (healed_at or elapsed) and next_sample > fault_start
                )
                sample = take_sample(soak, elapsed, previous, await redis_figures(monitor), fault)
                samples.append(sample)
                print_sample(sample)
                next_sample += args.interval
                if args.tracemalloc and not snapshots and elapsed >= args.duration / 4:
                    snapshots.append(tracemalloc.take_snapshot())  # the end of warm-up
            await asyncio.sleep(0.05)
    finally:
        soak.stopping = True
        _, pending = await asyncio.wait(workers, timeout=max(5.0, 3 * args.load_timeout))
        for task in pending:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        meter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await meter
        if args.tracemalloc:
            snapshots.append(tracemalloc.take_snapshot())
        tasks_before_close = task_names()
        await cache.aclose()
        tasks_after_close = task_names()
        # The proxy closes its upstream side after the client's: give it up to 5 s.
        for _ in range(50):
            clients_after_close = await redis_figures(monitor)
            if clients_after_close.get("redis_clients", 0) <= 1:
                break
            await asyncio.sleep(0.1)
        await monitor.aclose()
        if proxy:
            proxy.stop()
        library_logger.removeHandler(log_counter)
    stop_stragglers = len(pending)
    result: dict[str, Any] = {
        "samples": samples,
        "totals": dict(soak.totals),
        "errors": dict(soak.errors.most_common()),
        "violations": soak.violation_count,
        "violation_examples": soak.violations,
        "statistics": dataclasses.asdict(cache.statistics()),
        "fault": None
        if proxy is None
        else {
            "kind": "blackhole through a FaultProxy in a child process",
            "start_s": round(fault_start, 1),
            "healed_s": None if healed_at is None else round(healed_at, 1),
            "breaker_events": [(round(t - started, 2), kind) for t, kind in events],
        },
        "shutdown": {
            "workers_cancelled_at_stop": stop_stragglers,
            "tasks_before_aclose": dict(tasks_before_close),
            "tasks_after_aclose": dict(tasks_after_close),
            "redis_after_aclose": clients_after_close,
        },
        "log_records": dict(counts),
    }
    if len(snapshots) == 2:
        top = snapshots[1].compare_to(snapshots[0], "lineno")[:15]
        result["tracemalloc_growth_after_warmup"] = [str(stat) for stat in top]
    return result


def print_sample(s: dict[str, Any]) -> None:
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "-"
    flag = "  [fault]" if s["fault_in_window"] else ""
    violations = f"  VIOLATIONS {s['violations']}" if s["violations"] else ""
    print(
        f"{s['t']:6.0f} {s['rss_mb']:7.1f} {s['tasks']:6d} {s['lingering_tasks']:6d} "
        f"{s.get('redis_clients', '?'):>7} "
        f"{s['calls_per_s']:8.0f} {s['p50_ms'] or 0:7.2f} {s['p99_ms'] or 0:7.1f} "
        f"{s['loader_calls']:6d} {s['max_loop_lag_ms']:7.1f} {s['load_average_1m']:5.2f}  "
        f"{errors}{violations}{flag}",
        flush=True,
    )


def quarters(samples: list[dict[str, Any]], duration: float) -> list[list[dict[str, Any]]]:
    """The samples of each quarter of the run, by their time."""
    out: list[list[dict[str, Any]]] = [[], [], [], []]
    for s in samples:
        middle = s["t"] - s["window_s"] / 2  # a window belongs where most of it lies
        out[min(3, int(4 * middle / duration))].append(s)
    return out


CRITERION = (
    "Flat after warm-up, for RSS, asyncio tasks, lingering tasks, Redis connected clients and "
    "gc-tracked objects: the first quarter of the run is warm-up; the fourth quarter's mean is "
    "at most 10 % above the second's (plus 5 tasks, 2 clients), and there is no monotonic "
    "growth, meaning not (Q2 < Q3 < Q4 with Q4 more than 5 % above Q2); a drop is not a leak "
    "and passes. The monotonic test is not applied to the total of tasks, which is 200 workers "
    "plus the work in flight and so follows latency (Little's law); it is applied to lingering "
    "tasks (alive at two samples in a row, the soak's own left out), where a leak would show. "
    "At rest: once the workers have stopped, no task but the pub/sub and L1 invalidation "
    "listeners; after aclose(), "
    "none, and Redis has only the sampling client. p99 stable: the median of the fourth "
    "quarter's window p99s is at most 1.5 x the second's (windows that saw the fault left out). "
    "And 0 violations."
)


def verdict(
    samples: list[dict[str, Any]], duration: float, violations: int, shutdown: dict[str, Any]
) -> dict[str, Any]:
    """Judge the samples and the shutdown by `CRITERION`."""
    qs = quarters(samples, duration)
    checks: dict[str, Any] = {}
    ok: bool | None = violations == 0
    for metric in ("rss_mb", "tasks", "lingering_tasks", "redis_clients", "gc_objects"):
        means = [_mean([s[metric] for s in q if s.get(metric) is not None]) for q in qs]
        q2, q3, q4 = means[1], means[2], means[3]
        if q2 is None or q4 is None:
            checks[metric] = {"quarter_means": means, "pass": None}
            ok = None  # too short a run to judge
            continue
        bound = q2 * (1 + FLAT_TOLERANCE) + FLAT_SLACK[metric]
        monotonic = metric != "tasks" and q3 is not None and q2 < q3 < q4 and q4 > q2 * 1.05
        passed = q4 <= bound and not monotonic
        ok = ok if ok is None or passed else False
        checks[metric] = {
            "quarter_means": [None if m is None else round(m, 2) for m in means],
            "q4_over_q2": round(q4 / q2, 3) if q2 else None,
            "bound": round(bound, 2),
            "monotonic_growth": monotonic,
            "pass": passed,
        }
    p99 = [
        statistics.median(values) if values else None
        for values in (
            [s["p99_ms"] for s in q if s["p99_ms"] is not None and not s["fault_in_window"]]
            for q in qs
        )
    ]
    if p99[1] is not None and p99[3] is not None:
        p99_pass = p99[3] <= p99[1] * P99_TOLERANCE
        ok = ok if ok is None or p99_pass else False
        checks["p99_ms"] = {
            "quarter_medians": p99,
            "q4_over_q2": round(p99[3] / p99[1], 3),
            "pass": p99_pass,
        }
    else:
        ok = ok if ok is False else None
    left = {
        k: n for k, n in shutdown["tasks_before_aclose"].items() if not k.startswith(LONG_LIVED)
    }
    at_rest = (
        not left
        and not shutdown["tasks_after_aclose"]
        and shutdown["redis_after_aclose"].get("redis_clients") == 1
    )
    ok = ok if ok is None or at_rest else False
    checks["at_rest"] = {"pass": at_rest, **shutdown}
    checks["violations"] = {"count": violations, "pass": violations == 0}
    return {"pass": ok, "checks": checks, "criterion": CRITERION}


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def markdown(document: dict[str, Any]) -> str:
    config, env, result = document["config"], document["versions"], document["results"]
    v = result["verdict"]
    lines = [
        f"# Soak of aiocacheguard {env.get('aiocacheguard_commit')}",
        "",
        f"Started {document['started_at']}, `{' '.join(document['argv'])}`.",
        "",
        "Configuration: " + ", ".join(f"{k}={v}" for k, v in config.items()) + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "load_average") + ".",
        "",
        f"Load average (1/5/15 min) at start {document['load_average_start']}, at end "
        f"{document['load_average_end']}; per window in the table (2 CPUs shared with other "
        "sessions' test runs).",
        "",
    ]
    if result["fault"]:
        f = result["fault"]
        lines += [
            f"Fault: Redis blackholed through a FaultProxy from t={f['start_s']} s, healed at "
            f"t={f['healed_s']} s; breaker events: "
            + (", ".join(f"{kind} at {t} s" for t, kind in f["breaker_events"]) or "none")
            + ".",
            "",
        ]
    lines += [
        "| t s | RSS MB | tasks | lingering tasks | Redis clients | calls/s | p50 ms | p99 ms "
        "| loader calls | errors | violations | loop lag ms | load 1m |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for s in result["samples"]:
        errors = ", ".join(f"{k} {n}" for k, n in s["errors"].items()) or "-"
        lines.append(
            f"| {s['t']:.0f}{' (fault)' if s['fault_in_window'] else ''} | {s['rss_mb']:.1f} "
            f"| {s['tasks']} | {s['lingering_tasks']} | {s.get('redis_clients', '?')} "
            f"| {s['calls_per_s']:,.0f} "
            f"| {s['p50_ms']} | {s['p99_ms']} | {s['loader_calls']:,} | {errors} "
            f"| {s['violations']} | {s['max_loop_lag_ms']} | {s['load_average_1m']} |"
        )
    lines += ["", f"**Verdict: {verdict_word(v['pass'])}.** {v['criterion']}", ""]
    for name, check in v["checks"].items():
        lines.append(f"- {name}: {json.dumps(check)}")
    lines += [
        "",
        f"Totals: {json.dumps(result['totals'])}; errors {json.dumps(result['errors'])}.",
        "",
        f"Cache.statistics() at the end: {json.dumps(result['statistics'])}.",
        "",
        f"Shutdown: {json.dumps(result['shutdown'])}.",
        "",
        f"Library log records by level and message: {json.dumps(result['log_records'])}.",
        "",
    ]
    growth = result.get("tracemalloc_growth_after_warmup")
    if growth:
        lines += [
            "tracemalloc, the largest differences from the end of warm-up to the end of the run "
            "(workers stopped, Cache still open):",
            "",
            *(f"    {line}" for line in growth),
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--think-ms", type=float, default=50.0, help="mean pause between calls")
    parser.add_argument("--loader-ms", type=float, default=5.0, help="a loader's mean duration")
    parser.add_argument("--fail-rate", type=float, default=0.03, help="loaders that raise")
    parser.add_argument("--slow-rate", type=float, default=0.01, help="loaders that hang")
    parser.add_argument("--ttl", type=float, default=10.0, help="soft TTL is half of it")
    parser.add_argument("--load-timeout", type=float, default=0.5)
    parser.add_argument("--fault-at", type=float, default=0.55, help="fraction of the run")
    parser.add_argument("--fault-seconds", type=float, default=5.0, help="0: no proxy, no fault")
    parser.add_argument(
        "--tracemalloc", type=int, default=0, metavar="FRAMES", help="trace allocations (slow)"
    )
    parser.add_argument(
        "--local", type=int, default=0, metavar="ENTRIES", help="an L1 of this size (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-record", action="store_true", help="print only, write no files")
    parser.add_argument("--serve-proxy", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy is not None:
        asyncio.run(serve_proxy(args.serve_proxy))
        return 0

    config = {
        name: getattr(args, name)
        for name in (
            "duration", "workers", "interval", "keys", "zipf", "think_ms", "loader_ms",
            "fail_rate", "slow_rate", "ttl", "load_timeout", "fault_at", "fault_seconds",
            "tracemalloc", "local", "seed",
        )
    }  # fmt: skip
    config["mix"] = dict(zip(OPERATIONS, MIX, strict=True))
    with RedisServer() as server:
        env = environment(server.url)
        env.update(git_commit())
        started = time.time()
        load_start = os.getloadavg()
        print(f"soak: {json.dumps(config)}")
        print(f"versions: {json.dumps(env)}", flush=True)
        result = asyncio.run(soak_run(server, args))
    result["verdict"] = verdict(
        result["samples"], args.duration, result["violations"], result["shutdown"]
    )
    document = {
        "tool": "benchmarks/soak.py",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "argv": sys.argv,
        "config": config,
        "versions": env,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "results": result,
    }
    summary(result)
    if not args.no_record:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.out_dir / f"soak-{env.get('aiocacheguard_commit') or 'unknown'}"
        for n in itertools.count(2):
            if not stem.with_suffix(".json").exists():
                break
            stem = stem.with_name(f"{stem.name.split('~')[0]}~{n}")
        stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(document))
        print(f"wrote {stem}.json and {stem}.md")
    return 1 if result["verdict"]["pass"] is False else 0


def summary(result: dict[str, Any]) -> None:
    v = result["verdict"]
    print(f"errors: {json.dumps(result['errors'])}")
    print(f"violations: {result['violations']}")
    print(f"shutdown: {json.dumps(result['shutdown'])}")
    print(f"library log records: {json.dumps(result['log_records'])}")
    for line in result.get("tracemalloc_growth_after_warmup", []):
        print(f"  tracemalloc: {line}")
    for name, check in v["checks"].items():
        print(f"  {name}: {json.dumps(check)}")
    print(f"verdict: {verdict_word(v['pass'])} ({v['criterion']})")


def verdict_word(passed: bool | None) -> str:
    return "INCONCLUSIVE (too few samples)" if passed is None else "PASS" if passed else "FAIL"


def git_commit() -> dict[str, Any]:
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "log", "-1", "--format=%h"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {"aiocacheguard_commit": None}
    return {"aiocacheguard_commit": commit, "tree_dirty": bool(dirty)}


if __name__ == "__main__":
    sys.exit(main())
