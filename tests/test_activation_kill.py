"""An SSH drop or a kill mid-activation always converges (issue 11 §3).

`cognivern-release activate` over real SSH on a provisioned host, under load (a client polling the
app's health on 127.0.0.1 all the time). At each kill point the ssh client is SIGKILLed, then every
cognivern-release process of this host gets SIGTERM and, 0.2 s later, SIGKILL. The next run of the
same command (what the next `pulumi up` with the same config runs) must succeed: the requested
release current, healthy and serving through nginx, only its slot in PM2, no activation journal left.
Failed requests per kill point are printed (run with -s).
Run as root: venv/bin/pytest -s tests/test_activation_kill.py
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.hardened_host import HardenedHost, hardened_host
from tests.support.helpers import http_get
from tests.support.load import Load

pytestmark = pytest.mark.needs_root("it kills the release tool as root")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedHost]:
    with hardened_host(tmp_path_factory.mktemp("kill"), healthTimeout=15) as h:
        for rid, mode in (("r1", "ok"), ("r2", "ok"), ("slow", "slow")):
            assert h.install(rid, mode).returncode == 0
        h.ok("activate", "r1")
        yield h


SEEN_RUNS: set[str] = set()


def _latest_run_log(host: HardenedHost) -> str:
    """The output of the activation under test (runs started before it are in SEEN_RUNS)."""
    logs = [p for p in sorted((host.root / ".deploy" / "runs").glob("*.log")) if p.name not in SEEN_RUNS]
    return logs[-1].read_text() if logs else ""


def _switched_to(target: str) -> Callable[[HardenedHost], bool]:
    return lambda h: "switching current:" in _latest_run_log(h) and h.current() == target


# kill point -> (release to activate, condition that says the activation is there)
KILL_POINTS: dict[str, tuple[str, Callable[[HardenedHost], bool]]] = {
    "after the backup": ("r2", lambda h: "backed up shared/data" in _latest_run_log(h)),
    "during the start in the idle slot": ("slow", lambda h: "starting slow in slot" in _latest_run_log(h)),
    "right after the switch": ("r2", _switched_to("r2")),
    "during the bake": ("r2", lambda h: "bake: watching" in _latest_run_log(h)),
}


def _tool_pids(host: HardenedHost) -> list[int]:
    """Processes running this host's cognivern-release (its path and root are unique to the test)."""
    tool, root = str(host.target.bin_dir / "cognivern-release").encode(), str(host.root).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if tool in cmdline and root in cmdline:
                found.append(int(proc.name))
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _pm2_names(host: HardenedHost) -> list[str]:
    out = host.as_app("env", f"PM2_HOME=/home/{host.user}/.pm2", "pm2", "jlist").stdout
    return sorted(p["name"] for p in json.loads(out))


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_activation_converges_on_the_next_run(host: HardenedHost, point: str) -> None:
    target, reached = KILL_POINTS[point]
    if host.current() == target:
        host.ok("activate", "r1")
    assert host.target.sshd is not None
    command = f"cognivern-release --root {host.root} activate --force {target}"
    SEEN_RUNS.update(p.name for p in (host.root / ".deploy" / "runs").glob("*.log"))
    with Load([host.url("/health")], clients=1) as load:
        client = host.target.sshd.popen(command)
        deadline = time.monotonic() + 60
        while not reached(host):
            assert client.poll() is None, f"the activation ended before the kill point: {_latest_run_log(host)}"
            assert time.monotonic() < deadline, _latest_run_log(host)
            time.sleep(0.05)
        client.kill()
        client.wait(timeout=10)
        pids = _tool_pids(host)
        assert pids, "no cognivern-release process to kill"
        _signal_all(pids, signal.SIGTERM)
        time.sleep(0.2)
        _signal_all(_tool_pids(host), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _tool_pids(host) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _tool_pids(host)
        killed_at = host.current()

        again = host.target.run(command)
        assert again.returncode == 0, again.stderr
        if killed_at == target:  # killed after the switch: the journal made the next run finish it first
            assert f"recovering the activation of {target} that was interrupted (switched" in again.stderr, again.stderr
        assert host.current() == target
        assert http_get(host.url("/release"), timeout=5).json()["release"] == target
    assert len(_pm2_names(host)) == 1, "only the live slot runs"
    assert host.state().get("journal") is None
    print(f"\nkill {point}: current at the kill {killed_at}; next run ok; requests {len(load.results)}, failed {len(load.failures)}")


def test_an_ssh_drop_alone_does_not_stop_the_activation(host: HardenedHost) -> None:
    """The worker runs in a session of its own and writes to a file: it finishes without its caller."""
    target = "r2" if host.current() != "r2" else "r1"
    assert host.target.sshd is not None
    SEEN_RUNS.update(p.name for p in (host.root / ".deploy" / "runs").glob("*.log"))
    client = host.target.sshd.popen(f"cognivern-release --root {host.root} activate --force {target}")
    deadline = time.monotonic() + 60
    while "starting " not in _latest_run_log(host):
        assert client.poll() is None and time.monotonic() < deadline, _latest_run_log(host)
        time.sleep(0.05)
    client.kill()
    client.wait(timeout=10)
    while "is live and healthy" not in _latest_run_log(host):
        assert time.monotonic() < deadline, _latest_run_log(host)
        time.sleep(0.1)
    assert host.current() == target
    assert host.state().get("journal") is None
    assert len(_pm2_names(host)) == 1, "only the live slot runs"
