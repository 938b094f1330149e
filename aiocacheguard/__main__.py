"""``python -m aiocacheguard``: the same as the ``aiocacheguard`` command."""

from .tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
