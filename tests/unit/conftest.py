"""Unit tests run without servers (`make test-unit`, the fast inner loop): a unit test that
asks for one fails here, loudly, instead of quietly making the loop slow."""

from __future__ import annotations

import pytest


def _no_server(request: pytest.FixtureRequest) -> None:
    pytest.fail(
        f"{request.node.nodeid} asks for the server fixture {request.fixturename!r}: "
        "unit tests run without servers; move it to tests/integration"
    )


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> None:
    _no_server(request)


@pytest.fixture
def influxdb(request: pytest.FixtureRequest) -> None:
    _no_server(request)


@pytest.fixture
def victoria(request: pytest.FixtureRequest) -> None:
    _no_server(request)
