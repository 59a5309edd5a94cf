"""cognivern-pm2.cjs, the release tool's PM2 helper: the RPC socket answers what `pm2 jlist` answers.

The helper asks PM2's daemon over $PM2_HOME/rpc.sock (what `pm2 jlist` and `pm2 delete` send)
instead of loading PM2's whole CLI for each question (bench/pm2_calls.py: the CPU of each way). A
private PM2 daemon (temp PM2_HOME, root's, killed at the end) runs two `sleep` apps; every query
must give the same answer both ways, `delete` must remove exactly one app, and whatever cannot be
asked this way must exit 3 (no RPC modules: the tool uses the CLI), exit 4 (no daemon) or give no
answer, never a wrong one.
Run: venv/bin/pytest tests/test_pm2_helper.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import wait_until

HELPER = Path(__file__).resolve().parents[1] / "components" / "release" / "cognivern-pm2.cjs"


class Daemon:
    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "PM2_HOME": str(home)}

    def sh(self, script: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", script], env={**self.env, **env}, capture_output=True, text=True, timeout=60, cwd="/")

    def helper(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["node", str(HELPER), *args], env={**self.env, **env}, capture_output=True, text=True, timeout=60, cwd="/")

    def via_cli(self, *args: str) -> str:
        return self.sh(f"pm2 jlist | node {HELPER} {' '.join(args)} --stdin").stdout

    def start(self, name: str, instances: int = 1) -> None:
        assert self.sh(f"pm2 start /bin/sleep --name {name} -i {instances} -- 1000").returncode == 0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("pm2-home"))
    try:
        d.start("two", instances=2)
        d.start("one")
        yield d
    finally:
        d.sh("pm2 kill")


@pytest.mark.parametrize("query", [("restarts", "two"), ("pids", "two"), ("restarts", "none"), ("pids", "one"), ("names",), ("status",)])
def test_the_rpc_socket_answers_what_pm2_jlist_answers(daemon: Daemon, query: tuple[str, ...]) -> None:
    direct = daemon.helper(*query)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == daemon.via_cli(*query)
    assert direct.stdout.strip(), "an answer, not nothing"


def test_the_answers_say_what_pm2_runs(daemon: Daemon) -> None:
    assert daemon.helper("restarts", "two").stdout == "0 0 2\n"
    assert daemon.helper("restarts", "none").stdout == "0 0 0\n"
    assert sorted(daemon.helper("names").stdout.split()) == ["one", "two"]
    pids = daemon.helper("pids", "two").stdout.split()
    assert len(pids) == 2 and all(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/bin/sleep\0") for p in pids)


def test_delete_removes_that_app_and_stops_its_processes_only(daemon: Daemon) -> None:
    daemon.start("doomed", instances=2)
    pids = daemon.helper("pids", "doomed").stdout.split()
    assert len(pids) == 2
    deleted = daemon.helper("delete", "doomed")
    assert (deleted.returncode, deleted.stdout) == (0, "2\n"), deleted.stderr
    assert "doomed" not in daemon.via_cli("names").split()
    assert wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout=10)
    assert sorted(daemon.helper("names").stdout.split()) == ["one", "two"]
    again = daemon.helper("delete", "doomed")
    assert (again.returncode, again.stdout) == (0, "0\n")


def test_without_a_daemon_it_exits_4_and_starts_none(tmp_path: Path) -> None:
    """No daemon, no app: the tool then skips a delete, and asks `pm2 jlist` for a query."""
    empty = Daemon(tmp_path)
    for query in (("restarts", "two"), ("names",), ("delete", "two")):
        proc = empty.helper(*query)
        assert (proc.returncode, proc.stdout) == (4, ""), query
    assert not (tmp_path / "pm2.pid").exists(), "asking never starts a daemon"


def test_without_pm2s_rpc_modules_it_exits_3(daemon: Daemon, tmp_path: Path) -> None:
    """The first `pm2` on PATH decides where the modules are: a wrapper elsewhere has none."""
    real = shutil.which("pm2")
    assert real
    wrapper = tmp_path / "bin" / "pm2"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    proc = daemon.helper("names", PATH=f"{wrapper.parent}:{os.environ['PATH']}")
    assert (proc.returncode, proc.stdout) == (3, "")


@pytest.mark.parametrize("text", ["", "not json", '{"an": "object"}', "[broken"])
def test_an_unreadable_jlist_gives_no_answer(daemon: Daemon, text: str) -> None:
    for query, want in ((("restarts", "two"), ""), (("pids", "two"), ""), (("names",), ""), (("status",), "  (pm2 not answering)\n")):
        proc = subprocess.run(["node", str(HELPER), *query, "--stdin"], input=text, capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stdout) == (0, want), (query, text)
