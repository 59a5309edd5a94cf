"""cognivern-pm2.cjs, the release tool's PM2 helper: the RPC socket answers what `pm2 jlist` answers,
and its slot watcher gives the verdicts the tool acts on.

The helper asks PM2's daemon over $PM2_HOME/rpc.sock (what `pm2 jlist` and `pm2 delete` send)
instead of loading PM2's whole CLI for each question (bench/pm2_calls.py: the CPU of each way). A
private PM2 daemon (temp PM2_HOME, root's, killed at the end) runs two `sleep` apps and a small
HTTP app on a free loopback port; every query must give the same answer both ways, `delete` must
remove exactly one app, and whatever cannot be asked this way must exit 3 (no RPC modules: the
tool uses the CLI), exit 4 (no daemon) or give no answer, never a wrong one. The watcher (`healthy`,
`bake`: the tool's wait for a slot and its bake) is checked as a table of situations and verdicts.
Run: venv/bin/pytest tests/test_pm2_helper.py
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import free_port, wait_until

HELPER = Path(__file__).resolve().parents[1] / "components" / "release" / "cognivern-pm2.cjs"
WEB_APP = Path(__file__).resolve().parent / "fixtures" / "health-app.js"


class Daemon:
    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "PM2_HOME": str(home)}
        self.web_dir = home / "web"
        self.port = 0

    def sh(self, script: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], env={**self.env, **env}, capture_output=True, text=True, timeout=60, cwd="/")

    def helper(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["node", str(HELPER), *args], env={**self.env, **env}, capture_output=True, text=True, timeout=60, cwd="/")

    def via_cli(self, *args: str) -> str:
        return self.sh(f"pm2 jlist | node {HELPER} {' '.join(args)} --stdin").stdout

    def start(self, name: str, instances: int = 1) -> None:
        assert self.sh(f"pm2 start /bin/sleep --name {name} -i {instances} -- 1000").returncode == 0

    def start_web(self, name: str, port: int, **env: str) -> None:
        """tests/fixtures/health-app.js as PM2 app `name`, working in web_dir, answering on 127.0.0.1:port."""
        self.web_dir.mkdir(exist_ok=True)
        started = self.sh(f"pm2 start {WEB_APP} --name {name} --cwd {self.web_dir}", PORT=str(port), **env)
        assert started.returncode == 0, started.stderr

    def names(self) -> list[str]:
        return sorted(line.split()[0] for line in self.via_cli("status").splitlines())

    def watch(self, mode: str, *args: str, tool_pid: int | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        """The watcher's run: its last argument is the pid of the tool it works for (here: pytest)."""
        return self.helper(mode, *args, str(tool_pid or os.getpid()), **env)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("pm2-home"))
    try:
        d.start("two", instances=2)
        d.start("one")
        d.port = free_port()
        d.start_web("web", d.port)
        assert wait_until(lambda: d.helper("pids", "web").stdout.strip(), timeout=20)
        yield d
    finally:
        d.sh("pm2 kill")


@pytest.mark.parametrize("query", [("pids", "two"), ("pids", "none"), ("pids", "one"), ("status",)])
def test_the_rpc_socket_answers_what_pm2_jlist_answers(daemon: Daemon, query: tuple[str, ...]) -> None:
    direct = daemon.helper(*query)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == daemon.via_cli(*query)
    assert direct.stdout.strip() or query == ("pids", "none"), "an answer, not nothing"


def test_the_answers_say_what_pm2_runs(daemon: Daemon) -> None:
    assert daemon.helper("pids", "none").stdout == ""
    assert daemon.names() == ["one", "two", "two", "web"]
    pids = daemon.helper("pids", "two").stdout.split()
    assert len(pids) == 2 and all(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/bin/sleep\0") for p in pids)


def test_delete_removes_that_app_and_stops_its_processes_only(daemon: Daemon) -> None:
    daemon.start("doomed", instances=2)
    pids = daemon.helper("pids", "doomed").stdout.split()
    assert len(pids) == 2
    deleted = daemon.helper("delete", "doomed")
    assert (deleted.returncode, deleted.stdout) == (0, "2\n"), deleted.stderr
    assert "doomed" not in daemon.names()
    assert wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout=10)
    assert daemon.names() == ["one", "two", "two", "web"]
    again = daemon.helper("delete", "doomed")
    assert (again.returncode, again.stdout) == (0, "0\n")


def test_without_a_daemon_it_exits_4_and_starts_none(tmp_path: Path) -> None:
    """No daemon, no app: the tool then skips a delete, and asks `pm2 jlist` for a query."""
    empty = Daemon(tmp_path)
    for query in (("pids", "two"), ("status",), ("delete", "two")):
        proc = empty.helper(*query)
        assert (proc.returncode, proc.stdout) == (4, ""), query
    assert not (tmp_path / "pm2.pid").exists(), "asking never starts a daemon"


def pm2_elsewhere(tmp_path: Path) -> tuple[str, Path]:
    """(PATH, log): a `pm2` wrapper first on PATH, away from PM2's package (so without its RPC
    modules), that logs its arguments and runs the real one."""
    real = shutil.which("pm2")
    assert real
    log = tmp_path / "asked"
    wrapper = tmp_path / "bin" / "pm2"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >>{log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return f"{wrapper.parent}:{os.environ['PATH']}", log


def test_without_pm2s_rpc_modules_it_exits_3(daemon: Daemon, tmp_path: Path) -> None:
    """The first `pm2` on PATH decides where the modules are: a wrapper elsewhere has none."""
    path, _ = pm2_elsewhere(tmp_path)
    proc = daemon.helper("status", PATH=path)
    assert (proc.returncode, proc.stdout) == (3, "")


@pytest.mark.parametrize("text", ["", "not json", '{"an": "object"}', "[broken"])
def test_an_unreadable_jlist_gives_no_answer(daemon: Daemon, text: str) -> None:
    for query, want in ((("pids", "two"), ""), (("status",), "  (pm2 not answering)\n")):
        proc = subprocess.run(["node", str(HELPER), *query, "--stdin"], input=text, capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stdout) == (0, want), (query, text)


# --- the slot watcher: situation -> verdict ------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "runs_from", "seconds", "base", "sick", "verdict"),
    [
        ("healthy", "web", "10", "0", False, "ok"),  # answers ok, its workers run from that directory
        ("healthy", "web", "10", "-", False, "ok"),
        ("healthy", "elsewhere", "1", "-", False, "timeout"),  # healthy, but not from that release
        ("healthy", "web", "1", "0", True, "timeout"),  # from that release, but answers 500
        ("bake", "web", "1", None, False, "ok"),
        ("bake", "elsewhere", "1", None, False, "stale"),
        ("bake", "web", "5", None, True, "sick"),  # three failed checks in a row, well before the end
    ],
)
def test_watcher_verdicts(daemon: Daemon, mode: str, runs_from: str, seconds: str, base: str | None, sick: bool, verdict: str) -> None:
    directory = str(daemon.web_dir if runs_from == "web" else daemon.web_dir.parent)
    url = f"http://127.0.0.1:{daemon.port}/health"
    flag = daemon.web_dir / "sick"
    try:
        if sick:
            flag.touch()
        proc = daemon.watch(mode, "web", url, seconds, directory, *([base] if base else []))
    finally:
        flag.unlink(missing_ok=True)
    assert (proc.returncode, proc.stdout) == (0, verdict + "\n"), proc.stderr


def test_watcher_sees_pm2_restart_the_app_in_the_bake(daemon: Daemon) -> None:
    port = free_port()
    daemon.start_web("restarting", port, EXIT_AFTER_MS="1500")  # PM2 restarts it 1.5 s after each start
    try:
        url = f"http://127.0.0.1:{port}/health"
        assert daemon.watch("healthy", "restarting", url, "10", str(daemon.web_dir), "-").stdout == "ok\n"
        proc = daemon.watch("bake", "restarting", url, "10", str(daemon.web_dir))
        assert re.fullmatch(r"restarts (\d+) (\d+) 0 1\n", proc.stdout), proc.stdout
        before, now = map(int, proc.stdout.split()[1:3])
        assert now > before
    finally:
        daemon.sh("pm2 delete restarting")


def test_watcher_sees_a_crash_loop_before_its_deadline(daemon: Daemon) -> None:
    port = free_port()
    daemon.start_web("crashing", port, EXIT_AFTER_MS="1")  # exits at once, again and again
    try:
        began = time.monotonic()
        proc = daemon.watch("healthy", "crashing", f"http://127.0.0.1:{port}/health", "30", str(daemon.web_dir), "0")
        match = re.fullmatch(r"crash 0 (\d+) (\d+) 1\n", proc.stdout)
        assert match, proc.stdout
        assert int(match[1]) >= 2 or int(match[2]) == 1
        assert time.monotonic() - began < 20, "a crash loop ends the wait early"
    finally:
        daemon.sh("pm2 delete crashing")


def test_watcher_stops_when_the_tool_is_gone(daemon: Daemon) -> None:
    """The tool killed mid-bake: its watcher does not go on for the rest of BAKE_SECONDS."""
    tool = subprocess.Popen(["sleep", "60"])
    watcher = subprocess.Popen(
        ["node", str(HELPER), "bake", "web", f"http://127.0.0.1:{daemon.port}/health", "60", str(daemon.web_dir), str(tool.pid)],
        env=daemon.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        assert watcher.poll() is None, "watching while the tool runs"
        tool.kill()
        tool.wait()
        out, _ = watcher.communicate(timeout=5)
        assert (watcher.returncode, out) == (1, "")
    finally:
        tool.kill()
        watcher.kill()
        watcher.wait()


def test_watcher_without_rpc_modules_asks_pm2_jlist(daemon: Daemon, tmp_path: Path) -> None:
    path, log = pm2_elsewhere(tmp_path)
    url = f"http://127.0.0.1:{daemon.port}/health"
    proc = daemon.watch("healthy", "web", url, "10", str(daemon.web_dir), "-", PATH=path)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr
    assert "jlist" in log.read_text().split()


def test_watcher_without_a_daemon_sees_no_app(tmp_path: Path) -> None:
    empty = Daemon(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/health"
    assert empty.watch("healthy", "web", url, "10", str(tmp_path), "0").stdout == "crash 0 0 0 0\n"
    assert empty.watch("bake", "web", url, "10", str(tmp_path)).stdout == "stale\n"
    assert not (tmp_path / "pm2.pid").exists(), "watching never starts a daemon"


def test_a_daemon_that_does_not_answer_hangs_nothing(daemon: Daemon) -> None:
    """PM2's daemon stopped (SIGSTOP: it holds its socket, answers nothing): a query gives no
    answer within its 3 s, the bake says PM2 did not answer, the wait ends at its deadline."""
    god = int((Path(daemon.env["PM2_HOME"]) / "pm2.pid").read_text())
    url = f"http://127.0.0.1:{daemon.port}/health"
    os.kill(god, signal.SIGSTOP)
    try:
        query = daemon.helper("pids", "web")
        bake = daemon.watch("bake", "web", url, "2", str(daemon.web_dir))
        healthy = daemon.watch("healthy", "web", url, "2", str(daemon.web_dir), "0")
    finally:
        os.kill(god, signal.SIGCONT)
    assert (query.returncode, query.stdout) == (0, "")
    assert bake.stdout == "unanswered\n"
    assert healthy.stdout == "timeout\n"
    assert daemon.helper("pids", "web").stdout.strip(), "it answers again once it runs"
