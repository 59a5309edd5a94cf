"""Suite-wide hooks and fixtures: the parallel schedule, the root requirement of the real-host modules, a private nginx."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.nginx import PrivateNginx


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_root(why): the module creates users, namespaces or runs the tools as root")
    if config.pluginmanager.hasplugin("xdist"):  # `make test` runs in parallel: tests/support/parallel.py
        from tests.support import parallel

        parallel.register(config)


@pytest.fixture(scope="module", autouse=True)
def _needs_root(request: pytest.FixtureRequest) -> None:
    """Fail, never skip: CI runs as root, and a silently skipped module would prove nothing.

    Module-scoped and autouse, so it runs before the module's own (slow) host fixtures."""
    marker = request.node.get_closest_marker("needs_root")
    if marker is not None and os.geteuid() != 0:
        why = marker.args[0] if marker.args else "it runs the tools as root"
        pytest.fail(f"{request.node.name} needs root ({why}): sudo make test")


@pytest.fixture
def nginx() -> Iterator[PrivateNginx]:
    """A private nginx prefix (not started) for `nginx -t` and real requests to rendered sites."""
    n = PrivateNginx(autostart=False)
    try:
        yield n
    finally:
        n.stop()
