"""What the operator's functions share: decoding replies, pipelining keyed commands."""

from __future__ import annotations

from typing import Any, Final

from ..backend import RedisClient, budgeted, is_cluster
from ..bulk import COMMAND_TIMEOUT

#: Serializer tags of the built-in serializers (`aiocacheguard.serializers`), by name.
SERIALIZERS: Final = {1: "json", 2: "msgpack", 3: "pickle", 4: "msgspec-json", 5: "msgspec-msgpack"}
#: Commands per pipeline when many keys are looked at.
PIPELINE: Final = 500


def text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def pipelined(
    client: RedisClient, commands: list[tuple[Any, ...]], *, budget: float = COMMAND_TIMEOUT
) -> list[Any]:
    """Replies of keyed commands, `PIPELINE` at a time (per slot on a cluster); errors in place."""
    replies: list[Any] = []
    for start in range(0, len(commands), PIPELINE):
        pipe = client.pipeline() if is_cluster(client) else client.pipeline(transaction=False)
        for command in commands[start : start + PIPELINE]:
            pipe.execute_command(*command)
        replies += await budgeted(pipe.execute(raise_on_error=False), budget)
    return replies
