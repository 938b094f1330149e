from __future__ import annotations

import subprocess
import sys

import aiocacheguard


def test_all_is_a_sorted_tuple_of_real_names() -> None:
    assert isinstance(aiocacheguard.__all__, tuple)
    assert list(aiocacheguard.__all__) == sorted(aiocacheguard.__all__)
    for name in aiocacheguard.__all__:
        assert getattr(aiocacheguard, name) is not None, name


def test_design_contract_names() -> None:
    from aiocacheguard import Cache, Policy

    for method in ("get_or_load", "get", "set", "delete", "statistics", "aclose"):
        assert callable(getattr(Cache, method))
    assert Policy(ttl=1.0).ttl == 1.0


def test_exception_tree() -> None:
    errors = aiocacheguard
    for name in aiocacheguard.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Warning):
            assert issubclass(obj, errors.CacheGuardWarning), name
            assert name.endswith("Warning"), name
        elif isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, errors.CacheGuardError), name
            assert name.endswith(("Error", "Timeout", "Unavailable")), name
    assert issubclass(errors.BackendTimeout, TimeoutError)
    assert issubclass(errors.ConfigurationError, ValueError)
    assert issubclass(errors.InvalidKeyError, ValueError)


def test_version() -> None:
    from importlib.metadata import version

    assert aiocacheguard.__version__ == version("aiocacheguard")


def test_import_does_no_io_and_starts_nothing() -> None:
    code = (
        "import socket, threading, asyncio\n"
        "def refuse(*a, **k): raise AssertionError('network at import')\n"
        "socket.socket.connect = refuse\n"
        "import aiocacheguard, sys\n"
        "assert threading.active_count() == 1\n"
        "tools = ('aiocacheguard.testing', 'aiocacheguard.tools')\n"
        "assert not [name for name in sys.modules if name.startswith(tools)], 'tools imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
