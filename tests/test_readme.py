"""The README's example runs, and CI runs the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from aiocacheguard.testing import RedisServer

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_example_runs(redis_server: RedisServer) -> None:
    example = fenced("python")[0]
    assert 'os.environ["REDIS_URL"]' in example and "port=6379" not in example
    # Its Redis comes from REDIS_URL: here a throwaway server, never a shared one.
    out = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "REDIS_URL": redis_server.url},
    )
    assert "['ada', 'grace']" in out.stdout
    assert "loader_calls=2" in out.stdout  # the board and user 1


def test_readme_has_its_setup_commands_and_ci_runs_the_test_command() -> None:
    user, install, test = fenced("sh")
    assert user.strip() == "pip install aiocacheguard"  # the first command a reader meets
    assert README.index(user) < README.index("```python")
    assert install.strip() == "pip install -e '.[dev]' -c constraints.txt && aiocacheguard bench"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test.strip() in ci
    # CI installs exactly what the README's install command installs: the pinned toolchain.
    assert "python -m pip install -q -e '.[dev]' -c constraints.txt" in ci


def test_quickstart_runs(redis_server: RedisServer) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "10000 concurrent callers, 1 database query" in out.stdout


def test_the_changelog_dates_this_version_and_names_its_tag() -> None:
    from aiocacheguard import __version__

    changelog = (ROOT / "CHANGELOG.md").read_text()
    heading = rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$"
    assert re.search(heading, changelog, flags=re.MULTILINE), __version__
    assert f"`v{__version__}`" in changelog
