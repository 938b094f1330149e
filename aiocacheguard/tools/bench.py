"""
The stampede harness: N coroutines in each of P processes, released together at one key.

Each strategy runs in fresh worker processes against a fresh key of its own. Workers park their
callers, report ready, and release them at one wall-clock instant the parent hands out; each
caller's latency runs from that instant until it has its answer. Loader calls are counted in
each worker and summed; Redis commands are the difference of ``INFO commandstats`` around the
run (the harness's own seeding and INFO calls excluded).

Strategies:
    ideal          no Redis: one in-memory task per process shared by every caller. The floor
                   any asyncio cache can reach in this process layout on this machine, to read
                   the others against (its loader calls are one per process).
    naive          GET; on a miss, load and SET. What most code does.
    seed-mutex     SET NX lock; the holder loads and SETs; the others retry GET 3 x 10 ms,
                   then give up empty (the seed project's Go design).
    singleflight   aiocacheguard with ``Policy(lock=False)``: one load per process.
    guard          aiocacheguard's default: single-flight plus the rebuild lock, waiters
                   notified by pub/sub: one load in total.
    soft-ttl       the key is past its soft TTL: everyone is served the stale value while one
                   background refresh runs.
    xfetch         the key expires a quarter of a load time after the release: XFetch
                   (beta 1) refreshes it early in the background.

The raw strategies (naive, seed-mutex) use a blocking pool of 50 connections, so they measure
the stampede rather than redis-py's pool limit (a default pool raises past 100 connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import random
import signal
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis

from .._redact import redact, redact_url
from .._version import __version__
from ..backend import url_options, warn_if_unverified
from ..errors import InsecureTLSWarning
from ..keys import KeySpace
from ..record import Record

__all__ = ("STRATEGIES", "BenchConfig", "BenchError", "RoundResult", "StrategyResult", "run_bench")

STRATEGIES = ("ideal", "naive", "seed-mutex", "singleflight", "guard", "soft-ttl", "xfetch")
VALUE = {"board": [{"player": "ada", "score": 42}, {"player": "grace", "score": 41}]}
_RAW_POOL = 50


class BenchError(Exception):
    """The benchmark could not run (bad configuration, Redis unreachable, a worker failed)."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    coroutines: int = 10_000
    processes: int = 1
    loader_ms: float = 50.0
    rounds: int = 1
    strategies: tuple[str, ...] = STRATEGIES
    seed: int = 0
    redis_url: str = field(default="", repr=False)  # it may hold a password
    #: ``redis_url`` is a node of a Redis Cluster (a Sentinel URL says so by its scheme).
    cluster: bool = False
    #: More strategies, name -> "module:function" (see benchmarks/peers.py): an async function
    #: ``(job, load) -> (get, close)`` importable in the worker processes.
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.coroutines >= 1, "--coroutines must be at least 1"),
            (self.coroutines <= 1_000_000, "--coroutines must be at most 1,000,000"),
            (1 <= self.processes <= 64, "--processes must be from 1 to 64"),
            (0 <= self.loader_ms <= 60_000, "--loader-ms must be from 0 to 60000"),
            (1 <= self.rounds <= 100, "--rounds must be from 1 to 100"),
            (bool(self.strategies), "name at least one strategy"),
        ]
        for ok, message in checks:
            if not ok:
                raise BenchError(message)
        unknown = [s for s in self.strategies if s not in STRATEGIES and s not in self.extra]
        if unknown:
            raise BenchError(
                f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}"
            )


@dataclass(kw_only=True)
class RoundResult:
    strategy: str
    round: int
    loader_calls: int
    served: int
    empty: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    redis_commands: int
    wall_ms: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("latencies_ms")
        return out


@dataclass(kw_only=True)
class StrategyResult:
    strategy: str
    rounds: list[RoundResult]

    def median(self, name: str) -> float:
        return float(statistics.median(getattr(r, name) for r in self.rounds))

    def summary(self) -> dict[str, Any]:
        names = (
            "loader_calls", "served", "empty", "errors", "p50_ms", "p95_ms", "p99_ms",
            "max_ms", "redis_commands", "wall_ms",
        )  # fmt: skip
        return {name: self.median(name) for name in names}


def control_client(url: str, *, cluster: bool = False, timeout: float = 10.0) -> Any:
    """A synchronous client of the deployment (standalone, cluster, or Sentinel's primary)."""
    from .operations import is_sentinel_url, parse_sentinel_url

    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": 2}
    if is_sentinel_url(url):
        sentinels, service, db, given = parse_sentinel_url(url)
        options.update(given)
        sentinel = redis.Sentinel(sentinels, sentinel_kwargs=options, **options)
        return sentinel.master_for(service, db=db)
    if cluster:
        return redis.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def _close(client: Any) -> None:
    """Close a `control_client`, with a Sentinel client's connections to its sentinels."""
    client.close()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


def topology(config: BenchConfig) -> str:
    """standalone, cluster or sentinel: the deployment the run went against."""
    from .operations import is_sentinel_url

    if config.cluster:
        return "cluster"
    return "sentinel" if is_sentinel_url(config.redis_url) else "standalone"


def environment(redis_url: str, *, cluster: bool = False) -> dict[str, Any]:
    """Versions and machine, for the record of a run."""
    import redis as redis_py

    info: dict[str, Any] = {}
    try:
        client = control_client(redis_url, cluster=cluster, timeout=2)
        info = client.info("server")
        if "redis_version" not in info:  # a cluster client answering per node
            info = next((v for v in info.values() if isinstance(v, dict)), {})
        _close(client)
    except (redis.RedisError, ValueError, OSError):
        pass
    return {
        "aiocacheguard": __version__,
        "python": platform.python_version(),
        "redis_py": redis_py.__version__,
        "redis_server": info.get("redis_version"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def check_redis(url: str, *, cluster: bool = False) -> None:
    """
    Raise `BenchError` with a one-line reason (never the password) unless ``url`` answers
    PING within 2 s; warn once here if the URL turns TLS verification off (the workers don't).
    """
    from .operations import UsageError, is_sentinel_url, parse_sentinel_url

    try:
        sentinel = is_sentinel_url(url)
        warn_if_unverified(
            parse_sentinel_url(url)[3] if sentinel else url_options(urlsplit(url).query)
        )
        client = control_client(url, cluster=cluster, timeout=2)
        try:
            client.ping()
        finally:
            _close(client)
    except (redis.RedisError, ValueError, OSError, UsageError) as exc:
        message = redact(" ".join(str(exc).split()), url)
    else:
        return
    raise BenchError(f"cannot reach Redis at {redact_url(url)}: {message}")


def run_bench(
    config: BenchConfig,
    *,
    on_round: Callable[[str, int, RoundResult], None] | None = None,
) -> list[StrategyResult]:
    """Run every strategy ``config.rounds`` times; ``on_round`` sees each result as it lands."""
    check_redis(config.redis_url, cluster=config.cluster)
    rng = random.Random(config.seed)  # noqa: S311  a seeded, reproducible run: no secret
    run_id = uuid.UUID(int=rng.getrandbits(128)).hex[:8]
    results = []
    for strategy in config.strategies:
        rounds = []
        for number in range(1, config.rounds + 1):
            namespace = f"bench-{run_id}-{strategy}-{number}"
            result = _run_round(config, strategy, number, namespace, rng.getrandbits(32))
            rounds.append(result)
            if on_round is not None:
                on_round(strategy, number, result)
        results.append(StrategyResult(strategy=strategy, rounds=rounds))
    return results


def _commands(client: Any, cluster: bool) -> int:
    if cluster:
        replies = client.info("commandstats", target_nodes=redis.RedisCluster.PRIMARIES)
        per_node = list(replies.values())
    else:
        per_node = [client.info("commandstats")]
    return sum(
        int(v.get("calls", 0))
        for stats in per_node
        for k, v in stats.items()
        if isinstance(v, dict) and k not in ("cmdstat_info", "cmdstat_cluster")
    )


def _remove_keys(control: Any, namespace: str) -> None:
    """The round's keys leave the user's Redis with the round (on a cluster, every primary)."""
    with contextlib.suppress(redis.RedisError, OSError):
        keys = list(control.scan_iter(match=f"*{namespace}*", count=1000))
        for start in range(0, len(keys), 500):
            control.delete(*keys[start : start + 500])


def _run_round(
    config: BenchConfig, strategy: str, number: int, namespace: str, seed: int
) -> RoundResult:
    ctx = multiprocessing.get_context("spawn")
    control = control_client(config.redis_url, cluster=config.cluster)
    key = "hot"
    workers = []
    try:
        for index in range(config.processes):
            parent_end, child_end = ctx.Pipe()
            job = {
                "url": config.redis_url,
                "cluster": config.cluster,
                "strategy": strategy,
                "namespace": namespace,
                "key": key,
                "coroutines": config.coroutines,
                "loader_s": config.loader_ms / 1000,
                "seed": seed + index,
                "factory": config.extra.get(strategy),
            }
            process = ctx.Process(target=_worker_entry, args=(job, child_end), daemon=True)
            # A worker starts with SIGINT ignored (a fresh interpreter keeps an ignored signal
            # ignored): Ctrl-C reaches the terminal's whole process group, and only this
            # process answers it, with one line; the workers are stopped below.
            interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                process.start()
            finally:
                signal.signal(signal.SIGINT, interrupt)
            child_end.close()
            workers.append((process, parent_end))
        for process, conn in workers:
            if not conn.poll(120) or conn.recv() != "ready":
                raise BenchError(f"worker {process.pid} did not get ready")
        start_at = time.time() + 0.25
        _seed_key(control, strategy, namespace, key, start_at, config.loader_ms / 1000)
        before = _commands(control, config.cluster)
        for _, conn in workers:
            conn.send(start_at)
        reports = []
        for process, conn in workers:
            if not conn.poll(600):
                raise BenchError(f"worker {process.pid} did not finish in 600 s")
            report = conn.recv()
            if "crash" in report:
                raise BenchError(f"worker {process.pid} failed: {report['crash']}")
            reports.append(report)
        commands = _commands(control, config.cluster) - before
    except BaseException:  # Ctrl-C or a failure: the workers' stampede is of no use now
        for process, _ in workers:
            process.kill()
        raise
    finally:
        for process, conn in workers:
            conn.close()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        _remove_keys(control, namespace)
        _close(control)
    latencies: list[float] = sorted(x for r in reports for x in r["latencies"])
    error_kinds: dict[str, int] = {}
    for report in reports:
        for kind, count in report["error_kinds"].items():
            error_kinds[kind] = error_kinds.get(kind, 0) + count

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return RoundResult(
        strategy=strategy,
        round=number,
        loader_calls=sum(r["loader_calls"] for r in reports),
        served=sum(r["served"] for r in reports),
        empty=sum(r["empty"] for r in reports),
        errors=sum(r["errors"] for r in reports),
        p50_ms=quantile(0.50),
        p95_ms=quantile(0.95),
        p99_ms=quantile(0.99),
        max_ms=latencies[-1] * 1000,
        redis_commands=commands,
        wall_ms=max(r["wall"] for r in reports) * 1000,
        error_kinds=error_kinds,
        latencies_ms=[x * 1000 for x in latencies],
    )


def _seed_key(
    control: Any, strategy: str, namespace: str, key: str, start_at: float, loader_s: float
) -> None:
    """Put the key in the state the strategy is about: missing, soft-expired or expiring."""
    value_key = KeySpace(namespace).value(key)
    payload = json.dumps(VALUE).encode()
    if strategy == "soft-ttl":
        record = Record(
            payload=payload, negative=False, serializer_tag=1, stored_at=start_at - 100,
            soft_expires_at=start_at - 50, expires_at=start_at + 900, compute_time=loader_s,
        )  # fmt: skip
        control.set(value_key, record.encode(), px=1_000_000)
    elif strategy == "xfetch":
        record = Record(
            payload=payload, negative=False, serializer_tag=1, stored_at=start_at - 100,
            expires_at=start_at + 0.25 * loader_s, compute_time=loader_s,
        )  # fmt: skip
        control.set(value_key, record.encode(), px=1_000_000)
    else:
        for stale in (value_key, f"{namespace}:{key}"):  # one slot each, on a cluster
            control.delete(stale)


def _worker_entry(job: dict[str, Any], conn: Any) -> None:
    warnings.simplefilter("ignore", InsecureTLSWarning)  # the parent has warned, once
    try:
        asyncio.run(_worker(job, conn))
    except (EOFError, BrokenPipeError):
        pass  # the parent went away: nothing to report to
    except Exception as exc:  # report, so the parent says what went wrong
        conn.send({"crash": f"{type(exc).__name__}: {exc}"})


async def _worker(job: dict[str, Any], conn: Any) -> None:
    loader_s: float = job["loader_s"]
    calls = 0

    async def load() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(loader_s)
        return VALUE

    get, close = await _strategy(job, load)
    # A worker is a fresh process: what importing and connecting made would be swept by the
    # first full collections, inside the timed stampede. A server that has been running has
    # long since moved them out of the young generations; freezing them models that, for
    # every strategy alike.
    gc.collect()
    gc.freeze()
    go = asyncio.Event()
    latencies: list[float] = []
    outcome = {"served": 0, "empty": 0, "errors": 0}
    error_kinds: dict[str, int] = {}
    released = 0.0

    async def caller() -> None:
        await go.wait()
        try:
            value = await get()
        except Exception as exc:
            outcome["errors"] += 1
            kind = type(exc).__name__
            error_kinds[kind] = error_kinds.get(kind, 0) + 1
        else:
            outcome["served" if value is not None else "empty"] += 1
        latencies.append(time.perf_counter() - released)

    tasks = [asyncio.create_task(caller()) for _ in range(job["coroutines"])]
    await asyncio.sleep(0)
    conn.send("ready")
    start_at = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    released = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - released
    await close()  # waits for background refreshes, so their loads are counted
    conn.send(
        {
            "latencies": latencies,
            "loader_calls": calls,
            "error_kinds": error_kinds,
            "wall": wall,
            **outcome,
        }
    )


async def _strategy(
    job: dict[str, Any], load: Callable[[], Awaitable[dict[str, Any]]]
) -> tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[None]]]:
    """The strategy's get() and its clean-up."""
    from .. import Cache, Policy

    if job.get("factory"):
        import importlib

        module, _, name = job["factory"].partition(":")
        factory = getattr(importlib.import_module(module), name)
        made: tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[None]]]
        made = await factory(job, load)
        return made

    strategy, namespace, key = job["strategy"], job["namespace"], job["key"]
    if strategy == "ideal":
        shared: asyncio.Task[Any] | None = None

        async def ideal() -> Any:
            nonlocal shared
            if shared is None:
                shared = asyncio.ensure_future(load())
            return await shared  # no caller is cancelled here: no shield needed

        async def close_nothing() -> None:
            return None

        return ideal, close_nothing
    if strategy in ("naive", "seed-mutex"):
        from .operations import connect, is_sentinel_url

        pool: aioredis.BlockingConnectionPool | None = None
        if job.get("cluster") or is_sentinel_url(job["url"]):
            raw: Any = _Bounded(connect(job["url"], cluster=job.get("cluster", False)))
        else:
            pool = aioredis.BlockingConnectionPool.from_url(job["url"], max_connections=_RAW_POOL)
            raw = aioredis.Redis(connection_pool=pool)
        data_key, lock_key = f"{namespace}:{key}", f"{namespace}:{key}:lock"

        async def naive() -> Any:
            data = await raw.get(data_key)
            if data is not None:
                return json.loads(data)
            value = await load()
            await raw.set(data_key, json.dumps(value), px=60_000)
            return value

        async def seed_mutex() -> Any:
            data = await raw.get(data_key)
            if data is not None:
                return json.loads(data)
            if await raw.set(lock_key, "1", nx=True, px=10_000):
                value = await load()
                await raw.set(data_key, json.dumps(value), px=60_000)
                await raw.delete(lock_key)
                return value
            for _ in range(3):
                await asyncio.sleep(0.01)
                data = await raw.get(data_key)
                if data is not None:
                    return json.loads(data)
            return None

        await raw.ping()  # connections open, as in a server that has been running

        async def close_raw() -> None:
            await raw.aclose()
            if pool is not None:
                await pool.aclose()

        return (naive if strategy == "naive" else seed_mutex), close_raw

    policies = {
        "singleflight": Policy(ttl=60.0, lock=False),
        "guard": Policy(ttl=60.0),
        "soft-ttl": Policy(ttl=1000.0, soft_ttl=1.0),
        "xfetch": Policy(ttl=60.0, early_beta=1.0),
    }
    from .operations import close_client, connect

    client = connect(job["url"], cluster=job.get("cluster", False))
    rng = random.Random(job["seed"])  # noqa: S311  the Cache's TTL jitter, seeded: no secret
    cache = Cache(client, namespace=namespace, policy=policies[strategy], rng=rng)

    async def warm_up() -> str:
        return "warm"

    # Connections open and scripts loaded, as in a server that has been running.
    await cache.get_or_load("warm-up", warm_up)

    async def guarded() -> Any:
        return await cache.get_or_load(key, load)

    async def close_cache() -> None:
        await cache.aclose(drain=True)
        await close_client(client)

    return guarded, close_cache


class _Bounded:
    """
    A cluster or Sentinel client whose commands wait for one of `_RAW_POOL` slots, as the
    standalone raw strategies' blocking pool does (those clients' pools raise instead).
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(_RAW_POOL)

    async def aclose(self) -> None:
        from .operations import close_client

        await close_client(self._client)

    def __getattr__(self, name: str) -> Any:
        command = getattr(self._client, name)
        if not callable(command):
            return command

        async def bounded(*args: Any, **kwargs: Any) -> Any:
            async with self._slots:
                return await command(*args, **kwargs)

        return bounded


def results_json(
    config: BenchConfig, results: Sequence[StrategyResult], *, started: float
) -> dict[str, Any]:
    """The ``--json`` document: configuration, seed, versions and every figure."""
    return {
        "schema": 1,
        "tool": "aiocacheguard bench",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "config": {
            "coroutines_per_process": config.coroutines,
            "processes": config.processes,
            "loader_ms": config.loader_ms,
            "rounds": config.rounds,
            "strategies": list(config.strategies),
            "extra_strategies": dict(config.extra),
            "redis_url": redact_url(config.redis_url),
            "topology": topology(config),
        },
        "seed": config.seed,
        "versions": environment(config.redis_url, cluster=config.cluster),
        "argv": [redact_url(arg) for arg in sys.argv],
        "results": [
            {
                "strategy": r.strategy,
                "median": r.summary(),
                "rounds": [x.figures() for x in r.rounds],
            }
            for r in results
        ],
    }
