"""
What a Cache needs of its Redis user: the one list behind ``aiocacheguard acl`` (the
``ACL SETUSER`` line), the Cache's start-up check and ``aiocacheguard doctor`` (both with
``ACL DRYRUN``, Redis 7+).

Least privilege for a namespace ``NS``: keys ``~{NS:*``, channels ``&{NS:*``, and the commands
of `NEEDS` for the features in use. Redis 7 checks the ACL of the commands a Lua script calls
too, so SET, DEL, PUBLISH, PTTL and PEXPIRE are needed although the Cache only sends them from
its scripts (EVALSHA).

Guarantees:
    - `setuser` grants exactly `NEEDS` (of the features asked for) on the namespace's keys
      and channels; `missing` asks Redis about the same list, so the two cannot drift apart.
    - `missing` only asks (ACL DRYRUN runs nothing); it answers None where it cannot ask
      (Redis < 7, a user not allowed ACL DRYRUN, Redis unreachable), never raises.

Limitations:
    - ``client|tracking`` cannot be limited to a key pattern: a user allowed it can track
      the prefix ``""`` and learn the names of every key written, other namespaces' too.
      ``scan`` (for ``clear()``) lists every key name of the database. Both are opt-in
      (``local``, ``clear``).
    - On a Redis Cluster each node has its own ACL; every primary is asked.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from .backend import RedisClient, budgeted, is_cluster
from .bulk import nodes_of
from .errors import AuthenticationError, BackendError, CacheGuardError, ConfigurationError
from .keys import KeySpace

__all__ = (
    "NEEDS",
    "PASSWORD_PLACEHOLDER",
    "Feature",
    "Need",
    "check",
    "command_line",
    "grants",
    "missing",
    "setuser",
    "user_of",
)

Feature = Literal["cache", "local", "bloom", "clear"]

#: What the printed line says in place of a password, for the operator to replace.
PASSWORD_PLACEHOLDER: Final = "<password>"  # noqa: S105 - a placeholder, no password

#: The channel Redis announces invalidations on (the L1's tracking connection subscribes it).
INVALIDATION_CHANNEL: Final = "__redis__:invalidate"


@dataclass(frozen=True, slots=True)
class Need:
    """
    One command a Cache sends (or its scripts call), for one feature.

    Attributes:
        command: Its name as ACL rules spell it (``"script|load"``).
        feature: What needs it: every Cache, the L1 (``local``), the Bloom filter, ``clear()``.
        probe: A typical call, for ``ACL DRYRUN``: ``{key}``, ``{lock}``, ``{channel}``,
            ``{bloom}`` and ``{prefix}`` stand for the namespace's names.
        why: What it is used for.
    """

    command: str
    feature: Feature
    probe: tuple[str, ...]
    why: str


_SHA: Final = "0" * 40  # any script id: ACL DRYRUN checks the command and its keys only

#: Everything a Cache may send, by feature. Checked against the code by the contract suite,
#: which runs as a user granted exactly this (tests/test_contract.py, "least-privilege").
NEEDS: Final = (
    Need("get", "cache", ("GET", "{key}"), "read a value"),
    Need("getrange", "cache", ("GETRANGE", "{key}", "0", "1"), "read one, up to max_value_bytes"),
    Need("strlen", "cache", ("STRLEN", "{key}"), "check its length first (in a script)"),
    Need("mget", "cache", ("MGET", "{key}", "{lock}"), "read values in batches"),
    Need("evalsha", "cache", ("EVALSHA", _SHA, "2", "{key}", "{lock}"), "run the scripts"),
    Need("script|load", "cache", ("SCRIPT", "LOAD", "return 1"), "load them (NOSCRIPT)"),
    Need("set", "cache", ("SET", "{key}", "v", "PX", "1"), "write a value, take the lock"),
    Need("del", "cache", ("DEL", "{lock}"), "release the lock (in a script)"),
    Need("unlink", "cache", ("UNLINK", "{key}"), "delete(), clear()"),
    Need("publish", "cache", ("PUBLISH", "{channel}", ""), "announce a fill (in a script)"),
    Need("pttl", "cache", ("PTTL", "{lock}"), "read a holder's lease (in a script)"),
    Need("pexpire", "cache", ("PEXPIRE", "{lock}", "1"), "renew the lease (in a script)"),
    Need("subscribe", "cache", ("SUBSCRIBE", "{channel}"), "wait for a fill"),
    Need("unsubscribe", "cache", ("UNSUBSCRIBE", "{channel}"), "stop waiting"),
    Need("client|id", "local", ("CLIENT", "ID"), "the L1's tracking connection"),
    Need(
        "client|tracking",
        "local",
        ("CLIENT", "TRACKING", "ON", "REDIRECT", "1", "BCAST", "PREFIX", "{prefix}"),
        "hear of every write to the namespace",
    ),
    Need("ping", "local", ("PING",), "the listener's health check"),
    Need(
        "subscribe",
        "local",
        ("SUBSCRIBE", INVALIDATION_CHANNEL),
        "receive invalidations",
    ),
    Need("exists", "bloom", ("EXISTS", "{bloom}"), "is the filter there"),
    Need("getbit", "bloom", ("GETBIT", "{bloom}", "0"), "ask the filter"),
    Need("setbit", "bloom", ("SETBIT", "{bloom}", "0", "1"), "add to the filter"),
    Need("rename", "bloom", ("RENAME", "{bloom}:rebuild", "{bloom}"), "swap in a rebuilt one"),
    Need("scan", "clear", ("SCAN", "0", "MATCH", "{prefix}*"), "clear(): find the keys"),
)


def _features(*, local: bool, bloom: bool, clear: bool) -> set[Feature]:
    wanted: dict[Feature, bool] = {"cache": True, "local": local, "bloom": bloom, "clear": clear}
    return {feature for feature, on in wanted.items() if on}


def grants(
    namespace: str, *, local: bool = False, bloom: bool = False, clear: bool = False
) -> list[str]:
    """
    The ACL rules a Cache of ``namespace`` needs: key and channel patterns, then commands.

    Raises:
        ConfigurationError: the namespace is not one a Cache accepts.

    Example:
        >>> " ".join(grants("shop"))
        '~{shop:* &{shop:* +get +getrange +strlen +mget +evalsha +script|load +set +del +unlink +publish +pttl +pexpire +subscribe +unsubscribe'
    """  # noqa: E501
    prefix = KeySpace(namespace).prefix.decode()
    features = _features(local=local, bloom=bloom, clear=clear)
    rules = [f"~{prefix}*", f"&{prefix}*"]
    if local:
        rules.append(f"&{INVALIDATION_CHANNEL}")
    commands = dict.fromkeys(f"+{need.command}" for need in NEEDS if need.feature in features)
    return rules + list(commands)


def setuser(
    namespace: str,
    *,
    user: str | None = None,
    password: str = PASSWORD_PLACEHOLDER,
    local: bool = False,
    bloom: bool = False,
    clear: bool = False,
) -> list[str]:
    """
    The arguments of the ``ACL SETUSER`` command that makes (or remakes: ``reset`` first)
    ``user`` (default ``cache-<namespace>``) a least-privileged user of one namespace.

    Raises:
        ConfigurationError: the namespace or user name cannot be used.
    """
    rules = grants(namespace, local=local, bloom=bloom, clear=clear)  # checks the namespace
    user = f"cache-{namespace}" if user is None else user
    if not user or any(c.isspace() or c in "\"'" for c in user):
        raise ConfigurationError("user", user, "a user name without spaces or quotes")
    # `resetchannels` too: Redis 6.2's `reset` keeps the server's default of every channel
    # (acl-pubsub-default allchannels), after which a channel pattern is an error.
    return ["ACL", "SETUSER", user, "reset", "resetchannels", "on", f">{password}", *rules]


def command_line(arguments: Sequence[str]) -> str:
    """Arguments as one line for redis-cli (quoted where needed)."""
    return " ".join(shlex.quote(argument) for argument in arguments)


#: How ACL DRYRUN words a refusal: of the command, of a key, of a channel.
_COMMAND = re.compile(r"permissions to run the '([^']+)' command", re.IGNORECASE)
_KEY = re.compile(r"permissions to access the '.*' key", re.IGNORECASE | re.DOTALL)
_CHANNEL = re.compile(r"permissions to access the '(.*)' channel", re.IGNORECASE | re.DOTALL)


async def missing(
    run_all: Callable[[list[tuple[str, ...]]], Awaitable[Sequence[Any]]],
    user: str,
    namespace: str,
    *,
    local: bool = False,
    bloom: bool = False,
    clear: bool = False,
) -> list[str] | None:
    """
    The rules ``user`` lacks of what a Cache of ``namespace`` needs (`grants` spelling:
    ``"+evalsha"``, ``"~{shop:*"``), asked with ``ACL DRYRUN``; ``[]`` when nothing lacks;
    None when Redis cannot be asked (Redis < 7, ACL DRYRUN refused, Redis failed).

    Raises:
        AuthenticationError: Redis refused the client's credentials.

    Args:
        run_all: Sends commands (on one node) and returns their replies, an exception in
            place of each that failed.
    """
    space = KeySpace(namespace)
    key = space.value("k").decode()
    names = {
        "key": key,
        "lock": KeySpace.lock(key.encode()).decode(),
        "channel": KeySpace.channel(key.encode()).decode(),
        "bloom": space.prefix.decode() + "filter}:bloom",
        "prefix": space.prefix.decode(),
    }
    features = _features(local=local, bloom=bloom, clear=clear)
    needs = [need for need in NEEDS if need.feature in features]
    commands = [
        ("ACL", "DRYRUN", user, *(part.format_map(names) for part in need.probe)) for need in needs
    ]
    try:
        # One first: a user not allowed ACL DRYRUN is refused once (Redis logs each refusal
        # in ACL LOG), not once per command.
        replies = list(await run_all(commands[:1]))
        if not isinstance(replies[0], BaseException):
            replies += await run_all(commands[1:])
    except AuthenticationError:
        raise  # said by the caller: the user cannot log in at all
    except CacheGuardError:
        return None
    lacking: dict[str, None] = {}
    for need, reply in zip(needs, replies, strict=False):
        if isinstance(reply, BaseException):
            return None  # ACL DRYRUN itself refused or unknown: nothing can be said
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        if text == "OK":
            continue
        if _COMMAND.search(text):
            lacking[f"+{need.command}"] = None
        elif (channel := _CHANNEL.search(text)) is not None:
            lacking[f"&{space.prefix.decode()}*" if channel.group(1) != INVALIDATION_CHANNEL
                    else f"&{INVALIDATION_CHANNEL}"] = None  # fmt: skip
        elif _KEY.search(text):
            lacking[f"~{space.prefix.decode()}*"] = None
        else:
            lacking[f"+{need.command} ({text})"] = None
    return list(lacking)


def user_of(client: RedisClient) -> str | None:
    """
    The ACL user ``client`` logs in as: its ``username``, ``"default"`` without one; None
    where a credential provider decides (it is not asked here).
    """
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if kwargs is None and is_cluster(client):
        kwargs = client.nodes_manager.connection_kwargs
    kwargs = kwargs or {}
    if kwargs.get("credential_provider") is not None:
        return None
    return str(kwargs.get("username") or "default")


async def check(
    client: RedisClient,
    namespace: str,
    *,
    user: str | None = None,
    local: bool = False,
    bloom: bool = False,
    clear: bool = False,
    budget: float,
) -> dict[str, list[str]] | None:
    """
    What `missing` says, per primary (``host:port``): every primary of a cluster (each has
    its own ACL), one for a single Redis. None where it cannot be asked (see `missing`).
    ``user`` defaults to the client's own (`user_of`).

    Raises:
        AuthenticationError: Redis refused the client's credentials.
    """
    user = user_of(client) if user is None else user
    if user is None:
        return None
    try:
        nodes = await nodes_of(client, budget)
    except AuthenticationError:
        raise
    except BackendError:
        return None
    found: dict[str, list[str]] = {}
    for node in nodes:

        async def run_all(commands: list[tuple[str, ...]], run: Any = node.run) -> Sequence[Any]:
            if is_cluster(client):
                calls = (run(*command) for command in commands)
                return await budgeted(asyncio.gather(*calls, return_exceptions=True), budget)
            if getattr(client, "single_connection_client", False):  # (a pipeline: a second)
                return await budgeted(_one_by_one(run, commands), budget)
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await budgeted(pipe.execute(raise_on_error=False), budget))

        lacking = await missing(run_all, user, namespace, local=local, bloom=bloom, clear=clear)
        if lacking is None:
            return None
        found[node.name] = lacking
    return found


async def _one_by_one(
    run: Callable[..., Awaitable[Any]], commands: list[tuple[str, ...]]
) -> list[Any]:
    replies: list[Any] = []
    for command in commands:
        try:
            replies.append(await run(*command))
        except Exception as exc:  # in place, as a pipeline returns it
            replies.append(exc)
    return replies
