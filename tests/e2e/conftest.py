from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Gateway, start_gateway, wait_until


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One shared gateway with 2 real llama.cpp replicas for the non-destructive tests."""
    gw = start_gateway(tmp_path_factory.mktemp("gw"))
    wait_until(lambda: "Admin key" in gw.keys, 10, what="bootstrap keys on stdout")
    yield gw
    gw.stop()


@pytest.fixture
def fresh_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of its own, for tests that kill or stop things."""
    gw = start_gateway(tmp_path)
    wait_until(lambda: "Admin key" in gw.keys, 10, what="bootstrap keys on stdout")
    yield gw
    gw.stop(timeout_s=60)
