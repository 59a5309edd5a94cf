"""The pre-flight contract (issue 11 §5): COGNIVERN_PREFLIGHT=1, AGENTS_ENABLED=false, no agent.

Pre-flight boots the new code with the production .env against the live shared/data while the old
release serves. It must never start the agent: with agentsEnabled=true (AGENTS_ENABLED=true in
.env), the pre-flight boot sees AGENTS_ENABLED=false and COGNIVERN_PREFLIGHT=1 (the fixture app
logs what it sees, into the pre-flight log), no agent process ever runs from the release under
pre-flight, and the running agent is left alone when that release is refused.
Run as root: venv/bin/pytest tests/test_preflight_contract.py
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.hardened_host import HardenedHost, hardened_host

AGENT = "forecasting-agent"


pytestmark = pytest.mark.needs_root("it runs the release tool as root")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedHost]:
    with hardened_host(tmp_path_factory.mktemp("preflight"), agentsEnabled=True) as h:
        for rid, mode in (("r1", "ok"), ("r2", "ok"), ("pm2-only-crash", "crash-under-pm2")):
            assert h.install(rid, mode).returncode == 0
        h.ok("activate", "r1")
        yield h


def _agent(host: HardenedHost) -> tuple[int, int]:
    """(pid, restarts) of the agent in the app's PM2."""
    out = host.as_app("env", f"PM2_HOME=/home/{host.user}/.pm2", "pm2", "jlist").stdout
    (agent,) = [p for p in json.loads(out) if p["name"] == AGENT]
    return int(agent["pid"]), int(agent["pm2_env"]["restart_time"])


def _agents_running_from(release_dir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "AutomatedForecastingService" in line and str(release_dir) in line] + [
        f"{pid} cwd" for pid in _pids_with_cwd(release_dir)
    ]


def _pids_with_cwd(release_dir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"AutomatedForecastingService" in cmdline and os.readlink(proc / "cwd").startswith(str(release_dir)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _processes_in(release_dir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "cwd") == str(release_dir):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_the_preflight_boot_sees_the_contract(host: HardenedHost) -> None:
    log = (host.root / ".deploy" / "preflight" / "r1.log").read_text()
    assert "fixture r1: pre-flight boot, AGENTS_ENABLED=false" in log, log
    env_file = (host.root / "shared" / ".env").read_text()
    assert "AGENTS_ENABLED=true" in env_file.replace("'", "")
    body = httpx.get(f"http://127.0.0.1:{host.settings.port}/release", timeout=5).json()
    assert body["env"]["AGENTS_ENABLED"] == "true", "the live app gets the .env value; only pre-flight is forced off"


def test_a_refused_release_never_starts_the_agent_and_leaves_the_running_one_alone(host: HardenedHost) -> None:
    release_dir = (host.root / "releases" / "pm2-only-crash").resolve()
    before = _agent(host)
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(_agents_running_from(release_dir))
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = host.tool("activate", "pm2-only-crash")
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 1 and "pre-flight of pm2-only-crash failed" in result.stderr, result.stderr
    assert seen == []
    # PM2 can restart a crashing app while `pm2 delete` runs: nothing of the pre-flight may outlive the tool.
    left = []
    for _ in range(20):
        left += _processes_in(release_dir)
        time.sleep(0.05)
    assert left == []
    assert _agent(host) == before
    assert "forecasting-agent" not in (host.root / ".deploy" / "preflight" / "pm2-only-crash.log").read_text()


def test_an_activation_moves_the_agent_only_after_the_switch(host: HardenedHost) -> None:
    target = "r2" if host.current() == "r1" else "r1"
    result = host.ok("activate", target)
    log = (host.root / ".deploy" / "preflight" / f"{target}.log").read_text()
    assert f"fixture {target}: pre-flight boot, AGENTS_ENABLED=false" in log or "pre-flight: skipped" in result.stderr
    pid, _ = _agent(host)
    assert os.readlink(f"/proc/{pid}/cwd") == str((host.root / "releases" / target).resolve())
