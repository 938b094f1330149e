"""
`acl`: the ``ACL SETUSER`` line that makes a least-privileged Redis user for one namespace,
from `aiocacheguard.permissions` (the list the Cache's start-up check and `doctor` ask about).
No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import permissions
from ..permissions import PASSWORD_PLACEHOLDER

__all__ = ("AclUser", "acl")


@dataclass(frozen=True, slots=True, kw_only=True)
class AclUser:
    """
    A least-privileged user: its name, its rules, and the command that makes it.

    Attributes:
        user: The user name.
        rules: Key and channel patterns, then commands (``~{shop:*``, ``+get``, ...).
        arguments: The whole command,
            ``ACL SETUSER user reset resetchannels on >PASSWORD rules...``.
        line: ``arguments`` as one line for redis-cli.
    """

    user: str
    rules: list[str]
    arguments: list[str]
    line: str


def acl(
    namespace: str,
    *,
    user: str | None = None,
    password: str = PASSWORD_PLACEHOLDER,
    local: bool = False,
    bloom: bool = False,
    clear: bool = False,
) -> AclUser:
    """
    The user a Cache of ``namespace`` needs (with an L1: ``local``; a Bloom filter: ``bloom``;
    ``Cache.clear``/``aiocacheguard clear``: ``clear``).

    Raises:
        ConfigurationError: the namespace or user name cannot be used.
    """
    arguments = permissions.setuser(
        namespace, user=user, password=password, local=local, bloom=bloom, clear=clear
    )
    return AclUser(
        user=arguments[2],
        rules=permissions.grants(namespace, local=local, bloom=bloom, clear=clear),
        arguments=arguments,
        line=permissions.command_line(arguments),
    )
