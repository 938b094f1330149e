"""examples/fastapi_app.py through FastAPI's test client, against the session's redis-server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from aiocacheguard import CacheNotBoundError
from aiocacheguard.testing import RedisServer

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
import fastapi_app


@pytest.fixture
def example(
    redis_server: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    """The example app on the throwaway server, with a fresh database and its own namespace."""
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("CACHE_NAMESPACE", namespace)
    monkeypatch.setattr(fastapi_app, "database", fastapi_app.Database())
    yield fastapi_app
    assert not fastapi_app.cache_ref.bound, "the lifespan left its Cache bound"


def test_a_second_request_is_served_from_the_cache(example: ModuleType) -> None:
    with TestClient(example.app) as http:
        first = http.get("/users/7")
        assert first.status_code == 200
        assert first.json() == {"id": 7, "name": "user 7", "score": 70}
        assert http.get("/users/7").json() == first.json()
        stats = http.get("/stats").json()
        assert stats["database_queries"] == 1
        assert (stats["loader_calls"], stats["hits"]) == (1, 1)


def test_absent_users_are_cached_as_absent(example: ModuleType) -> None:
    with TestClient(example.app) as http:
        assert [http.get("/users/1000").status_code for _ in range(3)] == [404] * 3
        stats = http.get("/stats").json()
        assert (stats["database_queries"], stats["negative_hits"]) == (1, 2)


def test_a_write_invalidates_what_it_changed(example: ModuleType) -> None:
    with TestClient(example.app) as http:
        assert http.get("/users/100").json()["name"] == "user 100"
        assert http.get("/leaderboard").json()[0] == {"id": 100, "name": "user 100"}
        renamed = http.put("/users/100", json={"name": "Ada"})
        assert renamed.status_code == 200
        assert http.get("/users/100").json()["name"] == "Ada"
        assert http.get("/leaderboard").json()[0] == {"id": 100, "name": "Ada"}
        # Two loads each (before and after the write) and the write itself.
        assert http.get("/stats").json()["database_queries"] == 5
        assert http.put("/users/1000", json={"name": "nobody"}).status_code == 404


def test_the_lifespan_runs_twice_with_a_new_cache_each_time(example: ModuleType) -> None:
    with TestClient(example.app) as http:
        assert http.get("/users/3").status_code == 200
        first_cache = example.cache_ref.cache
    assert not example.cache_ref.bound
    with TestClient(example.app) as http:
        assert example.cache_ref.cache is not first_cache
        assert http.get("/users/3").json()["name"] == "user 3"  # in Redis since the first run
        stats = http.get("/stats").json()
        assert (stats["hits"], stats["loader_calls"], stats["database_queries"]) == (1, 0, 1)
        assert http.put("/users/3", json={"name": "Grace"}).status_code == 200
        assert http.get("/users/3").json()["name"] == "Grace"


def test_without_the_lifespan_a_loader_says_how_to_bind(example: ModuleType) -> None:
    http = TestClient(example.app)  # not entered: the lifespan does not run
    with pytest.raises(CacheNotBoundError, match=r"fastapi_app\.get_user .*cache_ref\.bind"):
        http.get("/users/1")
    with pytest.raises(CacheNotBoundError, match="bind"):
        http.get("/stats")
