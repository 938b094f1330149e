"""
The operator's commands end to end (`aiocacheguard doctor|stats|inspect|keys|clear|warm`), on
a real standalone server and a real cluster. Most run ``main()`` in this process (fast); one
test runs the console entry point to prove the output of a real process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from aiocacheguard import ops
from aiocacheguard.testing import RedisClusterServer, RedisSentinelServer, RedisServer
from aiocacheguard.tools.cli import main
from aiocacheguard.tools.operations import Output

from .helpers import started


@pytest.fixture(scope="module")
def own_server() -> Iterator[RedisServer]:
    """A server of this module's own: the tests CONFIG SET it and count all its keys."""
    yield from started(RedisServer())


@pytest.fixture
def server_url(own_server: RedisServer) -> Iterator[str]:
    with redis.Redis(port=own_server.port) as client:
        client.flushall()  # our own server: nothing of anyone else's on it
        yield own_server.url
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", "noeviction")


def run(
    capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None
) -> tuple[int, str, str]:
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(args))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def warm_file(tmp_path: Path, count: int, prefix: str = "user:") -> Path:
    path = tmp_path / "items.jsonl"
    with path.open("w") as file:
        for i in range(count):
            file.write(json.dumps({"key": f"{prefix}{i}", "value": {"id": i}}) + "\n")
    return path


def test_doctor_fails_a_default_server_and_passes_a_tuned_one(
    capsys: pytest.CaptureFixture[str], server_url: str, own_server: RedisServer
) -> None:
    code, out, _ = run(capsys, "doctor", "--redis-url", server_url)
    assert code == 1
    assert "maxmemory-policy allkeys-lru" in out and "fail" in out
    with redis.Redis(port=own_server.port) as client:
        client.config_set("maxmemory", 64 * 2**20)
        client.config_set("maxmemory-policy", "allkeys-lru")
    code, out, _ = run(capsys, "doctor", "--redis-url", server_url, "--json")
    document = json.loads(out)
    assert code == 0 and document["ok"] is True
    rows = {c["name"]: c for c in document["checks"]}
    assert rows["maxmemory-policy"]["status"] == "ok"
    assert rows["latency-monitor"] == {
        "name": "latency-monitor",
        "status": "warn",
        "detail": "off: LATENCY DOCTOR has nothing to report",
        "fix": "latency-monitor-threshold 100",
        "node": "",
    }


def test_doctor_on_a_cluster_checks_every_primary(
    capsys: pytest.CaptureFixture[str], redis_cluster: RedisClusterServer
) -> None:
    code, out, _ = run(capsys, "doctor", "--redis-url", redis_cluster.url, "--cluster", "--json")
    document = json.loads(out)
    assert code == 1 and not document["ok"]  # the throwaway cluster has no maxmemory
    nodes = {c["node"] for c in document["checks"]}
    assert len(nodes) == 3
    assert [c["status"] for c in document["checks"] if c["name"] == "cluster"] == ["ok"] * 3


def test_warm_then_stats_counts_them(
    capsys: pytest.CaptureFixture[str], server_url: str, tmp_path: Path
) -> None:
    path = warm_file(tmp_path, 10_000)
    code, out, err = run(
        capsys, "warm", str(path), "--redis-url", server_url, "--namespace", "shop"
    )
    assert (code, err) == (0, "") and "warmed 10,000 keys" in out
    code, out, _ = run(
        capsys, "stats", "--redis-url", server_url, "--namespace", "shop", "--interval", "0"
    )
    assert code == 0 and "all 10,000 keys examined" in out
    assert any(line.split() == ["entries", "10,000"] for line in out.splitlines())
    code, out, _ = run(
        capsys, "stats", "--redis-url", server_url, "--namespace", "shop", "--interval", "0",
        "--sample", "1000", "--json",
    )  # fmt: skip
    found = json.loads(out)["namespace"]
    assert found["sampled"] is True and found["examined"] < 10_000
    assert 5_000 < found["entries"] < 20_000


def test_warm_on_a_cluster_then_stats_and_clear(
    capsys: pytest.CaptureFixture[str], redis_cluster: RedisClusterServer, tmp_path: Path
) -> None:
    namespace = f"cli-{uuid.uuid4().hex[:8]}"
    common = ("--redis-url", redis_cluster.url, "--cluster", "--namespace", namespace)
    path = warm_file(tmp_path, 2_000)
    code, out, _ = run(capsys, "warm", str(path), *common)
    assert code == 0 and "warmed 2,000 keys" in out
    code, out, _ = run(capsys, "stats", *common, "--interval", "0", "--sample", "10000000")
    assert code == 0 and any(line.split() == ["entries", "2,000"] for line in out.splitlines())
    code, out, _ = run(capsys, "clear", "user:1*", *common)
    assert code == 0 and "dry run: 1,111 keys would be removed" in out
    code, out, _ = run(capsys, "clear", *common, "--yes", "--json")
    assert code == 0 and json.loads(out) == {"dry_run": False, "removed": 2_000}


def test_warm_reads_stdin_and_keeps_a_line_ttl(
    capsys: pytest.CaptureFixture[str], server_url: str
) -> None:
    lines = '{"key": "a", "value": 1, "ttl": 5}\n\n{"key": "b", "value": [1, 2]}\n'
    code, out, _ = run(
        capsys, "warm", "-", "--redis-url", server_url, "--namespace", "shop", stdin=lines
    )
    assert code == 0 and "warmed 2 keys" in out
    code, out, _ = run(capsys, "inspect", "a", "--redis-url", server_url, "--namespace", "shop",
                       "--json")  # fmt: skip
    seen = json.loads(out)
    assert seen["value"] == 1 and 0 < seen["ttl_left"] <= 5
    # Written with the serializer the application's Caches use, which read it as a hit.
    code, _, _ = run(capsys, "warm", "-", "--redis-url", server_url, "--namespace", "shop",
                     "--serializer", "json", stdin='{"key": "c", "value": [3]}')  # fmt: skip
    assert code == 0
    code, out, _ = run(capsys, "inspect", "c", "--redis-url", server_url, "--namespace", "shop",
                       "--json")  # fmt: skip
    assert json.loads(out)["serializer"] == "json"


def test_warm_spreads_ttls_and_gives_a_null_the_ttl_too(
    capsys: pytest.CaptureFixture[str], server_url: str
) -> None:
    """Keys warmed together do not expire together (the policy's jitter on --ttl and on a
    line's own ttl alike), and a cached "absent" (null) lives for --ttl, not 5 s."""
    lines = "".join(f'{{"key": "j{i}", "value": {i}}}\n' for i in range(50))
    lines += "".join(f'{{"key": "t{i}", "value": {i}, "ttl": 1000}}\n' for i in range(50))
    lines += '{"key": "gone", "value": null}\n'
    code, out, _ = run(
        capsys, "warm", "-", "--redis-url", server_url, "--namespace", "shop", "--ttl", "1000",
        stdin=lines,
    )  # fmt: skip
    assert code == 0 and "warmed 101 keys" in out
    with redis.Redis.from_url(server_url) as client:
        default = {client.pttl(f"{{shop:j{i}}}") for i in range(50)}
        own = {client.pttl(f"{{shop:t{i}}}") for i in range(50)}
        absent = client.pttl("{shop:gone}")
    for ttls in (default, own):
        assert all(0 < ttl <= 1_000_000 for ttl in ttls), ttls
        # Jitter 0.1: spread over up to 100 s. Written within a second of each other, 50 keys
        # without jitter fall in a 1 s band.
        assert max(ttls) - min(ttls) > 10_000, (min(ttls), max(ttls))
    assert 900_000 < absent <= 1_000_000, absent


def test_key_names_reach_the_terminal_escaped(
    capsys: pytest.CaptureFixture[str], server_url: str
) -> None:
    """A key name is anyone's bytes: an escape sequence, NUL, a newline or a bidirectional
    override in one is shown escaped, as redis-cli shows it, never sent to the terminal."""
    hostile = "evil\x1b[2J\x00\nfake row\u202e\\"
    with redis.Redis.from_url(server_url) as client:
        client.set(f"{{shop:{hostile}}}".encode(), b"x" * 100)
    common = ["--redis-url", server_url, "--namespace", "shop", "--plain"]
    escaped = "evil\\x1b[2J\\x00\\nfake row\\u202e\\\\"
    for args in (["keys", "*"], ["clear", "*"], ["inspect", hostile]):
        _, out, _ = run(capsys, *args, *common)
        assert escaped in out, (args, out)
        assert not any(c in out for c in "\x1b\x00\u202e"), (args, out)
    _, out, _ = run(capsys, "keys", "*", *common)
    assert len(out.strip().splitlines()) == 3  # title, header, the one key: no row forged


def test_clear_is_a_dry_run_without_yes(
    capsys: pytest.CaptureFixture[str], server_url: str, tmp_path: Path
) -> None:
    run(capsys, "warm", str(warm_file(tmp_path, 300)), "--redis-url", server_url,
        "--namespace", "shop")  # fmt: skip
    run(capsys, "warm", str(warm_file(tmp_path, 50)), "--redis-url", server_url,
        "--namespace", "other")  # fmt: skip
    with redis.Redis.from_url(server_url) as client:
        client.set(b"{shop:user:1}:lock", b"token", px=60_000)
        assert client.dbsize() == 351
        code, out, _ = run(capsys, "clear", "--redis-url", server_url, "--namespace", "shop")
        assert code == 0 and "dry run: 300 keys would be removed" in out
        assert "{shop:user:" in out and "--yes" in out
        assert client.dbsize() == 351  # nothing removed
        code, out, _ = run(
            capsys, "clear", "--redis-url", server_url, "--namespace", "shop", "--yes"
        )
        assert code == 0 and "removed 300 keys" in out
        assert client.dbsize() == 51  # the other namespace, and the lock (not asked for)
        assert client.exists(b"{shop:user:1}:lock")
        code, out, _ = run(capsys, "clear", "--redis-url", server_url, "--namespace", "shop",
                           "--locks", "--yes")  # fmt: skip
        assert "removed 1 keys" in out and client.dbsize() == 50


def test_inspect_shows_the_header_fields(
    capsys: pytest.CaptureFixture[str], server_url: str
) -> None:
    lines = '{"key": "user:7", "value": {"name": "ada"}, "ttl": 30}\n'
    run(capsys, "warm", "-", "--redis-url", server_url, "--namespace", "shop", stdin=lines)
    with redis.Redis.from_url(server_url) as client:
        client.set(b"{shop:user:7}:lock", b"holder-1", px=9000)
    code, out, _ = run(capsys, "inspect", "user:7", "--redis-url", server_url, "--namespace",
                       "shop", "--plain")  # fmt: skip
    assert code == 0
    fields = {line.split("  ")[1].strip() for line in out.splitlines()[1:] if line.startswith("  ")}
    assert {"serializer", "negative", "written at", "soft expiry", "hard expiry", "TTL left",
            "compute time", "size", "value", "lock"} <= fields  # fmt: skip
    assert "json (record format 2)" in out and '"name": "ada"' in out
    assert "holder-1 (lease left" in out
    code, out, _ = run(capsys, "inspect", "nope", "--redis-url", server_url, "--namespace", "x")
    assert code == 1 and "not cached" in out


def test_keys_top(capsys: pytest.CaptureFixture[str], server_url: str) -> None:
    lines = "".join(json.dumps({"key": f"k{i}", "value": "x" * 2**i}) + "\n" for i in range(4, 16))
    run(capsys, "warm", "-", "--redis-url", server_url, "--namespace", "shop", stdin=lines)
    code, out, _ = run(capsys, "keys", "--top", "2", "--redis-url", server_url, "--namespace",
                       "shop", "--json")  # fmt: skip
    top = json.loads(out)
    assert code == 0 and [k["key"] for k in top["keys"]] == ["k15", "k14"]
    assert top["matched"] == 12 and top["sampled"] is False


def test_keys_matching_nothing_says_so_in_plain_output(
    capsys: pytest.CaptureFixture[str], server_url: str
) -> None:
    """An empty table used to crash: ``TypeError: 'int' object is not iterable``."""
    code, out, err = run(capsys, "keys", "nothing:*", "--redis-url", server_url, "--namespace",
                         "shop")  # fmt: skip
    assert (code, err) == (0, "")
    assert "largest of all 0 entries matching 'nothing:*'" in out
    assert out.splitlines()[1].split() == ["key", "memory", "TTL", "left"]


def test_a_sentinel_url_reaches_the_primary(
    capsys: pytest.CaptureFixture[str], redis_sentinel: RedisSentinelServer
) -> None:
    host, port = redis_sentinel.sentinels[0]
    url = f"redis+sentinel://{host}:{port}/{redis_sentinel.service}"
    lines = '{"key": "a", "value": 1}\n'
    namespace = f"cli-{uuid.uuid4().hex[:8]}"
    code, out, err = run(capsys, "warm", "-", "--redis-url", url, "--namespace", namespace,
                         stdin=lines)  # fmt: skip
    assert (code, err) == (0, "") and "warmed 1 keys" in out
    assert redis_sentinel.primary is not None
    with redis.Redis(port=redis_sentinel.primary.port) as primary:
        assert primary.exists(f"{{{namespace}:a}}")
    code, out, _ = run(capsys, "inspect", "a", "--redis-url", url, "--namespace", namespace)
    assert code == 0 and "json (record format 2)" in out


@pytest.fixture(scope="module")
def dead_url() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


@pytest.mark.parametrize(
    "args",
    [
        ["doctor"],
        ["stats", "--namespace", "shop"],
        ["inspect", "k", "--namespace", "shop"],
        ["keys", "--namespace", "shop"],
        ["clear", "--namespace", "shop"],
        ["clear", "--namespace", "shop", "--yes"],
        ["warm", "-", "--namespace", "shop"],
        ["stats", "--cluster"],
    ],
)
def test_a_dead_url_is_one_line_and_nonzero(
    capsys: pytest.CaptureFixture[str], dead_url: str, args: list[str]
) -> None:
    code, out, err = run(capsys, *args, "--redis-url", dead_url, stdin='{"key": "a", "value": 1}')
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"aiocacheguard {args[0]}: error: ") and "Traceback" not in err


@pytest.mark.parametrize("command", ["stats", "inspect", "keys"])
def test_a_server_that_never_answers_is_exit_1_not_bad_input(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """A server that accepts connections but never answers (a hung process, a blackholed
    route): the command times out, which is Redis failing (exit 1), not bad input (2)."""
    from aiocacheguard.tools import operations

    monkeypatch.setattr(operations, "COMMAND_TIMEOUT", 0.3)
    with socket.socket() as mute:  # the kernel completes connections; nothing ever answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        url = f"redis://127.0.0.1:{mute.getsockname()[1]}/0"
        extra = {"inspect": ["k"], "keys": ["*"]}.get(command, [])
        code, out, err = run(capsys, command, *extra, "--redis-url", url, "--namespace", "ns")
    assert code == 1 and out == "", (code, err)
    assert err.startswith(f"aiocacheguard {command}: error: ") and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["doctor", "--redis-url", "http://x"], "expected redis://"),
        (["stats", "--redis-url", "redis+sentinel://h:1"], "redis+sentinel://host:port"),
        (["stats", "--redis-url", "redis+sentinel://h:1/s", "--cluster"], "do not go together"),
        (["inspect", "k", "--redis-url", "redis://h", "--namespace", "a:b"], "namespace='a:b'"),
        (["keys", "[z-a]", "--redis-url", "redis://h", "--namespace", "ns"], "pattern="),
        (["warm", "/no/such/file", "--redis-url", "redis://h", "--namespace", "ns"], "No such"),
        (["stats", "--redis-url", "redis://h", "--interval", "-1"], "--interval must be"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_bad_warm_line_names_its_number(
    capsys: pytest.CaptureFixture[str], server_url: str
) -> None:
    lines = '{"key": "a", "value": 1}\n{"key": 5, "value": 1}\n'
    code, _, err = run(
        capsys, "warm", "-", "--redis-url", server_url, "--namespace", "shop", stdin=lines
    )
    assert code == 2 and err.strip() == (
        "aiocacheguard warm: error: line 2: the key must be a string"
    )


def test_the_console_command_end_to_end(server_url: str) -> None:
    """A real process: plain text when piped, and one line on a dead URL."""
    command = [sys.executable, "-m", "aiocacheguard"]
    result = subprocess.run(
        [*command, "stats", "--redis-url", server_url, "--interval", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.startswith("server\n"), result.stderr
    result = subprocess.run(
        [*command, "stats", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "(default: 10000)" in result.stdout
    assert "(default: None)" not in result.stdout


def test_ctrl_c_stops_cleanly(server_url: str) -> None:
    """SIGINT in the middle of a command: exit 130 and one line, no traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "aiocacheguard", "stats", "--redis-url", server_url,
         "--interval", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        with redis.Redis.from_url(server_url) as client:
            deadline = time.monotonic() + 20
            # Its first INFO answered: it is in its measuring interval, its handlers set.
            while not any(c["cmd"] == "info" for c in client.client_list()):
                assert time.monotonic() < deadline, "the command never connected"
                time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 130 and out == ""
    assert err == "aiocacheguard stats: interrupted\n"


def test_ctrl_c_during_a_bench_is_one_line_from_every_process(server_url: str) -> None:
    """Ctrl-C in a terminal signals the whole process group, the bench's workers too: the
    bench says it was interrupted, once, and no worker prints a traceback or outlives it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "aiocacheguard", "bench", "--redis-url", server_url,
         "-n", "20000", "-p", "2", "--strategy", "naive", "--rounds", "50", "--plain"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )  # fmt: skip
    try:
        with redis.Redis.from_url(server_url) as client:
            deadline = time.monotonic() + 60
            # Both workers connected: they are past their start-up, in the stampede.
            while sum(c["cmd"] != "client|list" for c in client.client_list()) < 3:
                assert time.monotonic() < deadline, "the workers never connected"
                time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while True:  # every process of the group gone
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "a worker outlived the bench"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert err == "aiocacheguard bench: interrupted\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rich_on_a_terminal_plain_otherwise() -> None:
    rows = [["maxmemory", "fail", "no limit"], ["slowlog", "ok", "on"]]
    headers = ["check", "status", "found"]
    terminal = _Terminal()
    Output(json_mode=False, plain=False, stream=terminal).table("doctor", headers, rows)
    assert "┃" in terminal.getvalue() or "│" in terminal.getvalue()  # a rich table
    assert "fail" in terminal.getvalue()
    for stream, plain in ((_Terminal(), True), (io.StringIO(), False)):  # --plain, piped
        Output(json_mode=False, plain=plain, stream=stream).table("doctor", headers, rows)
        assert stream.getvalue().splitlines()[1:] == [
            "check      status  found",
            "maxmemory  fail    no limit",
            "slowlog    ok      on",
        ]


def test_acl_prints_the_line_that_makes_a_working_least_privileged_user(
    capsys: pytest.CaptureFixture[str], own_server: RedisServer
) -> None:
    code, out, err = run(capsys, "acl", "--namespace", "shop", "--local", "--user", "shop-app")
    assert code == 0 and "replace <password>" in err
    (line,) = out.splitlines()
    assert line.startswith(
        "ACL SETUSER shop-app reset resetchannels on '><password>' '~{shop:*' '&{shop:*'"
    )
    assert "'&__redis__:invalidate'" in line and "'+client|tracking'" in line
    assert "+scan" not in line and "+exists" not in line  # --clear, --bloom not asked
    arguments = shlex.split(line.replace("<password>", "pw"))
    with redis.Redis(port=own_server.port) as admin:
        assert admin.execute_command(*arguments) == b"OK"
        try:
            with redis.Redis(port=own_server.port, username="shop-app", password="pw") as user:
                user.set("{shop:k}", 1)
                with pytest.raises(redis.exceptions.NoPermissionError):
                    user.set("{other:k}", 1)  # another namespace's keys: refused
        finally:
            admin.acl_deluser("shop-app")
    code, out, _ = run(capsys, "acl", "--namespace", "shop", "--bloom", "--clear", "--json")
    document = json.loads(out)
    assert code == 0 and document["user"] == "cache-shop"
    assert {"+exists", "+getbit", "+setbit", "+rename", "+scan"} <= set(document["rules"])
    code, _, err = run(capsys, "acl", "--namespace", "no:colons")
    assert code == 2 and "namespace" in err


def test_doctor_checks_the_users_permissions(
    capsys: pytest.CaptureFixture[str], server_url: str, own_server: RedisServer
) -> None:
    port = own_server.port
    with redis.Redis(port=port) as admin:
        admin.execute_command("ACL", "SETUSER", "partial", "reset", "on", ">pw", "~*", "&*",
                              "+@all", "-evalsha", "-client|tracking")  # fmt: skip
        try:
            url = f"redis://partial:pw@127.0.0.1:{port}/0"
            code, out, _ = run(
                capsys, "doctor", "--redis-url", url, "--namespace", "shop", "--local", "--json"
            )
            rows = {c["name"]: c for c in json.loads(out)["checks"]}
            assert code == 1 and rows["permissions"]["status"] == "fail"
            assert rows["permissions"]["detail"] == (
                "user 'partial' lacks +evalsha +client|tracking"
            )
            assert rows["permissions"]["fix"].startswith(
                "aiocacheguard acl --namespace shop --local"
            )
            admin.execute_command("ACL", "SETUSER", "partial", "-acl|dryrun")
            code, out, _ = run(capsys, "doctor", "--redis-url", url, "--namespace", "shop")
            assert "not checked: ACL DRYRUN is not available" in " ".join(out.split())
            # A least-privileged user may not ask (nor run INFO): an admin asks for it.
            least = ops.acl("shop", user="least", password="pw")
            admin.execute_command(*least.arguments)
            code, out, _ = run(capsys, "doctor", "--redis-url", server_url, "--namespace", "shop",
                               "--acl-user", "least", "--json")  # fmt: skip
            rows = {c["name"]: c for c in json.loads(out)["checks"]}
            assert rows["permissions"]["status"] == "ok"
        finally:
            admin.acl_deluser("partial", "least")
