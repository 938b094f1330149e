"""
The operator's commands of ``aiocacheguard``: doctor, stats, inspect, keys, clear, warm, and
acl (which prints the least-privileged user's ACL line and needs no Redis).

Each builds a client from ``--redis-url`` (``redis://``, ``rediss://``, a cluster node with
``--cluster``, or ``redis+sentinel://host:port[,host:port]/service[/db]``), calls
`aiocacheguard.ops` or `aiocacheguard.bulk`, and prints the result: a rich table on a terminal
(when rich is installed), aligned plain text otherwise, JSON with ``--json``. Bad input and an
unreachable Redis give one line on stderr and a non-zero exit, never a traceback (``--debug``
shows it); Ctrl-C stops a long scan cleanly with exit 130.

Exit codes: 0 done, 1 a check failed or Redis failed, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import re
import sys
import time
import traceback
import unicodedata
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import unquote, urlsplit

from .. import bulk, ops
from .._redact import redact, redact_url
from .._types import Serializer
from ..backend import RedisClient, connect_url, sentinel_primary, url_options
from ..cache import Cache
from ..errors import BackendError, CacheGuardError, ConfigurationError, InvalidKeyError
from ..policy import Policy
from ..serializers import (
    JsonSerializer,
    MsgpackSerializer,
    MsgspecJsonSerializer,
    MsgspecMsgpackSerializer,
)

__all__ = (
    "OPERATIONS",
    "DefaultsHelp",
    "UsageError",
    "add_operations",
    "close_client",
    "connect",
    "is_sentinel_url",
    "parse_sentinel_url",
    "run_operation",
)

OPERATIONS: Final = ("doctor", "stats", "inspect", "keys", "clear", "warm", "acl")

#: Seconds to open a connection, and one command's budget.
CONNECT_TIMEOUT: Final = 3.0
COMMAND_TIMEOUT: Final = 10.0


#: What ``warm --serializer`` accepts: the built-in serializers (pickle never: a file of JSON
#: lines holds nothing JSON could not).
SERIALIZERS: Final[dict[str, Callable[[], Serializer]]] = {
    "msgspec-json": MsgspecJsonSerializer,
    "json": JsonSerializer,
    "msgspec-msgpack": MsgspecMsgpackSerializer,
    "msgpack": MsgpackSerializer,
}


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default (when it has one) and keeps the epilog's lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.help is None:
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """Bad input on the command line or in a file: exit 2."""


# --------------------------------------------------------------------------------------------
# arguments


def add_operations(commands: Any) -> None:
    """Add the operator's subcommands to the ``aiocacheguard`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url",
        required=True,
        help="redis://, rediss://, or redis+sentinel://host:port[,host:port]/service[/db] "
        "(?ssl=true for TLS; ?ssl_ca_certs=PATH names the CA)",
    )
    common.add_argument("--cluster", action="store_true", help="the URL is a cluster node")
    common.add_argument("--json", action="store_true", help="print JSON for machines")
    common.add_argument("--plain", action="store_true", help="plain text even in a terminal")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    sampled = argparse.ArgumentParser(add_help=False)
    sampled.add_argument(
        "--sample", type=_positive, default=10_000, help="examine at most this many keys"
    )

    def add(name: str, help: str, parents: list[argparse.ArgumentParser]) -> Any:
        return commands.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            parents=parents,
            formatter_class=DefaultsHelp,
        )

    doctor = add("doctor", "check a server against what a cache needs", [common])
    doctor.add_argument("--pool-size", type=_positive, help="connections one process opens")
    doctor.add_argument(
        "--namespace", help="also check the user's permissions for this namespace (ACL DRYRUN)"
    )
    doctor.add_argument("--acl-user", help="check this user's permissions, not the URL's")
    doctor.add_argument("--local", action="store_true", help="the Caches have an L1")
    doctor.add_argument("--bloom", action="store_true", help="the Caches have a Bloom filter")

    acl = commands.add_parser(
        "acl",
        help="print the ACL SETUSER line of a least-privileged user for one namespace",
        description="Print the ACL SETUSER line that makes a Redis user allowed exactly what a "
        "Cache of one namespace needs (its keys ~{NS:*, its channels &{NS:*, and the commands "
        "the Cache sends or its scripts call). Replace <password>, then run it with redis-cli. "
        "No Redis is contacted. docs/security.md explains each permission.",
        formatter_class=DefaultsHelp,
    )
    acl.add_argument("--namespace", required=True)
    acl.add_argument("--user", help="the user's name; default cache-NAMESPACE")
    acl.add_argument(
        "--local",
        action="store_true",
        help="the Caches have an L1 (CLIENT TRACKING: lets the user learn every key name "
        "written, other namespaces' too)",
    )
    acl.add_argument("--bloom", action="store_true", help="the Caches have a Bloom filter")
    acl.add_argument(
        "--clear",
        action="store_true",
        help="allow clear() (SCAN: lets the user list every key name of the database)",
    )
    acl.add_argument("--json", action="store_true", help="print JSON for machines")
    acl.add_argument("--debug", action="store_true", help="show tracebacks")
    acl.set_defaults(redis_url="")  # no URL, no secret to keep out of its errors

    stats = add("stats", "hit ratio, memory, evictions, ops/s; a namespace's entries", [
        common, sampled,
    ])  # fmt: skip
    stats.add_argument("--namespace", help="also count this namespace's entries")
    stats.add_argument("--interval", type=float, default=1.0, help="seconds to measure ops/s")

    inspect = add("inspect", "one entry's record header, value and lock", [common])
    inspect.add_argument("key")
    inspect.add_argument("--namespace", required=True)

    keys = add("keys", "a namespace's largest entries by MEMORY USAGE", [common, sampled])
    keys.add_argument("pattern", nargs="?", default="*", help="glob over the user keys")
    keys.add_argument("--namespace", required=True)
    keys.add_argument("--top", type=_positive, default=10)

    clear = add("clear", "remove a namespace's entries (a dry run without --yes)", [common])
    clear.add_argument("pattern", nargs="?", default="*", help="glob over the user keys")
    clear.add_argument("--namespace", required=True)
    clear.add_argument("--locks", action="store_true", help="rebuild locks too")
    clear.add_argument("--blooms", action="store_true", help="Bloom filters too")
    clear.add_argument("--yes", action="store_true", help="delete (else only count)")

    warm = add("warm", 'write JSON lines {"key", "value", "ttl"?} before traffic', [common])
    warm.add_argument("file", help="a JSON-lines file, or - for stdin")
    warm.add_argument("--namespace", required=True)
    warm.add_argument("--ttl", type=float, default=3600.0, help="for lines without a ttl")
    warm.add_argument("--concurrency", type=_positive, default=64)
    warm.add_argument(
        "--serializer",
        choices=tuple(SERIALIZERS),
        default="msgspec-json",
        help="the one your Caches use (a record written with another reads as a miss)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


# --------------------------------------------------------------------------------------------
# running


def run_operation(args: argparse.Namespace) -> int:
    """Run one operator command; returns the exit code."""
    name = f"aiocacheguard {args.command}"
    out = Output(json_mode=args.json, plain=getattr(args, "plain", True))
    command: Callable[[RedisClient, argparse.Namespace, Output], Coroutine[Any, Any, int]]
    command = globals()[f"_{args.command}"]
    try:
        if args.command == "acl":  # no Redis: the line only
            return _acl(args, out)
        with contextlib.ExitStack() as files:
            if args.command == "warm":  # a bad path fails before anything is connected
                args.source = (
                    sys.stdin
                    if args.file == "-"
                    else files.enter_context(Path(args.file).open(encoding="utf-8"))
                )
            return asyncio.run(_with_client(command, args, out))
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BackendError as exc:  # before OSError: BackendTimeout is a TimeoutError
        return _fail(name, exc, args, code=1)
    except (UsageError, ConfigurationError, InvalidKeyError, OSError) as exc:
        return _fail(name, exc, args, code=2)
    except Exception as exc:
        return _fail(name, exc, args, code=1)


def _fail(name: str, exc: BaseException, args: argparse.Namespace, *, code: int) -> int:
    # Whatever raised it (redis-py, a socket, this module), no secret of the URL is printed.
    if args.debug:
        print(redact("".join(traceback.format_exception(exc)), args.redis_url), file=sys.stderr)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, CacheGuardError | UsageError | OSError):
        message = f"{type(exc).__name__}: {message}"
    print(f"{name}: error: {redact(message, args.redis_url)}", file=sys.stderr)
    return code


async def _with_client(
    command: Callable[[RedisClient, argparse.Namespace, Output], Coroutine[Any, Any, int]],
    args: argparse.Namespace,
    out: Output,
) -> int:
    client = connect(args.redis_url, cluster=args.cluster)
    try:
        return await command(client, args, out)
    finally:
        await close_client(client)


async def close_client(client: RedisClient) -> None:
    """Close a client made by `connect`, and a Sentinel client's connections to its sentinels."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def connect(url: str, *, cluster: bool = False) -> RedisClient:
    """
    A client for ``url``: standalone, a cluster (``cluster=True``), or the primary a Sentinel
    names for ``redis+sentinel://host:port[,host:port]/service[/db][?ssl=true&...]``.

    Raises:
        UsageError: the URL cannot be used (the message never holds its password).
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": COMMAND_TIMEOUT,
    }
    if is_sentinel_url(url):
        if cluster:
            raise UsageError("--cluster and a Sentinel URL do not go together")
        sentinels, service, db, given = parse_sentinel_url(url)
        return sentinel_primary(sentinels, service, db, **{**options, **given})
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise UsageError(
            f"--redis-url {redact_url(url)!r}: "
            "expected redis://, rediss://, unix:// or redis+sentinel://"
        )
    try:
        return connect_url(url, cluster=cluster, **options)
    except ConfigurationError as exc:
        raise UsageError(f"--redis-url {exc.value!r}: {exc.accepted}") from None


def is_sentinel_url(url: str) -> bool:
    return urlsplit(url).scheme in ("redis+sentinel", "sentinel")


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, dict[str, Any]]:
    """
    ``redis+sentinel://[user:password@]host:port[,host:port]/service[/db][?option=value...]``
    as its sentinels, service name, database and options: the credentials and the query's
    options as in a ``redis://`` URL, ``ssl=true`` for TLS (for the primary and the sentinels
    alike).

    Raises:
        UsageError: the URL is not of that form (the message never holds its password).
    """
    shown = redact_url(url)
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    path = [p for p in parts.path.split("/") if p]
    if not hosts or not path or len(path) > 2:
        raise UsageError(
            f"--redis-url {shown!r}: expected redis+sentinel://host:port[,host:port]/service[/db]"
        )
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "26379")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(  # the host is not quoted: in a malformed URL it may be password
                f"--redis-url {shown!r}: each sentinel's port must be a number from 1 to 65535"
            )
        sentinels.append((name or "localhost", int(port)))
    if len(path) == 2 and not path[1].isdigit():
        raise UsageError(f"--redis-url {shown!r}: the database must be a number")
    try:
        options = url_options(parts.query)
    except ValueError as exc:
        raise UsageError(f"--redis-url {shown!r}: {redact(str(exc), url)}") from None
    if parts.password is not None:
        options["password"] = unquote(parts.password)
    if parts.username:
        options["username"] = unquote(parts.username)
    db = options.pop("db", int(path[1]) if len(path) == 2 else 0)
    return sentinels, path[0], db, options


# --------------------------------------------------------------------------------------------
# output


class Output:
    """Tables and key/value lists as rich on a terminal, aligned text otherwise, or JSON."""

    def __init__(self, *, json_mode: bool, plain: bool, stream: IO[str] | None = None) -> None:
        self.json = json_mode
        self.stream = stream or sys.stdout
        self.fancy = not json_mode and not plain and self.stream.isatty() and _has_rich()

    def document(self, value: Any) -> None:
        print(json.dumps(_jsonable(value), indent=2, sort_keys=False), file=self.stream)

    def line(self, text: str = "") -> None:
        if self.fancy:
            from rich.console import Console

            Console(file=self.stream, highlight=False).print(text, markup=False)
        else:
            print(text, file=self.stream)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.fancy:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title, title_justify="left", show_header=any(headers))
            for header in headers:
                table.add_column(header, overflow="fold")
            for row in rows:
                table.add_row(*(_styled(cell) for cell in row))
            Console(file=self.stream).print(table)
            return
        if title:
            print(title, file=self.stream)
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
        for row in [list(headers), *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
            print("  ".join(cells).rstrip(), file=self.stream)

    def pairs(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        if self.fancy:
            self.table(title, ("", ""), rows)
            return
        if title:
            print(title, file=self.stream)
        width = max((len(name) for name, _ in rows), default=0)
        for name, value in rows:
            indent = "\n" + " " * (width + 4)
            print(f"  {name.ljust(width)}  {value.replace(chr(10), indent)}", file=self.stream)

    @contextmanager
    def progress(self, what: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """
        A callback showing a running count, or a bar when the ``total`` is known (on a rich
        terminal; silent otherwise, so piped output stays parseable).
        """
        if not self.fancy:
            yield lambda done: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if total is None:
            columns: tuple[Any, ...] = (
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            )  # fmt: skip
        else:
            columns = (
                TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            )  # fmt: skip
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(f"{what}: 0", total=total)
            yield lambda done: bar.update(task, completed=done, description=f"{what}: {done:,}")


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


_STATUS_STYLE: Final = {
    "ok": "[green]ok[/]",
    "warn": "[yellow]warn[/]",
    "fail": "[bold red]fail[/]",
}


#: How `shown` writes the characters a terminal would act on, as redis-cli writes them.
_ESCAPES: Final = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\a": "\\a", "\b": "\\b"}


def shown(name: str) -> str:
    """
    A key name from Redis as the terminal may show it: a control or format character (an
    escape sequence, NUL, a newline that would break a row, a bidirectional override) is
    written as redis-cli writes it (``\\n``, ``\\x1b``, ``\\u202e``), and so is a backslash.

    >>> shown("user:\\x1b[31m7\\n")
    'user:\\\\x1b[31m7\\\\n'
    """
    out = []
    for char in name:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def _styled(cell: str) -> Any:
    from rich.text import Text

    if cell in _STATUS_STYLE:
        return Text.from_markup(_STATUS_STYLE[cell])
    return Text(cell)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, ops.BloomStats):
            fields["fill_ratio"] = value.fill_ratio
        return fields
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    delta = timestamp - now
    relative = f"in {delta:,.1f} s" if delta >= 0 else f"{-delta:,.1f} s ago"
    return f"{moment:%Y-%m-%d %H:%M:%S.%f}"[:-3] + f" UTC ({relative})"


def _seconds(value: float | None, none: str = "none") -> str:
    return none if value is None else f"{value:,.3f} s"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError  # pragma: no cover


# --------------------------------------------------------------------------------------------
# the commands


def _acl(args: argparse.Namespace, out: Output) -> int:
    user = ops.acl(
        args.namespace, user=args.user, local=args.local, bloom=args.bloom, clear=args.clear
    )
    if out.json:
        out.document(user)
        return 0
    print(user.line, file=out.stream)  # alone on stdout: ready for redis-cli once edited
    print(
        "# replace <password> (or use #<sha256> for a hashed one), then run the line with "
        "redis-cli as an admin; on a cluster, on every node",
        file=sys.stderr,
    )
    return 0


async def _doctor(client: RedisClient, args: argparse.Namespace, out: Output) -> int:
    if args.acl_user is not None and args.namespace is None:
        raise UsageError("--acl-user needs --namespace")
    checks = await ops.doctor(
        client,
        pool_size=args.pool_size,
        budget=COMMAND_TIMEOUT,
        namespace=args.namespace,
        user=args.acl_user,
        local=args.local,
        bloom=args.bloom,
    )
    failed = any(c.status == "fail" for c in checks)
    if out.json:
        out.document({"ok": not failed, "checks": checks})
    else:
        nodes = any(c.node for c in checks)
        headers = ["node"] * nodes + ["check", "status", "found", "set"]
        rows = [[c.node] * nodes + [c.name, c.status, c.detail, c.fix or "-"] for c in checks]
        out.table("aiocacheguard doctor", headers, rows)
        counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
        out.line(f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    return 1 if failed else 0


async def _stats(client: RedisClient, args: argparse.Namespace, out: Output) -> int:
    if not 0 <= args.interval <= 60:
        raise UsageError(f"--interval must be from 0 to 60 seconds, not {args.interval}")
    with out.progress("keys examined") as progress:
        result = await ops.stats(
            client,
            args.namespace,
            sample=args.sample,
            interval=args.interval,
            budget=COMMAND_TIMEOUT,
            progress=progress,
        )
    if out.json:
        out.document(result)
        return 0
    server = result.server
    ratio = "-" if server.hit_ratio is None else f"{server.hit_ratio:.1%}"
    out.pairs(
        "server" + (f" ({server.nodes} primaries)" if server.nodes > 1 else ""),
        [
            ("hit ratio", f"{ratio} ({server.hits:,} hits, {server.misses:,} misses)"),
            ("memory", _size(server.used_memory) + (
                f" of {_size(server.maxmemory)}" if server.maxmemory else " (no maxmemory)"
            )),
            ("keys", f"{server.keys:,}"),
            ("evicted keys", f"{server.evicted_keys:,}"),
            ("expired keys", f"{server.expired_keys:,}"),
            ("ops/s", f"{server.ops_per_sec:,.0f} (over {server.interval:.1f} s)"),
        ],
    )  # fmt: skip
    found = result.namespace
    if found is None:
        return 0
    how = (
        f"estimated from {found.examined:,} keys examined (--sample {args.sample:,})"
        if found.sampled
        else f"all {found.examined:,} keys examined"
    )
    out.pairs(
        f"namespace {found.namespace} ({how})",
        [
            ("entries", f"{found.entries:,}"),
            ("negative", f"{found.negative:,}"),
            ("soft-expired", f"{found.soft_expired:,}"),
            ("past TTL (stale-if-error)", f"{found.expired:,}"),
            ("foreign", f"{found.foreign:,}"),
            ("locks held", f"{found.locks:,}"),
        ],
    )
    if found.stuck_locks:
        out.table(
            "stuck locks (no lease, or a lease far beyond any lock_ttl)",
            ["key", "lease left"],
            [[shown(lock.key), _seconds(lock.lease_left, "none (never expires)")]
             for lock in found.stuck_locks],
        )  # fmt: skip
    if found.blooms:
        out.table(
            "Bloom filters",
            ["name", "bits", "set", "fill"],
            [[shown(b.name), f"{b.bits:,}", f"{b.set_bits:,}", f"{b.fill_ratio:.1%}"]
             for b in found.blooms],
        )  # fmt: skip
    return 0


async def _inspect(client: RedisClient, args: argparse.Namespace, out: Output) -> int:
    seen = await ops.inspect(client, args.namespace, args.key, budget=COMMAND_TIMEOUT)
    if out.json:
        out.document(seen)
        return 0 if seen.exists else 1
    now = time.time()
    rows = [("redis key", shown(seen.redis_key))]
    if not seen.exists:
        rows.append(("value", "not cached"))
    elif seen.serializer is None:
        rows += [("type", seen.redis_type), ("size", _size(seen.size)), ("problem", seen.problem)]
    else:
        if seen.value_shown:
            value = json.dumps(seen.value, indent=2, ensure_ascii=False, default=repr)
        elif seen.negative:
            value = "absent (a cached negative result)"
        else:
            value = seen.problem or f"not shown ({seen.serializer} is never decoded here)"
        rows += [
            ("serializer", f"{seen.serializer} (record format {seen.format_version})"),
            ("negative", "yes" if seen.negative else "no"),
            ("written at", _when(seen.stored_at, now)),
            ("soft expiry", _when(seen.soft_expires_at, now)),
            ("hard expiry", _when(seen.expires_at, now)),
            ("TTL left", _seconds(seen.ttl_left, "none (never expires)")),
            ("compute time", _seconds(seen.compute_time)),
            ("size", _size(seen.size)),
            ("value", value),
        ]
    holder = "none" if seen.lock_holder is None else (
        f"{seen.lock_holder} (lease left {_seconds(seen.lock_lease_left, 'none')})"
    )  # fmt: skip
    rows.append(("lock", holder))
    out.pairs(f"{args.namespace}: {shown(args.key)}", rows)
    return 0 if seen.exists else 1


async def _keys(client: RedisClient, args: argparse.Namespace, out: Output) -> int:
    with out.progress("entries measured") as progress:
        top = await ops.top_keys(
            client,
            args.namespace,
            args.pattern,
            top=args.top,
            sample=args.sample,
            budget=COMMAND_TIMEOUT,
            progress=progress,
        )
    if out.json:
        out.document(top)
        return 0
    how = f"the first {top.matched:,} (--sample)" if top.sampled else f"all {top.matched:,}"
    out.table(
        f"largest of {how} entries matching {args.pattern!r}",
        ["key", "memory", "TTL left"],
        [[shown(k.key), _size(k.bytes), _seconds(k.ttl_left)] for k in top.keys],
    )
    return 0


async def _clear(client: RedisClient, args: argparse.Namespace, out: Output) -> int:
    kinds = ", ".join(["values", *["locks"] * args.locks, *["Bloom filters"] * args.blooms])
    what = f"{kinds} of namespace {args.namespace} matching {args.pattern!r}"
    if not args.yes:
        with out.progress("keys found") as progress:
            preview = await ops.clear_preview(
                client,
                args.namespace,
                args.pattern,
                locks=args.locks,
                blooms=args.blooms,
                budget=COMMAND_TIMEOUT,
                progress=progress,
            )
        if out.json:
            out.document({"dry_run": True, **_jsonable(preview)})
            return 0
        out.line(f"dry run: {preview.count:,} keys would be removed ({what})")
        for example in preview.examples:
            out.line(f"  {shown(example)}")
        if preview.count:
            out.line("run again with --yes to remove them")
        return 0
    cache = Cache(
        client, namespace=args.namespace, policy=Policy(ttl=60.0), command_timeout=COMMAND_TIMEOUT
    )
    removed = 0
    try:
        with out.progress("keys removed") as progress:

            def removing(done: int) -> None:
                nonlocal removed
                removed = done
                progress(done)

            removed = await bulk.clear(
                cache, args.pattern, locks=args.locks, blooms=args.blooms, progress=removing
            )
    except BaseException:
        if removed:  # said, so an interrupted or failed clear is not taken for a no-op
            print(f"{removed:,} keys were removed before this stopped", file=sys.stderr)
        raise
    finally:
        await cache.aclose()
    if out.json:
        out.document({"dry_run": False, "removed": removed})
    else:
        out.line(f"removed {removed:,} keys ({what})")
    return 0


async def _warm(client: RedisClient, args: argparse.Namespace, out: Output) -> int:
    if args.ttl <= 0:
        raise UsageError(f"--ttl must be positive, not {args.ttl}")
    cache = Cache(
        client,
        namespace=args.namespace,
        # --ttl for every line without one, a cached "absent" (null) included; the default
        # jitter spreads them all, so the warmed keys do not expire together.
        policy=Policy(ttl=args.ttl, negative_ttl=args.ttl),
        serializer=SERIALIZERS[args.serializer](),
        command_timeout=COMMAND_TIMEOUT,
    )
    total = None
    if out.fancy and args.source.seekable():  # a file: count its lines for a real bar
        total = sum(1 for line in args.source if line.strip())
        args.source.seek(0)
    try:
        with out.progress("keys written", total) as progress:
            written = await bulk.warm(
                cache, _lines(args.source), concurrency=args.concurrency, progress=progress
            )
    finally:
        await cache.aclose()
    if out.json:
        out.document({"written": written})
    else:
        out.line(f"warmed {written:,} keys in namespace {args.namespace}")
    return 0


_BLANK = re.compile(r"\s*")


def _lines(source: IO[str]) -> Iterator[tuple[str, Any, float | None]]:
    for number, line in enumerate(source, 1):
        if _BLANK.fullmatch(line):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict) or "key" not in item or "value" not in item:
            raise UsageError(f'line {number}: expected {{"key": ..., "value": ..., "ttl"?: ...}}')
        key, ttl = item["key"], item.get("ttl")
        if not isinstance(key, str):
            raise UsageError(f"line {number}: the key must be a string")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0
        ):
            raise UsageError(f"line {number}: ttl must be a positive number of seconds")
        yield key, item["value"], None if ttl is None else float(ttl)
