"""The ``aiocacheguard bench`` command end to end, on small numbers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from aiocacheguard.testing import RedisServer
from aiocacheguard.tools.bench import STRATEGIES

ROOT = Path(__file__).parent.parent


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiocacheguard", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def redis_servers() -> set[int]:
    """
    PIDs of orphaned redis-server processes: what a bench that exited would leave behind.

    Other sessions on this machine start and stop servers of their own at any time, so the
    test cannot compare every redis-server before and after; but theirs have a live parent,
    while a server our bench leaked is reparented when the bench exits.
    """
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
                # The command may contain spaces: the fields after its closing parenthesis.
                state, ppid = (entry / "stat").read_text().rpartition(")")[2].split()[:2]
            except (OSError, ValueError):
                continue
            if b"redis-server" in cmd and state != "Z" and not _alive_python(int(ppid)):
                pids.add(int(entry.name))
    return pids


def _alive_python(pid: int) -> bool:
    """A live Python process (a test session's or a tool's) owns servers it started."""
    try:
        return b"python" in (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
def test_embedded_run_writes_json_and_plot(tmp_path: Path) -> None:
    before = redis_servers()
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    result = bench(
        "-n", "200", "-p", "2", "--loader-ms", "20", "--rounds", "2", "--seed", "7",
        "--json", str(out_json), "--plot", str(out_png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "200 coroutines x 2 process(es)" in result.stdout
    for strategy in STRATEGIES:
        assert strategy in result.stdout
    document = json.loads(out_json.read_text())
    assert document["schema"] == 1 and document["seed"] == 7
    assert document["config"]["processes"] == 2
    assert document["versions"]["redis_server"]
    assert [r["strategy"] for r in document["results"]] == list(STRATEGIES)
    by_name = {r["strategy"]: r for r in document["results"]}
    for entry in document["results"]:
        assert len(entry["rounds"]) == 2
        assert set(entry["median"]) >= {"loader_calls", "p50_ms", "p99_ms", "redis_commands"}
        for figures in entry["rounds"]:
            assert figures["served"] + figures["empty"] + figures["errors"] == 400
    guard = by_name["guard"]["median"]
    assert guard["loader_calls"] == 1 and guard["empty"] == 0 and guard["errors"] == 0
    assert by_name["singleflight"]["median"]["loader_calls"] <= 2
    assert by_name["naive"]["median"]["loader_calls"] > 1
    assert by_name["ideal"]["median"]["loader_calls"] == 2  # one per process, no Redis
    assert by_name["ideal"]["median"]["redis_commands"] == 0
    assert by_name["soft-ttl"]["median"]["served"] == 400
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000
    assert redis_servers() <= before, "an embedded redis-server was left running"


def test_existing_server_by_url(redis_server: RedisServer) -> None:
    result = bench("--redis-url", redis_server.url, "-n", "50", "--strategy", "guard",
                   "--strategy", "naive", "--loader-ms", "5")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("guard ") for line in lines)
    assert not any(line.startswith("xfetch") for line in lines)
    with redis.Redis(port=redis_server.port) as client:
        assert client.keys("*bench-*") == []  # the run's keys left with it


def test_topology_cluster_one_load_across_processes(tmp_path: Path) -> None:
    out_json = tmp_path / "run.json"
    result = bench("--topology", "cluster", "-n", "50", "-p", "2", "--loader-ms", "10",
                   "--strategy", "guard", "--json", str(out_json))  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(out_json.read_text())
    assert document["config"]["topology"] == "cluster"
    (guard,) = document["results"]
    assert guard["median"]["loader_calls"] == 1 and guard["median"]["served"] == 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "0"], "--coroutines must be at least 1"),
        (["--loader-ms", "-5"], "--loader-ms must be from 0 to 60000"),
        (["-p", "0"], "--processes must be from 1 to 64"),
        (["--rounds", "0"], "--rounds must be from 1 to 100"),
        (["--strategy", "magic"], "invalid choice: 'magic'"),
        (["-n", "many"], "invalid int value"),
        # Checked before the run, not after minutes of benchmarking.
        (["--json", "/no-such-dir/run.json"], "--json /no-such-dir/run.json: no directory"),
        (["--plot", "."], "--plot .: is a directory"),
        (["--topology", "cluster", "--redis-url", "redis://h"], "--topology starts a throwaway"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], message: str) -> None:
    before = redis_servers()
    result = bench(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # argparse adds a usage line
    assert redis_servers() <= before


def test_unreachable_redis_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening
        result = bench("--redis-url", f"redis://127.0.0.1:{port}/0", "-n", "10")
    assert result.returncode == 1
    assert result.stderr.startswith("aiocacheguard bench: error: cannot reach Redis")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_help_shows_defaults_and_one_line_per_strategy() -> None:
    result = bench("--help")
    assert result.returncode == 0
    assert "(default: 10000)" in result.stdout and "(default: None)" not in result.stdout
    lines = result.stdout.split("strategies:\n")[1].splitlines()
    assert [line.split()[0] for line in lines if line.strip()] == list(STRATEGIES)


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "aiocacheguard"
    assert script.exists() and os.access(script, os.X_OK)
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("aiocacheguard ")
