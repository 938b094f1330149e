"""
Model-based test (Hypothesis stateful): random sequences of cache operations against a real
Redis, compared with a plain dict model of what must be visible. Rules can't be async, so the
machine drives its own event loop (Hypothesis issue #4107). One operation runs at a time here;
`test_model_interleaved.py` keeps loads in flight while writes, refreshes and a second Cache
race them.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import RedisServer

KEYS = st.sampled_from(["a", "b", "c", "ü", "x:y", "{tag}"])
VALUES = st.one_of(
    st.none(),
    st.integers(-(2**53), 2**53),
    st.text(max_size=20),
    st.lists(st.integers(0, 9), max_size=4),
    st.dictionaries(st.text(max_size=3), st.booleans(), max_size=3),
)
ABSENT = object()


def machine_for(port: int) -> type[RuleBasedStateMachine]:
    class CacheMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.client = redis.Redis(port=port)
            self.cache = Cache(
                self.client,
                namespace=f"model-{uuid.uuid4().hex[:8]}",
                policy=Policy(ttl=60.0, negative_ttl=60.0),
            )
            self.source: dict[str, Any] = {}  # the database behind the cache
            self.cached: dict[str, Any] = {}  # what the cache must answer (model)
            self.loads = 0

        def run(self, coroutine: Any) -> Any:
            return self.loop.run_until_complete(coroutine)

        @rule(key=KEYS, value=VALUES)
        def write_source(self, key: str, value: Any) -> None:
            self.source[key] = value  # the cache may now be stale, as in life

        @rule(key=KEYS, value=VALUES)
        def set(self, key: str, value: Any) -> None:
            self.run(self.cache.set(key, value))
            self.cached[key] = value

        @rule(key=KEYS)
        def delete(self, key: str) -> None:
            existed = self.run(self.cache.delete(key))
            assert existed == (key in self.cached)
            self.cached.pop(key, None)

        @rule(key=KEYS, concurrency=st.integers(1, 20))
        def get_or_load(self, key: str, concurrency: int) -> None:
            loads_before = self.loads

            async def load() -> Any:
                self.loads += 1
                await asyncio.sleep(0)
                return self.source.get(key)

            async def many() -> list[Any]:
                calls = [self.cache.get_or_load(key, load) for _ in range(concurrency)]
                return await asyncio.gather(*calls)

            results = self.run(many())
            expected = self.cached.get(key, ABSENT)
            if expected is ABSENT:
                expected = self.source.get(key)
                assert self.loads == loads_before + 1  # one load for all the callers
                self.cached[key] = expected
            else:
                assert self.loads == loads_before  # cached, None included: no load
            assert results == [expected] * concurrency

        @invariant()
        def get_agrees_with_the_model(self) -> None:
            for key, value in self.cached.items():
                assert self.run(self.cache.get(key, default=ABSENT)) == value

        def teardown(self) -> None:
            self.run(self.cache.aclose())
            self.run(self.client.aclose())
            self.loop.close()

    return CacheMachine


@pytest.mark.slow
def test_cache_behaves_like_its_model(redis_server: RedisServer) -> None:
    machine = machine_for(redis_server.port)
    machine.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=25,
        deadline=None,
        derandomize=True,  # the same examples on every run: no flaky CI
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine.TestCase().runTest()
