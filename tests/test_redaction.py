"""
No password of a Redis URL is ever printed, logged, raised or written: not by `Cache.from_url`'s
errors (their text, attributes and the chain a traceback renders), not by the operator's
commands, not by ``aiocacheguard bench`` (its header, its errors, its --json file).

The URLs are the malformed ones that put the password there before (a bad port, a wrong
scheme, a bad Sentinel port, an unescaped ``#`` that makes a parser take half the password for
a port), and well-formed ones against a server whose ACL user has that password.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from aiocacheguard import Cache, ConfigurationError, Policy
from aiocacheguard._redact import redact, redact_url
from aiocacheguard.testing import RedisServer
from aiocacheguard.tools.cli import main

from .helpers import started

ROOT = Path(__file__).parent.parent
PASSWORD = "Hunter2-s3cr3t-XYZZY"
#: A password with an unescaped ``#``: a URL parser ends the authority there.
SPLIT_PASSWORD = "Pa55#w0rd-XYZZY"
PIECES = (PASSWORD, SPLIT_PASSWORD, "Pa55", "w0rd-XYZZY")


def assert_hidden(text: str) -> None:
    for piece in PIECES:
        assert piece not in text, f"{piece!r} in {text!r}"


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """A server with a user ``app`` whose password is `PASSWORD`."""
    for server in started(RedisServer()):
        with redis.Redis(port=server.port) as client:
            client.execute_command(
                "ACL", "SETUSER", "app", "on", f">{PASSWORD}", "~*", "&*", "+@all"
            )
        yield server


@pytest.fixture
def secret_url(acl_server: RedisServer) -> str:
    return f"redis://app:{PASSWORD}@127.0.0.1:{acl_server.port}/0"


MALFORMED = [
    pytest.param(f"redis://app:{PASSWORD}@127.0.0.1:notaport/0", id="bad-port"),
    pytest.param(f"redis://app:{PASSWORD}@127.0.0.1:99999/0", id="port-out-of-range"),
    pytest.param(f"http://app:{PASSWORD}@127.0.0.1/0", id="wrong-scheme"),
    pytest.param(f"redis+sentinel://app:{PASSWORD}@127.0.0.1:x/mymaster", id="sentinel-port"),
    pytest.param(f"redis://app:{SPLIT_PASSWORD}@127.0.0.1:6379/0", id="unescaped-hash"),
    pytest.param(f"redis://127.0.0.1:nope/0?password={PASSWORD}", id="query-password"),
]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://app@h/0", "redis://app@h/0"),
        (f"redis://:{PASSWORD}@h/0", "redis://:***@h/0"),
        (f"rediss://app:{PASSWORD}@h:6380/0?ssl_ca_certs=/ca.pem", "rediss://app:***@h:6380/0?ssl_ca_certs=/ca.pem"),
        (f"redis://app:{SPLIT_PASSWORD}@h/0", "redis://app:***@h/0"),
        (f"redis://app:a@b{PASSWORD}@h/0", "redis://app:***@h/0"),
        (f"unix:///run/redis.sock?password={PASSWORD}&db=1", "unix:///run/redis.sock?password=***&db=1"),
        (f"redis+sentinel://app:{PASSWORD}@a:1,b:2/m?ssl=true", "redis+sentinel://app:***@a:1,b:2/m?ssl=true"),
        (f"--redis-url=redis://app:{PASSWORD}@h", "--redis-url=redis://app:***@h"),
        ("not a url", "not a url"),
    ],
)  # fmt: skip
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_replaces_what_a_parser_made_of_a_password() -> None:
    url = f"redis://app:{SPLIT_PASSWORD}@h/0"
    text = f"Port could not be cast to integer value as 'Pa55'; {url}; {PASSWORD}"
    assert (
        redact(text, url)
        == f"Port could not be cast to integer value as '***'; redis://app:***@h/0; {PASSWORD}"
    )
    # Short pieces only where quoted: the letters of the message stay.
    assert redact("as 'ab', a b", "redis://u:ab#cd@h") == "as '***', a b"


def chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is not None and id(current) not in seen:
            seen.add(id(current))
            yield current
            todo += [current.__cause__, current.__context__]


@pytest.mark.parametrize("url", MALFORMED)
def test_from_url_errors_hold_no_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Cache.from_url(url, namespace="x", policy=Policy(ttl=1.0))
    error = info.value
    assert error.field == "url" and "***" in str(error.value)
    assert_hidden("".join(traceback.format_exception(error)))
    for link in chain(error):  # the chain itself, rendered or not
        assert_hidden(f"{link!s} {link!r} {link.args!r} {vars(link)!r}")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.parametrize("url", MALFORMED)
@pytest.mark.parametrize("command", [["doctor"], ["stats"], ["keys", "--namespace", "n"]])
@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["plain", "debug"])
def test_operations_print_no_password_of_a_bad_url(
    capsys: pytest.CaptureFixture[str], url: str, command: list[str], debug: list[str]
) -> None:
    code, output = run(capsys, *command, "--redis-url", url, *debug)
    assert code == 2 and "error" in output
    assert_hidden(output)


@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["plain", "debug"])
def test_operations_print_no_password_of_an_unreachable_url(
    capsys: pytest.CaptureFixture[str], debug: list[str]
) -> None:
    for url in (
        f"redis://app:{PASSWORD}@127.0.0.1:{dead_port()}/0",
        f"redis+sentinel://app:{PASSWORD}@127.0.0.1:{dead_port()}/mymaster",
    ):
        code, output = run(capsys, "stats", "--redis-url", url, *debug)
        assert code == 1 and "error" in output
        assert_hidden(output)


def test_operations_print_no_password_of_a_wrong_one(
    capsys: pytest.CaptureFixture[str], acl_server: RedisServer
) -> None:
    url = f"redis://app:{PASSWORD}x@127.0.0.1:{acl_server.port}/0"
    code, output = run(capsys, "doctor", "--redis-url", url)
    assert code == 1 and "error" in output
    assert_hidden(output)


@pytest.mark.parametrize(
    "command",
    [
        ["doctor"],
        ["stats", "--namespace", "n", "--interval", "0.1"],
        ["keys", "--namespace", "n"],
        ["inspect", "k", "--namespace", "n"],
        ["clear", "--namespace", "n"],
    ],
)
@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["text", "json"])
def test_operations_on_a_password_url_print_no_password(
    capsys: pytest.CaptureFixture[str], secret_url: str, command: list[str], mode: list[str]
) -> None:
    code, output = run(capsys, *command, "--redis-url", secret_url, *mode)
    assert code in (0, 1) and output  # doctor may find the server untuned: still no password
    assert_hidden(output)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiocacheguard", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_bench_header_and_json_hold_no_password(secret_url: str, tmp_path: Path) -> None:
    out_json = tmp_path / "run.json"
    result = bench(
        "--redis-url", secret_url, "-n", "20", "--loader-ms", "1",
        "--strategy", "naive", "--strategy", "guard", "--json", str(out_json),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "standalone redis://app:***@127.0.0.1:" in result.stdout
    assert_hidden(result.stdout + result.stderr)
    text = out_json.read_text()
    assert_hidden(text)
    document = json.loads(text)
    assert document["config"]["redis_url"] == redact_url(secret_url)
    assert redact_url(secret_url) in document["argv"]


@pytest.mark.parametrize(
    "url",
    [
        *MALFORMED,
        pytest.param(f"redis://app:{PASSWORD}@127.0.0.1:{dead_port()}/0", id="unreachable"),
    ],
)
def test_bench_errors_hold_no_password(url: str) -> None:
    result = bench("--redis-url", url, "-n", "10", "--strategy", "naive")
    assert result.returncode == 1
    assert "aiocacheguard bench: error: cannot reach Redis at " in result.stderr
    assert_hidden(result.stdout + result.stderr)
