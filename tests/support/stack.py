"""A stack deployed by the real engine (tests/support/real_engine.py), its config evolving like `pulumi config set`.

Shared by the deploy scenarios (one TargetHost), the several-servers test (NetnsHosts behind a
balancer) and bench/engine_bench.py: each subclass adds views of its own hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.settings import SECRET_KEYS
from tests.support.real_engine import RealEngine, RunReport
from tests.support.release_host import build_release_tarball

# Fixture-friendly PM2 and health timings: the fixture app signals `ready` and shuts down in ms.
FIXTURE_SETTINGS: dict[str, Any] = {"waitReady": True, "healthTimeout": 10, "listenTimeoutMs": 4000, "killTimeoutMs": 3000}


class DeployStack:
    def __init__(self, host_config: Callable[..., dict[str, str]], tmp: Path, **settings: Any) -> None:
        """`host_config(**settings)` turns the stack's settings into config pointing at the test host(s)."""
        self.host_config = host_config
        self.tmp = tmp
        self.engine = RealEngine(tmp / "engine")
        self.settings: dict[str, Any] = {**FIXTURE_SETTINGS, **settings}

    def artifact(self, release: str, mode: str = "ok", **fixture: object) -> str:
        """The fixture app as `cognivern-<release>.tar.gz` with its .sha256, as scripts/build-artifact leaves it."""
        path, sha = build_release_tarball(self.tmp / "artifacts", release, mode, **fixture)
        path.with_name(path.name + ".sha256").write_text(f"{sha}  {path.name}\n")
        return str(path)

    def config(self, **changes: Any) -> dict[str, str]:
        """The stack config after `changes` (kept for later runs, like `pulumi config set`; None removes)."""
        self.settings.update(changes)
        return self.host_config(**{k: v for k, v in self.settings.items() if v is not None})

    def up(self, *, check: bool = True, **changes: Any) -> RunReport:
        return readable(self.engine.up(self.config(**changes), secret_keys=SECRET_KEYS, check=check))

    def preview(self, **changes: Any) -> RunReport:
        """`pulumi preview --diff` of the config after `changes` (kept, like a `config set` before a preview)."""
        return readable(self.engine.preview(self.config(**changes), secret_keys=SECRET_KEYS))


def readable(report: RunReport) -> RunReport:
    """Every run, passed or failed, reads as the engine's and the tool's messages: no Python traceback."""
    assert "Traceback (most recent call last)" not in report.output and "KeyboardInterrupt" not in report.output, report.output
    return report
