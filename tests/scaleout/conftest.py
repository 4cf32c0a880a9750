"""Fixtures of the fleet tests: a PostgreSQL database and a Redis namespace of the test's own,
and `start_fleet`, which starts N proxies behind HAProxy on them (tests/fleet.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import pg
from tests.fleet import Fleet, fleet_config

REDIS_URL = "redis://127.0.0.1:6379/11"
"""The machine's Redis; each test keeps to a namespace of its own in this db."""


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from pg.database()


@pytest.fixture
def redis_namespace() -> Iterator[str]:
    namespace = f"mrfleet-{uuid.uuid4().hex[:8]}"
    yield namespace
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def start_fleet(
    confdir: Path, tmp_path: Path, pg_url: str, redis_namespace: str
) -> Iterator[Callable[..., Fleet]]:
    """`start_fleet(model_list, size=3, router_settings=None, **general_settings)`: `size`
    proxies on one config whose ledger is this test's database and whose Redis is this test's
    namespace, behind HAProxy. Every fleet is stopped afterwards (before the namespace is
    cleaned)."""
    started: list[Fleet] = []

    def start(
        model_list: list[dict[str, Any]],
        size: int = 3,
        router_settings: dict[str, Any] | None = None,
        **general: Any,
    ) -> Fleet:
        config = fleet_config(
            model_list,
            database_url=pg_url,
            data_path=tmp_path / "spend-data",
            redis_url=REDIS_URL,
            redis_namespace=redis_namespace,
            router_settings=router_settings,
            **general,
        )
        fleet = Fleet(config, size, confdir, tmp_path / f"fleet{len(started)}")
        started.append(fleet)
        return fleet.start()

    yield start
    for fleet in started:
        fleet.stop()
