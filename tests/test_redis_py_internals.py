"""
The redis-py internals the library leans on, each checked by name and signature.

aiocacheguard drives redis-py below its documented API in a few places, each for a reason
given where it is used (aiocacheguard/backend.py, near.py, bulk.py): the Cluster read path
sends its own per-node pipelines so that one dead primary does not fail the others' reads,
the lone GET takes its connection from the pool itself, the L1's tracking connection is a
bare connection built from the pool's settings, and a failed node asks the cluster client
to read its slot map again. A redis-py release that renames or reshapes any of these breaks
the library quietly (an AttributeError on a rare path, a slot map never re-read), so this
module fails loudly instead, naming what changed. pyproject.toml bounds redis-py to the
range these checks and the suite have passed on; the nox matrix runs them on the declared
floor and on the newest release the index serves.
"""

from __future__ import annotations

import inspect
from importlib.metadata import requires, version
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, NodesManager, PipelineCommand, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry

from aiocacheguard.testing import RedisServer


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_redis_py_is_in_the_declared_range() -> None:
    from packaging.requirements import Requirement

    (declared,) = [
        r for r in map(Requirement, requires("aiocacheguard") or []) if r.name == "redis"
    ]
    assert declared.specifier.contains(version("redis")), (
        f"redis-py {version('redis')} is outside the range aiocacheguard declares "
        f"({declared.specifier}): the checks below were written for that range"
    )


def test_cluster_pipeline_command_keeps_its_shape() -> None:
    # `_read_cluster` builds these itself: position first, then the command's arguments,
    # and reads back `.result` once the node's pipeline ran.
    command = PipelineCommand(7, "GET", b"k")
    assert command.position == 7
    assert command.args == ("GET", b"k")
    assert hasattr(command, "result")


def test_cluster_node_runs_a_pipeline_of_commands() -> None:
    assert inspect.iscoroutinefunction(ClusterNode.execute_pipeline)
    assert parameters(ClusterNode.execute_pipeline)[:2] == ["self", "commands"]


def test_cluster_client_slot_map_internals() -> None:
    # A failed node marks the client to read the map again before its next command.
    assert "_initialize" in inspect.getsource(RedisCluster.__init__)
    assert inspect.iscoroutinefunction(RedisCluster.initialize)
    assert "last_failed_node_name" in parameters(RedisCluster.initialize) or (
        "last_failed_node_name" in inspect.getsource(RedisCluster.initialize)
    )
    assert parameters(NodesManager.get_node_from_slot)[:2] == ["self", "slot"]
    assert parameters(NodesManager.move_node_to_end_of_cached_nodes)[:2] == ["self", "node_name"]
    assert inspect.iscoroutinefunction(NodesManager.initialize)
    assert "default_node" in inspect.getsource(NodesManager.__init__)
    assert callable(RedisCluster.keyslot)
    assert callable(RedisCluster.get_primaries)
    assert hasattr(RedisCluster, "pubsub"), "the fill notifications subscribe through it"


def test_a_cluster_node_carries_what_a_bare_connection_needs() -> None:
    node = ClusterNode("127.0.0.1", 7000)
    assert issubclass(node.connection_class, AbstractConnection)
    assert isinstance(node.connection_kwargs, dict)
    assert node.name == "127.0.0.1:7000"


def test_standalone_client_and_pool_internals() -> None:
    client = aioredis.Redis()
    pool = client.connection_pool
    assert isinstance(pool, ConnectionPool)
    assert client.single_connection_client is False
    assert issubclass(pool.connection_class, AbstractConnection)
    assert isinstance(pool.connection_kwargs, dict)
    # The lone GET is redis-py's own `execute_command` done by hand: it recognises that
    # function by where it is defined, so instrumentation that replaces it is noticed.
    execute = aioredis.Redis.execute_command
    assert execute.__module__ == "redis.asyncio.client"
    assert execute.__qualname__ == "Redis.execute_command"
    assert inspect.iscoroutinefunction(pool.get_connection)
    assert inspect.iscoroutinefunction(pool.release)


def test_connection_methods_the_library_calls() -> None:
    for name in ("connect", "send_packed_command", "send_command", "read_response", "disconnect"):
        assert inspect.iscoroutinefunction(getattr(AbstractConnection, name)), name
    assert callable(AbstractConnection.pack_command)
    assert "timeout" in parameters(AbstractConnection.read_response)
    assert "nowait" in parameters(AbstractConnection.disconnect)
    assert inspect.iscoroutinefunction(Retry.call_with_retry)


def test_observability_hook_is_where_the_lone_get_looks() -> None:
    from redis.observability.providers import get_observability_instance

    assert callable(get_observability_instance().get_provider_manager)


async def test_pipeline_command_round_trip_on_a_real_node(redis_server: RedisServer) -> None:
    """What `_read_cluster` does, against a real server through a `ClusterNode`."""
    await (raw := aioredis.Redis(port=redis_server.port)).set(b"internals:k", b"v")
    node = ClusterNode("127.0.0.1", redis_server.port)
    commands = [PipelineCommand(0, "GET", b"internals:k"), PipelineCommand(1, "GET", b"nope")]
    try:
        await node.execute_pipeline(commands)
    finally:
        await node.disconnect()
        await raw.delete(b"internals:k")
        await raw.aclose()
    assert [c.result for c in commands] == [b"v", None]


@pytest.mark.parametrize("name", ["ConnectionError", "TimeoutError", "NoScriptError"])
def test_error_classes_the_seam_maps(name: str) -> None:
    assert issubclass(getattr(redis.exceptions, name), Exception)
