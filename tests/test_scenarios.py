"""`pulumi up` on our machines, proven with the engine stand-in (tests/engine) against a real target.

One disposable TargetHost (private sshd, private nginx, temp ROOT, unique app user) is shared by
the scenarios below, stages of one stack's history (tests/support/story.py: a test alone or in
any order first runs the stages before it, in file order): a fresh host goes live on
v1, v2 follows, config alone rolls back to v1, a broken v3 fails the run while v1 keeps serving,
a secret change reaches the app, the agent is switched on and off, keepReleases prunes, and bad
values are refused before anything reaches the host. Every run is the real `__main__.py` with
the stack config a user would set; HTTP goes through nginx; files are checked on the host.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pulumi import RunError

from components.settings import SECRET_KEYS
from tests.engine import CommandError
from tests.support.helpers import http_client, http_get, run_pm2
from tests.support.program import REPO
from tests.support.stack import DeployStack
from tests.support.story import Story
from tests.support.target_host import TargetHost

V1, V2, V3, V4, V5 = (f"scn-v{i}" for i in range(1, 6))
HOST_COMMANDS = ("provision", "release-conf", "ecosystem", "env", "nginx-site")

story = Story()
story_outcomes = story.fixture()


class Stack(DeployStack):
    """The stack under test: its config, the engine that deploys it and views of the host."""

    def __init__(self, host: TargetHost, tmp: Path) -> None:
        super().__init__(host.config, tmp, secretEnv={"FIXTURE_ECHO": "secret-one"})
        self.host = host

    # -- the host
    def get(self, path: str) -> httpx.Response:
        return http_get(self.host.nginx.url(path), timeout=5)

    def serving(self) -> dict[str, Any]:
        response = self.get("/release")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def tool(self, *args: str) -> str:
        proc = self.host.run(" ".join(["cognivern-release", "--root", str(self.host.root), *args]), check=True)
        return proc.stdout

    def releases(self) -> dict[str, str]:
        listing = json.loads(self.tool("list", "--json"))
        return {r["id"]: r["state"] for r in listing["releases"]}

    def release_dirs(self) -> set[str]:
        return {p.name for p in (self.host.root / "releases").iterdir()}

    def current(self) -> str:
        return os.readlink(self.host.root / "current").rsplit("/", 1)[-1]

    def pm2_apps(self) -> dict[str, str]:
        proc = run_pm2(self.host.app_user, self.host.app_home, self.host.pm2_home, "jlist")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        return {p["name"]: p["pm2_env"]["status"] for p in json.loads(out)}

    def snapshot(self) -> dict[str, tuple[str, int, str]]:
        """Every file, link and directory the deploy manages (not the app's logs/data), with content digests."""
        out: dict[str, tuple[str, int, str]] = {}
        skip = {self.host.root / "shared" / "logs", self.host.root / "shared" / "data", self.host.root / "backups"}
        for base in (self.host.root, self.host.bin_dir, self.host.nginx.sites_available, self.host.nginx.sites_enabled):
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
                for name in dirnames + filenames:
                    path = Path(dirpath, name)
                    st = path.lstat()
                    if stat.S_ISLNK(st.st_mode):
                        kind, detail = "link", os.readlink(path)
                    elif stat.S_ISREG(st.st_mode):
                        kind, detail = "file", f"{st.st_size}:{st.st_mtime_ns}"
                    else:
                        kind, detail = "dir", ""
                    out[str(path)] = (kind, st.st_mode, detail)
        return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with TargetHost() as host:
        yield Stack(host, tmp_path_factory.mktemp("scenarios"))


class Poller:
    """GET /release through nginx every 50 ms in a thread; what each request got."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with http_client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(self.url)
                    self.results.append(r.json()["release"] if r.status_code == 200 else f"HTTP {r.status_code}")
                except (httpx.HTTPError, ValueError, KeyError) as err:
                    self.results.append(f"error {type(err).__name__}")
                time.sleep(0.05)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@story.stage
def test_01_a_fresh_host_is_prepared_and_v1_goes_live(stack: Stack) -> None:
    report = stack.up(release=V1, artifact=stack.artifact(V1))
    assert set(report.ops().values()) == {"create"}, report.summary()
    assert len(report.ops()) == len(HOST_COMMANDS) + 3  # host commands + upload, install, activate
    order = [s.name.rsplit("-", 1)[-1] for s in report.steps]
    assert order[0] == "provision" and order[-3:] == ["upload", "install", "activate"]

    assert stack.serving()["release"] == V1
    assert stack.get("/health").json()["status"] == "ok"
    assert stack.serving()["env"]["FIXTURE_ECHO"] == "secret-one"
    assert report.outputs["activeRelease"] == V1 and report.outputs["previousRelease"] is None

    root, host = stack.host.root, stack.host
    tool = host.bin_dir / "cognivern-release"
    assert tool.stat().st_mode & 0o777 == 0o755
    env = root / "shared" / ".env"
    # root's (the app cannot change the values the tool masks), readable by the app's group
    assert env.stat().st_mode & 0o777 == 0o640 and (env.owner(), env.group()) == ("root", host.app_user)
    assert "FIXTURE_ECHO=secret-one" in env.read_text()
    assert stack.current() == V1
    assert (root / "incoming" / f"cognivern-{V1}.tar.gz").exists()
    assert [p.name for p in host.nginx.sites_enabled.iterdir()] == ["cognivern-agent.conf"]
    assert stack.pm2_apps() == {"cognivern-agent-blue": "online"}
    # the secret .env travels on stdin, never in a command string
    assert not [c for c in report.commands if "secret-one" in c]


@story.stage
def test_02_a_second_run_with_no_change_executes_nothing(stack: Stack) -> None:
    before = stack.snapshot()
    preview = stack.preview()
    assert set(preview.ops().values()) == {"same"} and preview.commands == []
    report = stack.up()
    assert set(report.ops().values()) == {"same"}
    assert report.commands == []
    assert stack.snapshot() == before
    assert report.outputs["activeRelease"] == V1


@story.stage
def test_03_v2_goes_live(stack: Stack) -> None:
    report = stack.up(release=V2, artifact=stack.artifact(V2))
    ops = report.ops()
    assert {ops[f"cognivern-test-{c}"] for c in HOST_COMMANDS} == {"same"}
    assert {ops[f"cognivern-test-release-{c}"] for c in ("upload", "install", "activate")} == {"replace"}
    assert stack.serving()["release"] == V2
    assert stack.current() == V2
    assert report.outputs["activeRelease"] == V2 and report.outputs["previousRelease"] == V1
    assert stack.releases() == {V2: "current", V1: "previous"}


@story.stage
def test_04_rollback_to_v1_by_config_alone_without_an_artifact(stack: Stack) -> None:
    assert not (REPO / ".artifacts" / f"cognivern-{V1}.tar.gz").exists()
    before_incoming = sorted(p.name for p in (stack.host.root / "incoming").iterdir())
    report = stack.up(release=V1, artifact=None)
    ops = report.ops()
    assert ops["cognivern-test-release-upload"] == "delete"  # no artifact: no upload resource (and no file removed)
    assert ops["cognivern-test-release-install"] == "replace" and ops["cognivern-test-release-activate"] == "replace"
    install = report.step("release-install", "replace")
    assert install.commands == [f"cognivern-release --root {stack.host.root} install {V1} - -"]
    assert sorted(p.name for p in (stack.host.root / "incoming").iterdir()) == before_incoming
    assert stack.serving()["release"] == V1
    assert report.outputs["activeRelease"] == V1 and report.outputs["previousRelease"] == V2


@story.stage
def test_05_a_broken_v3_fails_the_run_while_v1_keeps_serving(stack: Stack) -> None:
    artifact = stack.artifact(V3, mode="crash")
    with Poller(stack.host.nginx.url("/release")) as poller:
        report = stack.up(release=V3, artifact=artifact, check=False)
        time.sleep(0.3)
    assert isinstance(report.error, CommandError), report.summary()
    assert "activate" in str(report.error) and "did not start healthy in slot green" in report.error.stderr
    ops = report.ops()
    assert ops["cognivern-test-release-upload"] == "create" and ops["cognivern-test-release-install"] == "replace"
    assert ops["cognivern-test-release-activate"] == "failed"
    assert report.steps[-1].name.endswith("activate")  # nothing ran after the failure
    assert poller.results and set(poller.results) == {V1}, poller.results
    assert stack.serving()["release"] == V1 and stack.current() == V1
    assert stack.releases()[V3] == "bad"
    # the state keeps what succeeded (upload and install of v3) and the old activate (v1)
    state = {r["name"]: r for r in stack.engine.state()["resources"].values()}
    assert state["cognivern-test-release-install"]["inputs"]["triggers"][0] == V3
    assert state["cognivern-test-release-activate"]["inputs"]["triggers"][0] == V1


@story.stage
def test_06_a_changed_secret_is_written_safely_and_the_app_reloaded(stack: Stack) -> None:
    marker = stack.tmp / "must-not-exist"
    tricky = f'it\'s $(touch {marker}) `touch {marker}` "q" ;|& $HOME'
    pid_before = stack.serving()["pid"]
    report = stack.up(release=V1, artifact=None, secretEnv={"FIXTURE_ECHO": tricky})
    ops = report.ops()
    assert ops["cognivern-test-env"] == "update"
    assert ops["cognivern-test-release-activate"] == "same"
    assert {ops[f"cognivern-test-{c}"] for c in HOST_COMMANDS if c != "env"} == {"same"}
    env_file = (stack.host.root / "shared" / ".env").read_text()
    assert "FIXTURE_ECHO='it'\"'\"'s $(touch" in env_file  # shell-quoted, so `set -a; . .env` reads it verbatim
    assert not marker.exists()
    assert not [c for c in report.commands if "it's" in c]  # the secret rides on stdin, not in a command
    env_state = next(r for r in stack.engine.state()["resources"].values() if r["name"] == "cognivern-test-env")
    assert "it's" not in json.dumps(env_state["outputs"])
    assert stack.serving()["release"] == V1 and stack.serving()["pid"] != pid_before  # reloaded


@story.stage
def test_06b_the_changed_secret_reaches_the_running_app(stack: Stack) -> None:
    assert stack.serving()["env"]["FIXTURE_ECHO"] == stack.settings["secretEnv"]["FIXTURE_ECHO"]


@story.stage
def test_07_agents_enabled_starts_and_stops_the_forecasting_agent(stack: Stack) -> None:
    report = stack.up(agentsEnabled=True)
    assert report.ops()["cognivern-test-ecosystem"] == "update" and report.ops()["cognivern-test-env"] == "update"
    assert stack.pm2_apps() == {"cognivern-agent-blue": "online", "forecasting-agent": "online"}
    assert "AGENTS_ENABLED=true" in (stack.host.root / "shared" / ".env").read_text()

    stack.up(agentsEnabled=False)
    assert stack.pm2_apps() == {"cognivern-agent-blue": "online"}
    assert "AGENTS_ENABLED=false" in (stack.host.root / "shared" / ".env").read_text()


@story.stage
def test_07b_the_running_app_sees_agents_enabled(stack: Stack) -> None:
    stack.up(agentsEnabled=True)
    try:
        assert stack.serving()["env"]["AGENTS_ENABLED"] == "true"
    finally:
        stack.up(agentsEnabled=False)
    assert stack.serving()["env"]["AGENTS_ENABLED"] == "false"


@story.stage
def test_08_keep_releases_holds(stack: Stack) -> None:
    stack.up(release=V4, artifact=stack.artifact(V4), keepReleases=2)
    # newest 2 (v4, v3) plus current (v4) and previous (v1); v2 pruned
    assert stack.release_dirs() == {V4, V3, V1}
    assert stack.releases() == {V4: "current", V3: "bad", V1: "previous"}

    report = stack.up(release=V5, artifact=stack.artifact(V5))
    assert stack.release_dirs() == {V5, V4}  # only current and previous remain
    assert report.outputs["releases"] and {r["id"] for r in report.outputs["releases"]} == {V5, V4}
    assert stack.serving()["release"] == V5


@pytest.mark.parametrize(
    "change",
    [
        {"release": "scn-v6;touch /tmp/pwned"},
        {"release": "$(id)"},
        {"env": {"BAD;NAME": "x"}},
        {"secretEnv": {"FIXTURE_ECHO": "two\nlines"}},
        {"appUser": "app;user"},
        {"root": "/tmp/a b"},
    ],
    ids=["release-semicolon", "release-subst", "env-name", "env-newline", "app-user", "root-space"],
)
def test_09_shell_metacharacters_are_refused_before_anything_reaches_the_host(stack: Stack, change: dict[str, Any]) -> None:
    before, state_before = stack.snapshot(), stack.engine.state()
    saved = dict(stack.settings)
    try:
        report = stack.engine.up(stack.config(**change), secret_keys=SECRET_KEYS, check=False)
    finally:
        stack.settings = saved
    assert isinstance(report.error, RunError), report.summary()
    assert report.steps == [] and report.commands == []
    assert stack.snapshot() == before
    assert stack.engine.state() == state_before
    assert not Path("/tmp/pwned").exists()


@story.stage
def test_10_the_stack_settles(stack: Stack) -> None:
    report = stack.up()
    assert report.commands == [] and set(report.ops().values()) == {"same"}
    assert stack.serving()["release"] == V5


def ops(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """scripts/ops against the test host (COGNIVERN_SSH stands in for the stack's sshCommand output)."""
    assert stack.host.sshd is not None
    env = {**os.environ, "COGNIVERN_SSH": " ".join(stack.host.sshd.ssh_argv()), "COGNIVERN_ROOT": str(stack.host.root)}
    return subprocess.run([str(REPO / "scripts" / "ops"), "test", *args], capture_output=True, text=True, env=env, timeout=120, check=False)


@story.stage
def test_11_operator_commands_from_the_runbook(stack: Stack) -> None:
    listed = ops(stack, "list")
    assert listed.returncode == 0, listed.stderr
    assert any(V5 in line and "current" in line for line in listed.stdout.splitlines()), listed.stdout
    assert ops(stack, "status").returncode == 0
    logs = ops(stack, "logs")
    assert logs.returncode == 0 and "out.log" in logs.stdout + logs.stderr

    data = stack.host.root / "shared" / "data" / "ops.json"
    data.write_text('{"v": 1}\n')
    backup = ops(stack, "backup")
    assert backup.returncode == 0, backup.stderr
    archive = Path(backup.stdout.strip().splitlines()[-1])
    assert archive.is_file() and archive.parent == stack.host.root / "backups" / "data"
    data.write_text('{"v": "corrupted"}\n')
    restored = ops(stack, "restore", archive.name)
    assert restored.returncode == 0, restored.stderr
    assert data.read_text() == '{"v": 1}\n'
    assert stack.serving()["release"] == V5

    refused = ops(stack, "activate", "x;touch /tmp/pwned-ops")
    assert refused.returncode == 2 and not Path("/tmp/pwned-ops").exists()


@story.stage
def test_12_emergency_rollback_without_pulumi_then_the_stack_follows(stack: Stack) -> None:
    rolled = ops(stack, "activate", V4)
    assert rolled.returncode == 0, rolled.stderr
    assert f"scripts/pulumi-local test config set cognivern:release {V4}" in rolled.stderr
    assert stack.serving()["release"] == V4 and stack.current() == V4
    # bringing the stack in line: the same id in config; the run only confirms it (no switch, no downtime)
    report = stack.up(release=V4, artifact=None)
    assert report.ops()["cognivern-test-release-activate"] == "replace"
    assert stack.serving()["release"] == V4
    assert report.outputs["activeRelease"] == V4
