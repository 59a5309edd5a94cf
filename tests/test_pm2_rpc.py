"""The release tool asks PM2 over its RPC socket itself (cognivern_release.pm2), and its slot watches
give the verdicts the activation acts on (issue 23: the Node helper cognivern-pm2.cjs is folded in).

A private PM2 daemon (temp PM2_HOME, root's, killed at the end) runs two `sleep` apps and
tests/fixtures/health-app.js on free loopback ports. Every query must give what `pm2 jlist` says,
`delete` must remove exactly one app, and whatever cannot be asked must give no answer (None) or
no daemon ([]), never a wrong one and never a hang. The socket is the app's: one the app replaced by
a link, or one not its own, is never connected to. The watches (`watch_healthy`, `watch_bake`, the
machine's, run here on real edges) are checked as a table of situations and verdicts.
Run: venv/bin/pytest tests/test_pm2_rpc.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.release.cognivern_release import pm2
from components.release.cognivern_release.activation import Machine, Verdict
from components.release.cognivern_release.proc import Account, HostEdges
from components.release.cognivern_release.server import health_check
from tests.support.helpers import free_port, wait_until
from tests.test_activation_machine import config

WEB_APP = Path(__file__).resolve().parent / "fixtures" / "health-app.js"
ROOT = Account("root", 0, 0, "/root")


class Daemon:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "PM2_HOME": str(home)}
        self.web_dir = home / "web"
        self.port = 0
        self.rpc = pm2.Daemon(str(home), ROOT)

    def sh(self, script: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], env={**self.env, **env}, capture_output=True, text=True, timeout=60, cwd="/")

    def jlist(self) -> list[dict[str, Any]]:
        listing: list[dict[str, Any]] = json.loads(self.sh("pm2 jlist").stdout)
        return listing

    def start(self, name: str, instances: int = 1) -> None:
        assert self.sh(f"pm2 start /bin/sleep --name {name} -i {instances} -- 1000").returncode == 0

    def start_web(self, name: str, port: int, **env: str) -> None:
        self.web_dir.mkdir(exist_ok=True)
        started = self.sh(f"pm2 start {WEB_APP} --name {name} --cwd {self.web_dir}", PORT=str(port), **env)
        assert started.returncode == 0, started.stderr


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("pm2-home"))
    try:
        d.start("two", instances=2)
        d.start("one")
        d.port = free_port()
        d.start_web("web-blue", d.port)
        assert wait_until(lambda: pm2.online_pids(d.rpc.list() or [], "web-blue"), timeout=20)
        yield d
    finally:
        d.rpc.close()
        d.sh("pm2 kill")


def summary(listing: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((p["name"], p["pm_id"], p["pid"], pm2.env_of(p)["status"], pm2.env_of(p)["restart_time"]) for p in listing)


def test_the_rpc_socket_answers_what_pm2_jlist_answers(daemon: Daemon) -> None:
    answer = daemon.rpc.list()
    assert answer is not None and summary(answer) == summary(daemon.jlist())
    assert [n for n, *_ in summary(answer)] == ["one", "two", "two", "web-blue"]
    assert pm2.status_lines(answer) == pm2.status_lines(daemon.jlist())
    pids = pm2.online_pids(answer, "two")
    assert len(pids) == 2 and all(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/bin/sleep\0") for p in pids)
    assert pm2.online_pids(answer, "none") == []


def test_one_connection_serves_many_questions_and_survives_a_daemon_replaced_meanwhile(daemon: Daemon) -> None:
    for _ in range(20):
        assert daemon.rpc.list()
    daemon.rpc._connection().sock.shutdown(socket.SHUT_RDWR)  # the kept connection is gone (a daemon restarted)
    assert daemon.rpc.list(), "a new connection, no lost answer"


def test_delete_removes_that_app_and_stops_its_processes_only(daemon: Daemon) -> None:
    daemon.start("doomed", instances=2)
    pids = pm2.online_pids(daemon.rpc.list() or [], "doomed")
    assert len(pids) == 2
    assert daemon.rpc.delete("doomed") == 2
    assert wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout=10)
    assert [n for n, *_ in summary(daemon.jlist())] == ["one", "two", "two", "web-blue"]
    assert daemon.rpc.delete("doomed") == 0


def test_without_a_daemon_there_is_no_app_and_none_is_started(tmp_path: Path) -> None:
    empty = pm2.Daemon(str(tmp_path), ROOT)
    assert (empty.list(), empty.delete("two")) == ([], 0)
    assert not (tmp_path / "pm2.pid").exists(), "asking never starts a daemon"


@pytest.mark.parametrize("planted", ["link to another socket", "another owner's socket", "not a socket"])
def test_a_socket_that_is_not_the_apps_own_is_never_connected_to(tmp_path: Path, planted: str) -> None:
    """rpc.sock is in the app's PM2_HOME: the app can put anything there. A link is not followed
    (root would connect wherever it points); a socket of another owner is not the app's daemon."""
    home, elsewhere = tmp_path / "pm2", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(elsewhere / "root.sock" if planted == "link to another socket" else home / "rpc.sock"))
    listener.listen()
    listener.settimeout(0.5)
    if planted == "link to another socket":
        (home / "rpc.sock").symlink_to(elsewhere / "root.sock")
    elif planted == "not a socket":
        listener.close()
        (home / "rpc.sock").unlink()
        (home / "rpc.sock").write_text("x")
    owner = ROOT if planted != "another owner's socket" else Account("app", 4321, 4321, "/nonexistent")
    try:
        assert pm2.Daemon(str(home), owner).list() == [], "taken as no daemon"
        if planted != "not a socket":
            with pytest.raises(TimeoutError):
                listener.accept()  # nothing connected
            control = socket.socket(socket.AF_UNIX)
            control.connect(str(elsewhere / "root.sock" if planted == "link to another socket" else home / "rpc.sock"))
            listener.accept()[0].close()  # control: the listener does take connections
            control.close()
    finally:
        listener.close()


def test_a_daemon_that_does_not_answer_hangs_nothing(daemon: Daemon) -> None:
    """PM2's daemon stopped (SIGSTOP: it holds its socket, answers nothing): no answer within 3 s."""
    god = int((daemon.home / "pm2.pid").read_text())
    fresh = pm2.Daemon(str(daemon.home), ROOT)
    os.kill(god, signal.SIGSTOP)
    try:
        began = time.monotonic()
        answer = fresh.list()
        took = time.monotonic() - began
        deleted = fresh.delete("one", timeout=2)
    finally:
        os.kill(god, signal.SIGCONT)
    assert answer is None and deleted is None and 2.5 < took < 5, took
    assert fresh.list(), "it answers again once it runs"
    fresh.close()


def test_an_answer_is_data_however_large_or_malformed(tmp_path: Path) -> None:
    """A daemon of the app's could answer anything: a frame too large, broken JSON, no list."""
    path = tmp_path / "rpc.sock"
    answers = [b"\x12" + (70 << 20).to_bytes(4, "big"), b"\x12\x00\x00\x00\x05j:{x", b'\x12\x00\x00\x00\x0cj:{"args":7}']
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        for answer in answers:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(answer)
            time.sleep(0.2)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        for _ in answers:
            assert pm2.Daemon(str(tmp_path), ROOT).list() is None
    finally:
        thread.join(timeout=5)
        server.close()


# ---------------------------------------------------------------------------- the watches, on real edges
class RealEdges(HostEdges):
    """What the machine's watches use, from the real daemon and the app's health answer."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def health(self, url: str) -> bool:
        return health_check(url)[0]

    def pm2_list(self) -> list[dict[str, Any]] | None:
        return self.daemon.rpc.list()


def watcher(daemon: Daemon, name: str, port: int) -> Machine:
    """A machine whose blue slot is PM2 app `name`-blue on `port` (its state is never touched here)."""
    return Machine(config(app_name=name, port=port), None, RealEdges(daemon))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "runs_from", "seconds", "base", "sick", "verdict"),
    [
        ("healthy", "web", 10, 0, False, "ok"),  # answers ok, its workers run from that directory
        ("healthy", "web", 10, None, False, "ok"),
        ("healthy", "elsewhere", 1, None, False, "timeout"),  # healthy, but not from that release
        ("healthy", "web", 1, 0, True, "timeout"),  # from that release, but answers 500
        ("bake", "web", 1, None, False, "ok"),
        ("bake", "elsewhere", 1, None, False, "stale"),
        ("bake", "web", 5, None, True, "sick"),  # three failed checks in a row, well before the end
    ],
)
def test_watch_verdicts(daemon: Daemon, mode: str, runs_from: str, seconds: int, base: int | None, sick: bool, verdict: str) -> None:
    directory = str(daemon.web_dir if runs_from == "web" else daemon.web_dir.parent)
    m = watcher(daemon, "web", daemon.port)
    flag = daemon.web_dir / "sick"
    try:
        if sick:
            flag.touch()
        began = time.monotonic()
        got = m.watch_healthy("blue", directory, seconds, base) if mode == "healthy" else m.watch_bake("blue", directory, seconds)
    finally:
        flag.unlink(missing_ok=True)
    assert got.kind == verdict, got
    if verdict == "sick":
        assert time.monotonic() - began < 3, "sick is seen before the bake's end"


def test_the_bake_sees_pm2_restart_the_app(daemon: Daemon) -> None:
    port = free_port()
    daemon.start_web("restarting-blue", port, EXIT_AFTER_MS="1500")  # PM2 restarts it 1.5 s after each start
    try:
        m = watcher(daemon, "restarting", port)
        assert m.watch_healthy("blue", str(daemon.web_dir), 10, None) == Verdict("ok")
        got = m.watch_bake("blue", str(daemon.web_dir), 10)
        assert got.kind == "restarts" and got.numbers[1] > got.numbers[0] and got.numbers[2:] == (0, 1), got
    finally:
        daemon.rpc.delete("restarting-blue")


def test_a_crash_loop_ends_the_wait_before_its_deadline(daemon: Daemon) -> None:
    port = free_port()
    daemon.start_web("crashing-blue", port, EXIT_AFTER_MS="1")  # exits at once, again and again
    try:
        began = time.monotonic()
        got = watcher(daemon, "crashing", port).watch_healthy("blue", str(daemon.web_dir), 30, 0)
        assert got.kind == "crash" and (got.numbers[1] >= 2 or got.numbers[2] == 1), got
        assert time.monotonic() - began < 20, "a crash loop ends the wait early"
    finally:
        daemon.rpc.delete("crashing-blue")


def test_without_a_daemon_the_watches_see_no_app(tmp_path: Path) -> None:
    empty = Daemon(tmp_path)
    m = watcher(empty, "web", free_port())
    assert m.watch_healthy("blue", str(tmp_path), 10, 0) == Verdict("crash", (0, 0, 0, 0))
    assert m.watch_bake("blue", str(tmp_path), 10) == Verdict("stale")
    assert not (tmp_path / "pm2.pid").exists(), "watching never starts a daemon"
