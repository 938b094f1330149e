"""
The ``aiocacheguard`` command line: ``bench`` (the stampede harness) and the operator's
commands ``doctor``, ``stats``, ``inspect``, ``keys``, ``clear`` and ``warm``, which print what
`aiocacheguard.ops` and `aiocacheguard.bulk` return. ``aiocacheguard COMMAND --help`` lists
the options.

Only the command line builds Redis clients from URLs; the library takes ready clients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .._redact import redact, redact_url
from .._version import __version__
from ..testing import RedisClusterServer, RedisSentinelServer, RedisServer, ServerError
from .bench import STRATEGIES, BenchConfig, BenchError, RoundResult, StrategyResult, topology
from .operations import OPERATIONS, DefaultsHelp, add_operations, run_operation

__all__ = ("main",)

COLUMNS = (
    ("strategy", "strategy", "{}"),
    ("loader calls", "loader_calls", "{:,.0f}"),
    ("served", "served", "{:,.0f}"),
    ("empty", "empty", "{:,.0f}"),
    ("errors", "errors", "{:,.0f}"),
    ("p50 ms", "p50_ms", "{:,.1f}"),
    ("p95 ms", "p95_ms", "{:,.1f}"),
    ("p99 ms", "p99_ms", "{:,.1f}"),
    ("max ms", "max_ms", "{:,.1f}"),
    ("redis cmds", "redis_commands", "{:,.0f}"),
    ("wall ms", "wall_ms", "{:,.0f}"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


#: One line per strategy for ``bench --help`` (the module docstring of bench.py says more).
STRATEGY_LINES = {
    "ideal": "no Redis: one in-memory task per process, the floor to read the others against",
    "naive": "GET; on a miss, load and SET (what most code does)",
    "seed-mutex": "SET NX lock; the others retry GET 3 x 10 ms, then give up empty",
    "singleflight": "aiocacheguard with Policy(lock=False): one load per process",
    "guard": "aiocacheguard's default: single-flight + rebuild lock + pub/sub: one load in all",
    "soft-ttl": "past its soft TTL: the stale value served while one refresh runs",
    "xfetch": "expiring a quarter load after the release: XFetch refreshes it early",
}


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aiocacheguard", description="aiocacheguard tools")
    parser.add_argument("--version", action="version", version=f"aiocacheguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    bench = commands.add_parser(
        "bench",
        help="fire N coroutines x P processes at one expiring key, per strategy",
        description=(
            "Release N coroutines in each of P processes at one key that has just expired, "
            "once per strategy, and report loader calls, callers served/empty/failed, caller "
            "latency and Redis commands. Without --redis-url a throwaway redis-server is "
            "started and stopped."
        ),
        formatter_class=DefaultsHelp,
        epilog="strategies:\n"
        + "\n".join(f"  {name:<13} {STRATEGY_LINES.get(name, '')}" for name in STRATEGIES),
    )
    bench.add_argument(
        "--redis-url", help="use this Redis (keys are namespaced; never flushed); default: a "
        "throwaway redis-server"
    )  # fmt: skip
    bench.add_argument(
        "--topology",
        choices=("standalone", "cluster", "sentinel"),
        help="the throwaway deployment to start (3 primaries for a cluster; a primary, a "
        "replica and a sentinel for sentinel); default: standalone",
    )
    bench.add_argument("--cluster", action="store_true", help="--redis-url is a cluster node")
    bench.add_argument("--coroutines", "-n", type=int, default=10_000, help="per process")
    bench.add_argument("--processes", "-p", type=int, default=1, help="worker processes")
    bench.add_argument("--loader-ms", type=float, default=50.0, help="the loader's latency")
    bench.add_argument("--rounds", type=int, default=1, help="repeat; medians are reported")
    bench.add_argument(
        "--strategy",
        action="append",
        choices=STRATEGIES,
        help="run only these (repeatable); default: all",
    )
    bench.add_argument("--seed", type=int, default=0, help="of every random choice")
    bench.add_argument("--json", type=Path, help="write every figure to this file")
    bench.add_argument("--plot", type=Path, help="write a PNG of latencies and loader calls")
    bench.add_argument("--plain", action="store_true", help="plain text even in a terminal")
    add_operations(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aiocacheguard`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command in OPERATIONS:
        return run_operation(args)
    try:
        return _bench(args)
    except (BenchError, ServerError) as exc:
        message = redact(str(exc), args.redis_url or "")  # a worker's crash may quote it
        print(f"aiocacheguard bench: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aiocacheguard bench: interrupted", file=sys.stderr)
        return 130


def _check_output(option: str, path: Path | None) -> None:
    """Fail now, not after minutes of benchmarking, if ``path`` cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise BenchError(f"{option} {path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BenchError(f"{option} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BenchError(f"{option} {path}: not writable")


def _bench(args: argparse.Namespace) -> int:
    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError(
                "--plot needs matplotlib: pip install 'aiocacheguard[bench]'"
            ) from None
    strategies = tuple(dict.fromkeys(args.strategy)) if args.strategy else STRATEGIES
    config_args: dict[str, Any] = {
        "coroutines": args.coroutines,
        "processes": args.processes,
        "loader_ms": args.loader_ms,
        "rounds": args.rounds,
        "strategies": strategies,
        "seed": args.seed,
        "redis_url": args.redis_url or "redis://placeholder",
        "cluster": args.cluster,
    }
    BenchConfig(**config_args)  # validate before starting anything
    if args.redis_url:
        if args.topology is not None:
            raise BenchError(
                "--topology starts a throwaway deployment; with --redis-url say --cluster, "
                "or give a redis+sentinel:// URL"
            )
        return _run(BenchConfig(**config_args), args)
    if args.cluster:
        raise BenchError("--cluster needs --redis-url; for a throwaway one: --topology cluster")
    topology = args.topology or "standalone"
    if topology == "cluster":
        with RedisClusterServer() as cluster:
            config_args.update(redis_url=cluster.url, cluster=True)
            return _run(BenchConfig(**config_args), args)
    if topology == "sentinel":
        with RedisSentinelServer() as deployment:
            host, port = deployment.sentinels[0]
            config_args["redis_url"] = f"redis+sentinel://{host}:{port}/{deployment.service}"
            return _run(BenchConfig(**config_args), args)
    with RedisServer() as server:
        config_args["redis_url"] = server.url
        return _run(BenchConfig(**config_args), args)


def _run(config: BenchConfig, args: argparse.Namespace) -> int:
    from .bench import results_json, run_bench

    fancy = sys.stdout.isatty() and not args.plain and _has_rich()
    started = time.time()
    header = (
        f"aiocacheguard bench: {config.coroutines:,} coroutines x {config.processes} "
        f"process(es), loader {config.loader_ms:g} ms, {config.rounds} round(s), "
        f"seed {config.seed}, {topology(config)} {redact_url(config.redis_url)}"
    )
    print(header, flush=True)
    total = len(config.strategies) * config.rounds
    if fancy:
        results = _run_with_progress(config, total)
    else:

        def report(strategy: str, number: int, result: RoundResult) -> None:
            print(
                f"  {strategy} round {number}: {result.loader_calls} loader calls, "
                f"p99 {result.p99_ms:,.1f} ms",
                flush=True,
            )

        results = run_bench(config, on_round=report)
    _print_table(results, fancy)
    if args.json is not None:
        document = results_json(config, results, started=started)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        _plot(results, config, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _run_with_progress(config: BenchConfig, total: int) -> list[StrategyResult]:
    from rich.progress import Progress

    from .bench import run_bench

    with Progress(transient=True) as progress:
        task = progress.add_task("running strategies", total=total)

        def advance(strategy: str, number: int, result: RoundResult) -> None:
            progress.update(task, advance=1, description=f"{strategy} round {number} done")

        return run_bench(config, on_round=advance)


def _print_table(results: Sequence[StrategyResult], fancy: bool) -> None:
    rows = []
    for result in results:
        summary = result.summary()
        rows.append(
            [fmt.format(result.strategy if key == "strategy" else summary[key])
             for _, key, fmt in COLUMNS]
        )  # fmt: skip
    if fancy:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="medians over rounds")
        for title, key, _ in COLUMNS:
            table.add_column(title, justify="left" if key == "strategy" else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [
        max(len(title), *(len(r[i]) for r in rows)) for i, (title, _, _) in enumerate(COLUMNS)
    ]
    line = "  ".join(
        t.ljust(w) if i == 0 else t.rjust(w)
        for i, ((t, _, _), w) in enumerate(zip(COLUMNS, widths, strict=True))
    )
    print(line)
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _plot(results: Sequence[StrategyResult], config: BenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, (latency, loads) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        values = result.rounds[len(result.rounds) // 2].latencies_ms
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            latency.plot(values, fractions, label=result.strategy)
    latency.set_xscale("symlog", linthresh=1.0)
    # Plain numbers at each decade (1, 10, 100 ms), not 10^x, so the axis reads at a glance.
    latency.xaxis.set_major_locator(ticker.SymmetricalLogLocator(base=10, linthresh=1.0))
    latency.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,g}"))
    latency.set_xlabel("caller latency, ms (log)")
    latency.set_ylabel("fraction of callers served by then")
    latency.set_title("caller latency (CDF)")
    # Beside the axes, not on them: the curves meet in the lower right.
    latency.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    names = [r.strategy for r in results]
    calls = [r.median("loader_calls") for r in results]
    bars = loads.bar(names, [max(c, 0.8) for c in calls])
    loads.bar_label(bars, labels=[f"{c:,.0f}" for c in calls])
    loads.set_yscale("log")
    loads.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:,g}"))
    loads.set_ylabel("loader calls (log)")
    loads.set_title("loader calls per strategy")
    loads.tick_params(axis="x", rotation=30)
    figure.suptitle(
        f"{config.coroutines:,} coroutines x {config.processes} process(es), "
        f"loader {config.loader_ms:g} ms, seed {config.seed}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(figure)
