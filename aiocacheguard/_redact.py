"""
Redis URLs as they may be shown: the password, and any secret query value, replaced by ``***``.

Every URL the library and its tools print, log, raise or write goes through `redact_url`; every
message of another library's that may quote a piece of a URL (redis-py's "Port could not be cast
to integer value as '...'") goes through `redact`.

Both work on text, not on what a URL parser makes of it, because the URLs that end up in error
messages are the malformed ones: in ``redis://user:pa#ss@host`` a parser sees host ``user`` and
port ``pa``, and no password at all. So the password is everything between the first ``:``
after ``//`` and the *last* ``@``; a URL with an ``@`` in its query loses more than its
password, which is the side to err on.

Example:
    >>> redact_url("redis://app:s3cret@cache.internal:6379/0?password=x&ssl=true")
    'redis://app:***@cache.internal:6379/0?password=***&ssl=true'
    >>> redact("Port could not be cast to integer value as 'pa'", "redis://u:pa#ss@host")
    "Port could not be cast to integer value as '***'"
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

__all__ = ("REDACTED", "redact", "redact_url")

REDACTED: Final = "***"

#: Query parameters whose value is a secret (redis-py passes ``?password=`` to the connection).
_SECRET_PARAMETER: Final = re.compile(r"pass|secret|token|credential", re.IGNORECASE)
#: Where a parser may cut a malformed password into host, port, path and query.
_URL_PUNCTUATION: Final = re.compile(r"[/?#@:,]")
#: A piece shorter than this is replaced only where quoted: a secret of two letters must not
#: blank out those letters throughout a message.
_SHORTEST_BARE: Final = 4


def _split(url: str) -> tuple[str, str, str, str]:
    """
    ``url`` as (everything up to ``//``, the user with its ``:`` if a password follows, the
    password, ``@`` and the rest): ``"redis://u:p@h/0"`` is ``("redis://", "u:", "p", "@h/0")``.
    """
    prefix, slashes, rest = url.partition("//")
    if not slashes:
        prefix, rest = "", url
    else:
        prefix += slashes
    userinfo, at, location = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return prefix, user + colon, password, at + location


def redact_url(url: str) -> str:
    """
    ``url`` with its password and secret query values replaced by ``***`` (a user name is
    kept: it says which ACL user, and is no secret). Never raises, whatever the text.
    """
    prefix, user, _, location = _split(url)
    path, question, query = location.partition("?")
    if question:
        query = "&".join(_redact_parameter(pair) for pair in query.split("&"))
    password = REDACTED if user.endswith(":") else ""
    return f"{prefix}{user}{password}{path}{question}{query}"


def _redact_parameter(pair: str) -> str:
    name, equals, value = pair.partition("=")
    if equals and value and _SECRET_PARAMETER.search(name):
        return f"{name}={REDACTED}"
    return pair


def _secrets(url: str) -> set[str]:
    """The secrets of ``url``, each as written and percent-decoded, and the pieces of each."""
    _, _, password, location = _split(url)
    found = {password} if password else set()
    _, _, query = location.partition("?")
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if value and _SECRET_PARAMETER.search(name):
            found.add(value)
    for secret in list(found):
        found.add(unquote(secret))
        found.update(_URL_PUNCTUATION.split(secret))
    found.discard("")
    return found


def redact(text: str, url: str) -> str:
    """
    ``text`` with every secret of ``url`` replaced by ``***``: the password and secret query
    values as written and percent-decoded, and each piece of them a parser may have taken for
    a host or a port (pieces shorter than four characters only where quoted).
    """
    for secret in sorted(_secrets(url), key=len, reverse=True):
        if len(secret) >= _SHORTEST_BARE:
            text = text.replace(secret, REDACTED)
        else:
            for quote in ("'", '"'):
                text = text.replace(f"{quote}{secret}{quote}", f"{quote}{REDACTED}{quote}")
    return text
