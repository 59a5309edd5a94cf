"""The start contract (issue 11 §5, blue/green since issue 14): the agent runs once, only on a proven release.

The new release starts for real in the idle slot with the production .env against the live
shared/data while the old slot serves (this start replaced issue 11's throwaway pre-flight, and
COGNIVERN_PREFLIGHT is no longer set). With agentsEnabled=true: no agent process ever runs from a
release that is starting or baking, the running agent is left alone when that release is refused
or fails its bake, and it moves (deleted, then started on the new release) only after the bake:
never two agents at once.
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

import pytest

from tests.support.hardened_host import HardenedHost, hardened_host
from tests.support.helpers import http_get, user_pids

AGENT = "forecasting-agent"


pytestmark = pytest.mark.needs_root("it runs the release tool as root")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedHost]:
    # a 4 s bake: "late" (crashes 2.5 s after it listens) always fails inside it
    with hardened_host(tmp_path_factory.mktemp("preflight"), agentsEnabled=True, bakeSeconds=4) as h:
        for rid, mode in (("r1", "ok"), ("r2", "ok"), ("pm2-only-crash", "crash-under-pm2")):
            assert h.install(rid, mode).returncode == 0
        assert h.install("late", "crash-after", delayMs=2500).returncode == 0
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


def _agent_cwds(host: HardenedHost) -> list[str]:
    """Working directories of the agent's processes (there must never be two). Read from /proc, not
    from `pm2 jlist`: sampled every 50 ms through an activation, the CLI kept a core busy. PM2 names
    the app in each process's environment: `name=` in fork mode, `pm2_env={"name":...` in cluster mode."""
    marks = (f"name={AGENT}".encode(), f'pm2_env={{"name":"{AGENT}",'.encode())
    cwds = []
    for pid in user_pids(host.user):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if any(entry == marks[0] or entry.startswith(marks[1]) for entry in environ):
                cwds.append(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue  # gone meanwhile
    return cwds


class AgentWatch:
    """Samples the agent processes every 50 ms while an activation runs."""

    def __init__(self, host: HardenedHost) -> None:
        self.host = host
        self.samples: list[list[str]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(_agent_cwds(self.host))
            self.done.wait(0.05)

    def __enter__(self) -> AgentWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def test_every_slot_gets_the_production_env_and_no_preflight_marker(host: HardenedHost) -> None:
    env_file = (host.root / "shared" / ".env").read_text()
    assert "AGENTS_ENABLED=true" in env_file.replace("'", "")
    body = http_get(host.url("/release"), timeout=5).json()
    assert body["env"]["AGENTS_ENABLED"] == "true", "the live slot gets the .env value"
    out = (host.root / "shared" / "logs" / "out.log").read_text()
    assert "pre-flight boot" not in out, "no throwaway pre-flight boot any more: the start in the idle slot is the real one"


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
    assert result.returncode == 1 and "did not start healthy in slot" in result.stderr, result.stderr
    assert seen == []
    # PM2 can restart a crashing app while `pm2 delete` runs: nothing of the refused slot may outlive the tool.
    left = []
    for _ in range(20):
        left += _processes_in(release_dir)
        time.sleep(0.05)
    assert left == []
    assert _agent(host) == before


def test_a_release_failing_its_bake_never_gets_the_agent(host: HardenedHost) -> None:
    if host.current() != "r1":
        host.ok("activate", "r1")
    before = _agent(host)
    with AgentWatch(host) as watch:
        result = host.tool("activate", "--force", "late")
    assert result.returncode == 1 and "late failed its bake" in result.stderr, result.stderr
    late_dir = os.path.realpath(host.root / "releases" / "late")
    assert all(late_dir not in cwds for cwds in watch.samples), "the agent never ran from the baking release"
    assert _agent(host) == before and host.current() == "r1"


def test_an_activation_moves_the_agent_only_after_the_bake(host: HardenedHost) -> None:
    target = "r2" if host.current() == "r1" else "r1"
    old_dir = os.path.realpath(host.root / "releases" / (host.current() or ""))
    with AgentWatch(host) as watch:
        result = host.ok("activate", target)
    assert "bake: " + target + " stayed healthy" in result.stderr
    moved = result.stderr.index("agent: moving forecasting-agent to " + target)
    assert moved > result.stderr.index("stayed healthy"), "the agent moves after the bake"
    assert all(len(cwds) <= 1 for cwds in watch.samples), "never two agents at once"
    assert [old_dir] in watch.samples, "it ran on the old release while the new one baked"
    pid, _ = _agent(host)
    assert os.readlink(f"/proc/{pid}/cwd") == str((host.root / "releases" / target).resolve())
