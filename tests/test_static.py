"""
What a static check found, held: no ``assert`` guards a runtime path (``python -O`` strips
them), and script ids are computed on a FIPS build (where SHA-1 is refused unless the call says
it is not for security).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "aiocacheguard"


def test_no_assert_in_the_package() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Assert)
    ]
    assert found == []


def run(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=60
    )


def test_a_check_still_refuses_under_python_O() -> None:
    code = (
        "import asyncio\n"
        "from aiocacheguard.errors import CacheGuardError\n"
        "from aiocacheguard.guards.notify import FillNotifier\n"
        "async def main():\n"
        "    try:\n"
        "        async with FillNotifier().listen(b'channel'):\n"
        "            pass\n"
        "    except CacheGuardError as exc:\n"
        "        print('refused:', exc)\n"
        "asyncio.run(main())\n"
    )
    result = run(code, "-O")
    assert result.stdout.startswith("refused: "), result.stderr


def test_script_ids_on_a_fips_build() -> None:
    # A FIPS build's hashlib refuses SHA-1 unless usedforsecurity=False; this one is made to.
    code = (
        "import hashlib\n"
        "sha1 = hashlib.sha1\n"
        "def fips_sha1(data=b'', *, usedforsecurity=True):\n"
        "    if usedforsecurity:\n"
        "        raise ValueError('[digital envelope routines] unsupported')\n"
        "    return sha1(data, usedforsecurity=False)\n"
        "hashlib.sha1 = fips_sha1\n"
        "from aiocacheguard._types import LuaScript\n"
        "print(LuaScript('ping', 'return 1').sha)\n"
    )
    result = run(code)
    assert result.stdout.strip() == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", result.stderr
