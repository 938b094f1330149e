"""
The documentation site (mkdocs.yml, docs/): it builds with ``mkdocs build --strict``, as CI
builds it, its API reference covers the public API, and every Python sample on its pages runs.

A sample is a complete program that finds its Redis in the environment, as a user's program
would: ``REDIS_URL`` (a standalone server), ``REDIS_CLUSTER_URL`` (a node of a Redis Cluster)
and ``SENTINEL_ADDRESS`` (``host:port`` of a sentinel watching ``mymaster``). Here they name
throwaway servers, never a shared one, and a sample runs as a module of its own in this process,
under the suite's warnings-as-errors. Blocks marked ``<!-- from PATH -->`` are copies that
tests/test_docs.py checks against their file; a block marked ``<!-- no-run -->`` is a fragment
that is only compiled.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import aiocacheguard
import aiocacheguard.errors
import aiocacheguard.testing
from aiocacheguard.testing import RedisClusterServer, RedisSentinelServer, RedisServer

from .helpers import started

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(
    r"(?:^<!-- (?P<mark>no-run|from \S+) -->\n)?^```python\n(?P<code>.*?)^```$",
    re.DOTALL | re.MULTILINE,
)


def samples() -> list[tuple[str, str | None, str]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        for n, match in enumerate(BLOCK.finditer(page.read_text()), 1):
            found.append((f"{name}#{n}", match["mark"], match["code"]))
    return found


SAMPLES = samples()


@pytest.fixture(scope="module")
def docs_server() -> Iterator[RedisServer]:
    """A server of the samples' own, emptied before each: each sample starts from nothing."""
    yield from started(RedisServer())


@pytest.mark.parametrize(("where", "mark", "code"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_each_sample_runs(
    where: str,
    mark: str | None,
    code: str,
    docs_server: RedisServer,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled = compile(code, where, "exec")
    if mark is not None:
        return  # a fragment, or a copy that tests/test_docs.py checks
    # Checked before it runs: a sample must never reach a shared server (nor make a reader's
    # copy write into one): no 6379, no client on redis-py's default address.
    shared = re.search(r"\b6379\b|Redis\(\)|redis://[\w.-]+(?=[/'\"])", code)
    assert shared is None, f"{where}: {shared[0]!r}: take REDIS_URL from the environment"
    with redis.Redis(port=docs_server.port) as admin:
        admin.flushall()
    monkeypatch.setenv("REDIS_URL", docs_server.url)
    if "REDIS_CLUSTER_URL" in code:
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        monkeypatch.setenv("REDIS_CLUSTER_URL", cluster.url)
    if "SENTINEL_ADDRESS" in code:
        sentinel: RedisSentinelServer = request.getfixturevalue("redis_sentinel")
        host, port = sentinel.sentinels[0]
        monkeypatch.setenv("SENTINEL_ADDRESS", f"{host}:{port}")
    # A module of its own, as a saved file run with python would be: dataclasses and type
    # hints resolve their annotations through sys.modules.
    module = types.ModuleType("docs_sample_" + re.sub(r"\W", "_", where))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compiled, module.__dict__)


def test_there_are_samples_on_every_guide() -> None:
    pages = {where.split("#")[0] for where, mark, _ in SAMPLES if mark is None}
    for page in ["index.md", "getting-started/index.md", "concepts/index.md"]:
        assert page in pages, page
    for guide in sorted((DOCS / "guides").glob("*.md")):
        assert f"guides/{guide.name}" in pages, guide.name


def test_the_api_reference_covers_the_public_api() -> None:
    reference = "\n".join(p.read_text() for p in sorted((DOCS / "reference").glob("*.md")))
    documented = set(re.findall(r"^::: (\S+)", reference, flags=re.MULTILINE))
    assert "aiocacheguard.errors" in documented  # every exception, present and future
    assert "aiocacheguard.testing" in documented  # its __all__
    for name in aiocacheguard.__all__:
        if name == "__version__" or hasattr(aiocacheguard.errors, name):
            continue
        assert f"aiocacheguard.{name}" in documented, f"{name} is not in docs/reference/"
    for name in aiocacheguard.testing.__all__:
        assert hasattr(aiocacheguard.testing, name)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' -c constraints.txt")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about its successor
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "cache" / "index.html").is_file()
