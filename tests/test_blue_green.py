"""Blue/green activation with a bake window (issue 14): a release that fails after the switch never drops a request.

A ReleaseHost (temp ROOT, unique app user, private PM2 and a private nginx in front of the two
slots) gets every fixture mode installed once and snapshotted. Each test starts from r1 live in the
blue slot (`live_r1`) and activates under 8 clients polling /release and /health through nginx:
zero failed requests, the right end state, and for a failing release exit 1, the release marked
bad and the old slot serving again. Bakes are a few seconds (BAKE_SECONDS in cognivern.conf, set
per test); the failing modes die 6 s after they listen, inside that window.
Run as root: venv/bin/pytest tests/test_blue_green.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.render import render_upstream
from tests.support.helpers import wait_until
from tests.support.load import Load
from tests.support.release_host import ReleaseHost, build_release_tarball, ensure_app_user, remove_app_user, unique_app_user

pytestmark = pytest.mark.needs_root("it creates a user and runs the tool as root")

FAILING = {  # release -> (fixture mode, what the tool says, at its start or in its bake)
    "crash-after": ("crash-after", "failed its bake"),
    "crash-loop": ("crash-loop-after", "failed its bake"),
    "health-flip": ("health-flip", "failed its bake"),
    "boot-crash": ("crash", "did not start healthy in slot green"),
    "sick": ("unhealthy", "did not start healthy in slot green"),
}
BAKE = "12"  # seconds: longer than the 6 s the failing modes live after they listen (a loaded machine starts slowly)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ReleaseHost, Path]]:
    user = unique_app_user()
    ensure_app_user(user)
    out = tmp_path_factory.mktemp("artifacts")
    try:
        with ReleaseHost(user=user) as h:
            for rid in ("r1", "r2"):
                h.install(rid, *build_release_tarball(out, rid))
            for rid, (mode, _) in FAILING.items():
                h.install(rid, *build_release_tarball(out, rid, mode, delayMs=6000))
            snap = h.snapshot()
            try:
                yield h, snap
            finally:
                shutil.rmtree(snap, ignore_errors=True)
    finally:
        remove_app_user(user)


@pytest.fixture
def live_r1(installed: tuple[ReleaseHost, Path]) -> ReleaseHost:
    """r1 live in the blue slot, green empty, BAKE_SECONDS=BAKE."""
    h, snap = installed
    h.restore(snap)
    h.ok("activate", "r1")
    h.set_conf(BAKE_SECONDS=BAKE)
    assert h.slots() == {"live": "blue", "blue": "r1", "green": "", "agent": "r1"}
    return h


def load(h: ReleaseHost) -> Load:
    return Load([h.url("/release"), h.url("/health")], clients=8)


def pm2_names(h: ReleaseHost) -> list[str]:
    return sorted(str(p["name"]) for p in json.loads(h.pm2("jlist").stdout or "[]"))


def test_a_good_release_switches_bakes_and_stops_the_old_slot_without_a_failed_request(live_r1: ReleaseHost) -> None:
    h = live_r1
    with load(h) as clients:
        proc = h.run("activate", "r2")
    assert proc.returncode == 0, proc.stderr
    assert clients.failures == [] and clients.served()["r2"] > 0, clients.served()
    assert h.current() == "r2" and h.serving_release() == "r2"
    assert h.slots() == {"live": "green", "blue": "", "green": "r2", "agent": "r2"}
    assert pm2_names(h) == ["cognivern-agent-green"]
    # one nginx reload per switch: the stopped slot's backup line stays (nginx tries it only if green fails)
    assert h.upstream_file.read_text() == render_upstream(h.settings, h.port + 1)
    assert h.list_json()["previous"] == "r1"
    out = proc.stderr
    assert out.index("starting r2 in slot green") < out.index("switching current: r1 -> r2") < out.index("stayed healthy")
    assert out.index("stayed healthy") < out.index("stopping slot blue (r1)")


def test_without_a_bake_the_first_switch_on_a_host_drops_no_request(live_r1: ReleaseHost) -> None:
    """bakeSeconds 0 stops the old slot right after nginx's graceful reload, while workers of the
    configuration before may still serve their keepalive connections. The first activation's file
    lists the other slot as backup already, so those workers reach green (they answered 502 when it
    listed blue alone: 12-14 failed requests in bench.change_bench's first new release)."""
    h = live_r1
    assert h.upstream_file.read_text() == render_upstream(h.settings, h.port)
    assert f"server 127.0.0.1:{h.port + 1} backup max_fails=0;" in h.upstream_file.read_text(), "the idle slot is listed as backup"
    h.set_conf(BAKE_SECONDS="0")
    with Load([h.url("/release")], clients=4, pause=0.005) as clients:
        proc = h.run("activate", "r2")
        time.sleep(0.5)
    assert proc.returncode == 0, proc.stderr
    assert clients.failures == [] and clients.served()["r2"] > 0, clients.served()
    assert pm2_names(h) == ["cognivern-agent-green"]


@pytest.mark.parametrize("rid", list(FAILING))
def test_a_failing_release_is_reverted_or_refused_without_a_failed_request(live_r1: ReleaseHost, rid: str) -> None:
    h = live_r1
    with load(h) as clients:
        proc = h.run("activate", rid)
    assert proc.returncode == 1, proc.stderr
    assert FAILING[rid][1] in proc.stderr, proc.stderr
    assert clients.failures == [], (clients.served(), proc.stderr)
    assert h.current() == "r1" and h.serving_release() == "r1"
    assert h.slots() == {"live": "blue", "blue": "r1", "green": "", "agent": "r1"}
    assert pm2_names(h) == ["cognivern-agent-blue"]
    assert h.bad(rid)
    assert h.journal() is None
    assert h.upstream_file.read_text() == render_upstream(h.settings, h.port)
    if "bake" in FAILING[rid][1]:
        assert "switching back to r1 (slot blue, still warm)" in proc.stderr
        assert h.log_lines()[-1][5] == "rolled-back(exit=1)"


def test_a_failing_nginx_test_keeps_the_old_upstream_and_says_so(live_r1: ReleaseHost) -> None:
    h = live_r1
    before = h.upstream_file.read_text()
    broken = h.nginx.sites_enabled / "zz-broken.conf"
    broken.write_text("server { bogus_directive on; }\n")
    try:
        with load(h) as clients:
            proc = h.run("activate", "r2")
    finally:
        broken.unlink()
    assert proc.returncode == 1
    assert "nginx refused the new upstream" in proc.stderr and "the old upstream is still serving" in proc.stderr
    assert "bogus_directive" in proc.stderr
    assert clients.failures == [] and set(clients.served()) <= {"r1", "ok"}
    assert h.upstream_file.read_text() == before
    assert h.current() == "r1" and h.serving_release() == "r1"
    assert pm2_names(h) == ["cognivern-agent-blue"]
    assert not h.bad("r2"), "nginx's fault, not the release's"


def _latest_run(h: ReleaseHost) -> Path:
    return sorted((h.root / ".deploy" / "runs").glob("*.log"))[-1]


def test_a_second_activation_during_the_bake_fails_fast_naming_the_holder(live_r1: ReleaseHost) -> None:
    h = live_r1
    first = h.popen("activate", "r2")
    try:
        wait_until(lambda: "bake: watching r2" in _latest_run(h).read_text(), timeout=60)
        started = time.monotonic()
        second = h.run("activate", "r1")
        elapsed = time.monotonic() - started
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 3 and "action=activate id=r2" in second.stderr, second.stderr
    assert elapsed < 5, elapsed
    assert h.serving_release() == "r2"


def _tool_pids(h: ReleaseHost) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes()
                if b"cognivern-release" in cmdline and str(h.root).encode() in cmdline:
                    found.append(int(proc.name))
    return found


def test_a_worker_killed_during_the_bake_is_reverted_by_the_next_lock_holder(live_r1: ReleaseHost) -> None:
    """Decided: an interrupted bake is not a passed one. The next command that takes the deploy lock
    switches back to the still-warm old slot (the release is not marked bad) before its own work."""
    h = live_r1
    first = h.popen("activate", "r2")
    wait_until(lambda: "bake: watching r2" in _latest_run(h).read_text(), timeout=60)
    with load(h) as clients:
        for pid in _tool_pids(h):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.communicate(timeout=30)
        assert h.journal() is not None
        assert h.current() == "r2", "killed after the switch"
        proc = h.run("reload")
    assert proc.returncode == 0, proc.stderr
    assert "recovering the activation of r2 that was interrupted (switched" in proc.stderr
    assert "switching back to r1 (slot blue, still warm)" in proc.stderr
    assert clients.failures == [], clients.served()
    assert h.current() == "r1" and h.serving_release() == "r1"
    assert h.slots() == {"live": "blue", "blue": "r1", "green": "", "agent": "r1"}
    assert h.journal() is None
    assert not h.bad("r2")


def test_a_warm_rollback_switches_without_starting_anything(live_r1: ReleaseHost) -> None:
    h = live_r1
    h.set_conf(KEEP_PREVIOUS_WARM="true", BAKE_SECONDS="2")
    h.ok("activate", "r2")
    assert h.slots() == {"live": "green", "blue": "r1", "green": "r2", "agent": "r2"}, "r1 kept warm in blue"
    assert h.upstream_file.read_text() == render_upstream(h.settings, h.port + 1)
    blue_pid = next(p["pid"] for p in json.loads(h.pm2("jlist").stdout) if p["name"] == "cognivern-agent-blue")
    with load(h) as clients:
        started = time.monotonic()
        proc = h.run("activate", "r1")
    assert proc.returncode == 0, proc.stderr
    assert "release r1 is warm in slot blue: switching without a start" in proc.stderr
    assert "starting r1" not in proc.stderr
    assert clients.failures == []
    first = clients.first("r1", started)
    assert first is not None
    print(f"\nwarm rollback: first answer from r1 {first:.2f} s after the command started")
    same = next(p["pid"] for p in json.loads(h.pm2("jlist").stdout) if p["name"] == "cognivern-agent-blue")
    assert same == blue_pid, "the warm slot served as it was: nothing restarted"
    assert h.slots() == {"live": "blue", "blue": "r1", "green": "r2", "agent": "r1"}


def test_a_warm_slot_that_does_not_run_the_release_the_state_names_fails_its_bake(live_r1: ReleaseHost, tmp_path: Path) -> None:
    """The warm switch trusts the state's slots and a health answer (no PM2 query before it); the bake's
    first check proves the slot's workers run from that release, else nginx goes back at once."""
    h = live_r1
    h.set_conf(KEEP_PREVIOUS_WARM="true", BAKE_SECONDS="2")
    h.ok("activate", "r2")  # r1 warm in blue, r2 live in green
    state_file = h.root / "config" / "state.json"
    state = json.loads(state_file.read_text())
    state["slots"]["blue"] = "r3"  # blue claims r3; its workers run r1
    state_file.write_text(json.dumps(state))
    assert h.slots()["blue"] == "r3"
    h.install("r3", *build_release_tarball(tmp_path, "r3"))
    with load(h) as clients:
        proc = h.run("activate", "r3")
    assert proc.returncode != 0, proc.stderr
    assert "release r3 is warm in slot blue: switching without a start" in proc.stderr
    assert "do not run from releases/r3" in proc.stderr
    assert clients.failures == []
    assert h.current() == "r2" and h.serving_release() == "r2"
