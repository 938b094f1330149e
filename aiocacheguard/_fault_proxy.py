"""
A loopback TCP proxy that puts network faults between a Redis client and a real server.

`FaultProxy` listens on a free port of 127.0.0.1 and relays every connection to
``127.0.0.1:upstream_port``, in the caller's event loop. Point a client at ``proxy.port`` and
switch faults on and off while it runs: latency and a bandwidth cap per direction, a blackhole
(of every connection, or of one), refused connections, TCP resets, a truncated reply, bytes
injected as if from the server, closed connections, and a step mode in which every
client->server chunk waits until the test releases it. The model is the ``DelayProxy`` of
redis-py's ``tests/test_asyncio/test_cwe_404.py``, extended as Toxiproxy would (whose server is
not installable here).

Each connection is two directions; in each, one task reads chunks (up to 64 KiB, as the bytes
arrived) into a bounded queue and another forwards them, so a delay never reorders bytes and a
slow writer stops the reading (back-pressure). Faults are read when a chunk is forwarded, so
switching one affects the connections already open as well as new ones.

Guarantees:
    - Bytes are forwarded in order in each direction, whatever the faults; replies stay matched
      to their requests until a fault breaks the connection.
    - `FaultProxy.aclose` cancels and awaits every task and closes every socket, promptly even
      while blackholed or holding; nothing the proxy started outlives it.
    - `FaultProxy.refuse` keeps the port (a bound, not listening, ``SO_REUSEPORT`` socket) so
      `FaultProxy.unrefuse` listens on the same port again.
    - `FaultProxy.reset` sends a TCP RST (``SO_LINGER`` 0) to both peers of every connection.

Limitations:
    - A test helper: loopback only, IPv4 only, no TLS awareness, one upstream port.
    - Latency counts from when the proxy read a chunk; lowering it does not shorten a delay
      already being waited. Chunk boundaries are those of the reads, not of Redis replies, so
      `FaultProxy.truncate_next_reply` cuts the next chunk, which holds a whole small reply but
      only the start of a large one.
    - The bandwidth cap paces each connection separately, in slices of about 20 ms.
    - A connection that had data swallowed by the blackhole is out of step with its peer; heal
      closes it. Connections that stayed idle during the blackhole carry on.
    - Without ``SO_REUSEPORT`` (Windows) the port is released while refusing, and another
      process could take it before `FaultProxy.unrefuse`.

Example:
    >>> import asyncio
    >>> async def main() -> bytes:
    ...     async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    ...         writer.write(await reader.read(100))
    ...         writer.close()
    ...     upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    ...     async with upstream, FaultProxy(upstream.sockets[0].getsockname()[1]) as proxy:
    ...         reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    ...         proxy.hold()  # step mode: the request waits in the proxy
    ...         writer.write(b"PING")
    ...         print([chunk.data for chunk in await proxy.wait_held(1)])
    ...         proxy.release()
    ...         reply = await reader.read(100)
    ...         writer.close()
    ...     return reply
    >>> asyncio.run(main())
    [b'PING']
    b'PING'
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from .errors import ConfigurationError

__all__ = ("FaultProxy", "FaultProxyStatistics", "HeldChunk")

LOOPBACK = "127.0.0.1"
#: The most the proxy reads at once: one read is one chunk.
CHUNK_SIZE = 65536
#: Chunks read ahead per direction before reading pauses (back-pressure).
QUEUE_CHUNKS = 64
#: The bandwidth cap sends a slice of this many seconds' worth of bytes at a time.
PACING_SLICE = 0.02


@dataclass(frozen=True, slots=True)
class HeldChunk:
    """A client->server chunk waiting in step mode: its connection (1, 2, ...) and bytes."""

    connection: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultProxyStatistics:
    """A snapshot of the proxy's counters: connections, and bytes forwarded or swallowed."""

    connections_accepted: int
    connections_open: int
    bytes_upstream: int
    bytes_downstream: int
    bytes_swallowed: int


@dataclass(slots=True, eq=False)
class _Link:
    """One client connection and, once connected, its upstream connection."""

    id: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    swallowed: bool = False  # the blackhole ate some of its bytes: out of step for good

    @property
    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]


@dataclass(slots=True, eq=False)
class _Chunk:
    data: bytes
    read_at: float
    link: _Link
    gate: asyncio.Event | None = None  # in step mode: the chunk waits until it is set


@dataclass(slots=True, eq=False)
class _Pipe:
    """One direction of a link: its source, its sink and the chunks read but not yet sent."""

    link: _Link
    source: asyncio.StreamReader
    sink: asyncio.StreamWriter
    to_server: bool
    queue: asyncio.Queue[_Chunk | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_CHUNKS))
    paced_until: float = 0.0  # when the bandwidth cap has sent everything so far


class _Truncated(Exception):
    """A reply was cut short on purpose; the link closes."""


class FaultProxy:
    """
    A TCP proxy from a free loopback port to ``127.0.0.1:upstream_port``, with faults.

    Use it as ``async with FaultProxy(port) as proxy:``, or call `start` and `aclose`. The
    latency and bandwidth attributes and the fault methods may be changed at any time.

    Args:
        upstream_port: the port of the server on 127.0.0.1 to forward to.

    Raises:
        ConfigurationError: a latency is negative or a bandwidth is not positive.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._upstream_latency = 0.0
        self._downstream_latency = 0.0
        self._upstream_bandwidth: float | None = None
        self._downstream_bandwidth: float | None = None
        self._port = 0
        self._server: asyncio.Server | None = None
        self._placeholder: socket.socket | None = None  # keeps the port while refusing
        self._started = False
        self._closed = False
        self._blackholed = False
        self._blackholed_links: set[int] = set()  # connections blackholed one by one
        self._refusing = False
        self._truncate: int | None = None
        self._holding = False
        self._held: list[_Chunk] = []
        self._held_grew = asyncio.Event()
        self._links: dict[int, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted = 0
        self._bytes_upstream = 0
        self._bytes_downstream = 0
        self._bytes_swallowed = 0

    # Lifecycle

    async def start(self) -> Self:
        """Listen on a free port of 127.0.0.1; returns the proxy."""
        if self._started:
            raise RuntimeError("a FaultProxy starts once")
        self._started = True
        if hasattr(socket, "SO_REUSEPORT"):
            self._placeholder = _bind(0)
            self._port = self._placeholder.getsockname()[1]
        try:
            await self._listen()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Stop listening, cancel and await every task, close every socket. Idempotent."""
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        for link in list(self._links.values()):
            self._drop(link, rst=False)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def port(self) -> int:
        """The port the proxy listens on (0 before `start`)."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>``, for ``redis.asyncio.from_url``."""
        return f"redis://{LOOPBACK}:{self._port}"

    def statistics(self) -> FaultProxyStatistics:
        """A frozen snapshot of the counters."""
        return FaultProxyStatistics(
            connections_accepted=self._accepted,
            connections_open=len(self._links),
            bytes_upstream=self._bytes_upstream,
            bytes_downstream=self._bytes_downstream,
            bytes_swallowed=self._bytes_swallowed,
        )

    # Latency and bandwidth

    @property
    def upstream_latency(self) -> float:
        """Seconds each client->server chunk is delayed, counted from when it was read."""
        return self._upstream_latency

    @upstream_latency.setter
    def upstream_latency(self, seconds: float) -> None:
        self._upstream_latency = _latency("upstream_latency", seconds)

    @property
    def downstream_latency(self) -> float:
        """Seconds each server->client chunk is delayed, counted from when it was read."""
        return self._downstream_latency

    @downstream_latency.setter
    def downstream_latency(self, seconds: float) -> None:
        self._downstream_latency = _latency("downstream_latency", seconds)

    @property
    def upstream_bandwidth(self) -> float | None:
        """Client->server bytes per second, per connection; ``None`` is unlimited."""
        return self._upstream_bandwidth

    @upstream_bandwidth.setter
    def upstream_bandwidth(self, rate: float | None) -> None:
        self._upstream_bandwidth = _bandwidth("upstream_bandwidth", rate)

    @property
    def downstream_bandwidth(self) -> float | None:
        """Server->client bytes per second, per connection; ``None`` is unlimited."""
        return self._downstream_bandwidth

    @downstream_bandwidth.setter
    def downstream_bandwidth(self, rate: float | None) -> None:
        self._downstream_bandwidth = _bandwidth("downstream_bandwidth", rate)

    # Faults

    def blackhole(self, *, connection: int | None = None) -> None:
        """
        Swallow every byte either way, on open and new connections, which stay open; or only
        on the open ``connection`` (an id of `connections`), the others carrying on: one
        silently dead connection, as a dropped NAT or load-balancer entry leaves it.
        """
        if connection is None:
            self._blackholed = True
        else:
            self._link(connection)
            self._blackholed_links.add(connection)

    @property
    def connections(self) -> dict[int, int]:
        """
        The open connections: id (1, 2, ... as in `HeldChunk`) -> the local port of its
        connection to the server, the port Redis shows in ``CLIENT LIST``'s ``addr``.
        """
        return {
            link.id: link.upstream.get_extra_info("sockname")[1]
            for link in self._links.values()
            if link.upstream is not None
        }

    def inject(self, data: bytes, *, connection: int) -> None:
        """
        Send ``data`` to the client of the open ``connection`` as if the server had sent it,
        between two forwarded chunks: a corrupt or unexpected frame on a quiet connection.
        """
        self._link(connection).client.write(data)

    def refuse(self) -> None:
        """Refuse new connections (the port stays reserved) and close the open ones."""
        self._refusing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        self.kill_connections()

    async def unrefuse(self) -> None:
        """Accept connections again, on the same port."""
        self._refusing = False
        if self._server is None and not self._closed:
            await self._listen()

    def reset(self) -> None:
        """Abort every open connection with a TCP RST to both peers, mid-reply or not."""
        for link in list(self._links.values()):
            self._drop(link, rst=True)

    def kill_connections(self) -> None:
        """Close every open connection (FIN to both peers); new ones are accepted as usual."""
        for link in list(self._links.values()):
            self._drop(link, rst=False)

    def truncate_next_reply(self, nbytes: int) -> None:
        """Forward only the first ``nbytes`` of the next server->client chunk, then close."""
        if nbytes < 0:
            raise ConfigurationError("nbytes", nbytes, "an int >= 0")
        self._truncate = nbytes

    async def heal(self) -> None:
        """
        Undo every fault: no latency, no bandwidth cap, no pending truncation, step mode over
        (everything held is released), connections accepted again, blackhole off. Connections
        that lost bytes to the blackhole are closed, since they are out of step with their peer.
        """
        self._upstream_latency = self._downstream_latency = 0.0
        self._upstream_bandwidth = self._downstream_bandwidth = None
        self._truncate = None
        self.unhold()
        self._blackholed = False
        self._blackholed_links.clear()
        for link in list(self._links.values()):
            if link.swallowed:
                self._drop(link, rst=False)
        await self.unrefuse()

    # Step mode

    def hold(self) -> None:
        """Step mode: from now on every client->server chunk waits until released."""
        self._holding = True

    def unhold(self) -> None:
        """End step mode, releasing every held chunk."""
        self._holding = False
        self.release_all()

    @property
    def held(self) -> list[HeldChunk]:
        """The chunks waiting in step mode, oldest first."""
        return [HeldChunk(chunk.link.id, chunk.data) for chunk in self._held]

    # A budget of its own, as asked of every wait here, rather than the caller's asyncio.timeout:
    # a test that forgets one would hang until pytest-timeout instead of saying what it missed.
    async def wait_held(self, n: int = 1, *, timeout: float = 5.0) -> list[HeldChunk]:  # noqa: ASYNC109
        """
        Wait until at least ``n`` chunks are held; returns `held`.

        Raises:
            RuntimeError: the proxy is not in step mode (call `hold` first).
            TimeoutError: fewer than ``n`` chunks were held after ``timeout`` seconds.
        """
        if not self._holding:
            raise RuntimeError("wait_held() outside step mode: call hold() first")
        try:
            async with asyncio.timeout(timeout):
                while len(self._held) < n:
                    await self._held_grew.wait()
        except TimeoutError:
            raise TimeoutError(f"{len(self._held)} of {n} chunks held after {timeout} s") from None
        return self.held

    def release(self, n: int = 1) -> list[HeldChunk]:
        """
        Let the oldest ``n`` held chunks through, in order; returns them.

        Raises:
            ValueError: fewer than ``n`` chunks are held (wait for them with `wait_held`).
        """
        if not 0 <= n <= len(self._held):
            raise ValueError(f"release({n}) with {len(self._held)} chunks held")
        released, self._held = self._held[:n], self._held[n:]
        for chunk in released:
            if chunk.gate is not None:  # a held chunk always has one
                chunk.gate.set()
        return [HeldChunk(chunk.link.id, chunk.data) for chunk in released]

    def release_all(self) -> list[HeldChunk]:
        """Let every held chunk through, in order; returns them."""
        return self.release(len(self._held))

    # Relaying

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, sock=_bind(self._port))
        self._port = self._server.sockets[0].getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine: asyncio would run a coroutine in a task of its own
        # that aclose() could not cancel. The link's task is created and owned here.
        if self._refusing or self._closed:
            writer.transport.abort()  # accepted just before the listener closed
            return
        self._accepted += 1
        link = _Link(self._accepted, writer)
        self._links[link.id] = link
        link.task = asyncio.get_running_loop().create_task(
            self._relay(link, reader), name=f"fault-proxy-{self._port}-{link.id}"
        )
        self._tasks.add(link.task)
        link.task.add_done_callback(self._tasks.discard)

    async def _relay(self, link: _Link, client: asyncio.StreamReader) -> None:
        try:
            upstream, link.upstream = await asyncio.open_connection(LOOPBACK, self.upstream_port)
            pipes = (
                _Pipe(link, client, link.upstream, to_server=True),
                _Pipe(link, upstream, link.client, to_server=False),
            )
            # Each direction ends on its own (a half-close is passed on); an error or a
            # truncation in one ends the link.
            async with asyncio.TaskGroup() as group:
                for pipe in pipes:
                    group.create_task(self._read(pipe))
                    group.create_task(self._write(pipe))
        except* (OSError, _Truncated):
            pass  # a peer went away, the upstream is down, or a reply was cut on purpose
        finally:
            self._drop(link, rst=False)
            for writer in link.writers:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _read(self, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        while data := await pipe.source.read(CHUNK_SIZE):
            if self._blackholed or pipe.link.id in self._blackholed_links:
                self._swallow(pipe.link, data)
                continue
            chunk = _Chunk(data, loop.time(), pipe.link)
            if pipe.to_server and self._holding:
                chunk.gate = asyncio.Event()
                self._held.append(chunk)
                self._held_grew.set()
                self._held_grew = asyncio.Event()
            await pipe.queue.put(chunk)
        if self._blackholed or pipe.link.id in self._blackholed_links:
            pipe.link.swallowed = True  # even the end of the stream is swallowed
        else:
            await pipe.queue.put(None)

    async def _write(self, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        while (chunk := await pipe.queue.get()) is not None:
            if chunk.gate is not None:
                await chunk.gate.wait()
            latency = self._upstream_latency if pipe.to_server else self._downstream_latency
            if (delay := chunk.read_at + latency - loop.time()) > 0:
                await asyncio.sleep(delay)
            if self._blackholed or pipe.link.id in self._blackholed_links:
                self._swallow(pipe.link, chunk.data)
                continue
            data, truncated = chunk.data, False
            if not pipe.to_server and self._truncate is not None:
                data, truncated, self._truncate = data[: self._truncate], True, None
            await self._send(pipe, data)
            if truncated:
                raise _Truncated
        if pipe.sink.can_write_eof():
            pipe.sink.write_eof()

    async def _send(self, pipe: _Pipe, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        while data:
            rate = self._upstream_bandwidth if pipe.to_server else self._downstream_bandwidth
            if rate is None:
                piece, data = data, b""
            else:
                # A slice leaves when the capped link would have finished sending it.
                size = max(1, int(rate * PACING_SLICE))
                piece, data = data[:size], data[size:]
                pipe.paced_until = max(loop.time(), pipe.paced_until) + len(piece) / rate
                await asyncio.sleep(pipe.paced_until - loop.time())
            pipe.sink.write(piece)
            await pipe.sink.drain()
            if pipe.to_server:
                self._bytes_upstream += len(piece)
            else:
                self._bytes_downstream += len(piece)

    def _link(self, connection: int) -> _Link:
        link = self._links.get(connection)
        if link is None:
            raise ValueError(f"no open connection {connection} (open: {sorted(self._links)})")
        return link

    def _swallow(self, link: _Link, data: bytes) -> None:
        link.swallowed = True
        self._bytes_swallowed += len(data)

    def _drop(self, link: _Link, *, rst: bool) -> None:
        """Forget a link and close both its sockets (RST if ``rst``); its task ends soon after."""
        self._links.pop(link.id, None)
        self._blackholed_links.discard(link.id)
        self._held = [chunk for chunk in self._held if chunk.link is not link]
        for writer in link.writers:
            transport = writer.transport
            if rst:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
            # Unsent bytes to a peer that no longer reads would keep a closing socket open.
            if rst or transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()


def _bind(port: int) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:port, sharing the port with the proxy's other sockets."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((LOOPBACK, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _latency(name: str, seconds: float) -> float:
    if not seconds >= 0:  # also rejects NaN
        raise ConfigurationError(name, seconds, "seconds >= 0")
    return float(seconds)


def _bandwidth(name: str, rate: float | None) -> float | None:
    if rate is not None and not 0 < rate < float("inf"):
        raise ConfigurationError(name, rate, "bytes per second > 0, or None for unlimited")
    return None if rate is None else float(rate)
