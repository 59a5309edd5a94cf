"""`pulumi up` on our machines: the real engine (CLI, language host, pulumi-command) against a real target.

One disposable TargetHost (private sshd, private nginx, temp ROOT, unique app user) is shared by the
scenarios below, stages of one stack's history (tests/support/story.py: a test alone or in any order
first runs the stages before it, in file order): a fresh host goes live on v1, a no-op run executes
nothing, v2 follows under 8 clients, config alone rolls back to v1, releases that crash at boot,
never get healthy, crash after the switch or crash-loop fail the run while v1 keeps serving, a
secret rotation reaches the app, the agent is switched on and off, a stack without secrets deploys,
keepReleases prunes, bad values are refused before anything reaches the host, refresh changes
nothing, and destroy leaves releases and data on the server. Every run is `scripts/pulumi-local
STACK up` of the real `__main__.py` with config set as the README says (tests/support/real_engine.py),
and every run's output is checked to read as the engine's and the tool's messages (no traceback).
HTTP goes through nginx; files are checked on the host.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.load import Load
from tests.support.program import REPO
from tests.support.real_engine import is_secret
from tests.support.stack import RELEASE_STEPS, TargetStack
from tests.support.story import Story
from tests.support.target_host import TargetHost

V1, V2, V3, V4, V5 = (f"scn-v{i}" for i in range(1, 6))
HOST_COMMANDS = ("provision", "env-preload", "ecosystem", "env", "nginx-site", "tool-install", "tool-conf")
SECRET = "secret-one"

story = Story()
story_outcomes = story.fixture()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TargetStack]:
    with TargetHost() as host:
        yield TargetStack(host, tmp_path_factory.mktemp("scenarios"), secretEnv={"FIXTURE_ECHO": SECRET})


def serving_under_load(stack: TargetStack) -> Load:
    """8 clients through nginx on /release and /health while a run changes what serves them."""
    return Load([stack.host.nginx.url("/release"), stack.host.nginx.url("/health")], clients=8)


@story.stage
def test_01_a_fresh_host_is_prepared_and_v1_goes_live(stack: TargetStack) -> None:
    report = stack.up(release=V1, artifact=stack.artifact(V1))
    assert set(report.ops().values()) == {"create"}, report.summary()
    assert len(report.ops()) == len(HOST_COMMANDS) + len(RELEASE_STEPS)
    order = [s.name.rsplit("-", 1)[-1] for s in report.steps]
    assert order[0] == "provision" and order[-3:] == list(RELEASE_STEPS)

    assert stack.serving()["release"] == V1
    assert stack.get("/health").json()["status"] == "ok"
    assert stack.serving()["env"]["FIXTURE_ECHO"] == SECRET
    assert report.outputs["activeRelease"] == V1 and "previousRelease" not in report.outputs  # None is not exported

    root, host = stack.host.root, stack.host
    tool = host.bin_dir / "cognivern-release"
    assert tool.stat().st_mode & 0o777 == 0o755
    env = root / "shared" / ".env"
    assert env.stat().st_mode & 0o777 == 0o640 and (env.owner(), env.group()) == ("root", host.app_user)  # the app reads, root writes
    assert f"FIXTURE_ECHO={SECRET}" in env.read_text()
    assert stack.current() == V1
    assert (root / "incoming" / f"cognivern-{V1}.tar.gz").exists()
    assert [p.name for p in host.nginx.sites_enabled.iterdir()] == ["cognivern-agent.conf"]
    assert stack.pm2_apps() == {"cognivern-agent-blue": "online"}
    # the secret .env travels on stdin, never in a command string
    assert not [c for c in report.commands if SECRET in c]


@story.stage
def test_02_a_second_run_with_no_change_executes_nothing(stack: TargetStack) -> None:
    before = stack.snapshot()
    preview = stack.preview()
    assert set(preview.ops().values()) == {"same"} and preview.commands == []
    report = stack.up()
    assert set(report.ops().values()) == {"same"} and len(report.ops()) == len(HOST_COMMANDS) + len(RELEASE_STEPS)
    assert report.commands == []
    assert stack.snapshot() == before
    assert report.outputs["activeRelease"] == V1


@story.stage
def test_03_v2_goes_live_under_load_without_a_failed_request(stack: TargetStack) -> None:
    artifact = stack.artifact(V2)
    with serving_under_load(stack) as load:
        started = time.monotonic()
        report = stack.up(release=V2, artifact=artifact)
        wait_for_release(load, V2, started)
    assert load.failures == [], load.failures
    ops = report.ops()
    assert {ops[f"cognivern-test-{c}"] for c in HOST_COMMANDS} == {"same"}
    assert {c: ops[f"cognivern-test-release-{c}"] for c in RELEASE_STEPS} == {"upload": "replace", "activate": "replace", "prune": "same"}
    assert set(load.served()) - {"ok"} == {V1, V2}  # "ok": the /health answers
    assert stack.serving()["release"] == V2 and stack.current() == V2
    assert report.outputs["activeRelease"] == V2 and report.outputs["previousRelease"] == V1
    assert stack.releases() == {V2: "current", V1: "previous"}


def wait_for_release(load: Load, release: str, since: float) -> None:
    """A few more requests after the run, so the load has seen the release it switched to."""
    deadline = time.monotonic() + 5
    while load.first(release, since) is None and time.monotonic() < deadline:
        time.sleep(0.05)


@story.stage
def test_04_rollback_to_v1_by_config_alone_without_an_artifact(stack: TargetStack) -> None:
    assert not (REPO / ".artifacts" / f"cognivern-{V1}.tar.gz").exists()
    before_incoming = sorted(p.name for p in (stack.host.root / "incoming").iterdir())
    report = stack.up(release=V1, artifact=None)
    ops = report.ops()
    assert ops["cognivern-test-release-upload"] == "delete"  # no artifact: no upload resource (and no file removed)
    assert ops["cognivern-test-release-activate"] == "replace"
    assert report.commands == [f"cognivern-release --root {stack.host.root} deploy {V1} - -"]  # one SSH command
    assert sorted(p.name for p in (stack.host.root / "incoming").iterdir()) == before_incoming
    assert stack.serving()["release"] == V1
    assert report.outputs["activeRelease"] == V1 and report.outputs["previousRelease"] == V2


# A release that fails: the fixture mode, what the tool says, where (the start's health gate or the bake).
FAILURES = {
    "boot-crash": ("crash", "did not start healthy in slot green"),
    "unhealthy": ("unhealthy", "did not start healthy in slot green"),
    "crash-after-switch": ("crash-after", "failed its bake"),
    "crash-loop": ("crash-loop-after", "failed its bake"),
}


@story.stage
def test_05_failing_releases_fail_the_run_while_v1_keeps_serving(stack: TargetStack) -> None:
    """Each failure mode in turn: the run fails at activate, no client sees an error, v1 stays current."""
    for index, (name, (mode, says)) in enumerate(FAILURES.items()):
        release = f"{V3}-{name}"
        artifact = stack.artifact(release, mode=mode, delayMs=3000)
        with serving_under_load(stack) as load:
            report = stack.up(release=release, artifact=artifact, bakeSeconds=8, check=False)
            time.sleep(0.3)
        assert not report.ok and [s.name for s in report.failed] == ["cognivern-test-release-activate"], report.summary()
        assert says in report.step("release-activate").error, report.output  # type: ignore[operator]
        assert report.steps[-1].name.endswith("activate")  # nothing ran after the failure
        ops = report.ops()
        assert ops["cognivern-test-release-upload"] == ("create" if index == 0 else "replace")
        assert load.failures == [], (name, load.failures)
        assert stack.serving()["release"] == V1 and stack.current() == V1, name
        assert stack.releases()[release] == "bad", name
        # the state keeps what succeeded (the new release's upload) and v1's activate; an upload it
        # replaced waits as a pending delete (nothing runs for it: no delete command)
        assert stack.release_state() == {"upload": release, "activate": V1}, name
        assert index == 0 or "cognivern-test-release-upload" in stack.engine.resources(pending_deletes=True)
    stack.up(release=V1, artifact=None, bakeSeconds=2)  # back in line: the stack's release is v1 again


@story.stage
def test_05b_a_failed_run_reads_as_the_tools_explanation(stack: TargetStack) -> None:
    """What the operator's terminal shows for a release that cannot start: why, the error log, what still serves."""
    release = f"{V3}-readable"
    report = stack.up(release=release, artifact=stack.artifact(release, mode="crash"), check=False)
    assert not report.ok
    text = report.output
    for line in (
        "did not start healthy in slot green",
        f"fixture {release}: crashing at boot on purpose",
        f"current ({V1}) was not switched; nginx still serves it",
    ):
        assert line in text, text
    stack.up(release=V1, artifact=None)


@story.stage
def test_06_a_changed_secret_is_written_safely_and_the_app_reloaded(stack: TargetStack) -> None:
    marker = stack.tmp / "must-not-exist"
    tricky = f'it\'s $(touch {marker}) `touch {marker}` "q" ;|& $HOME'
    pid_before = stack.serving()["pid"]
    report = stack.up(secretEnv={"FIXTURE_ECHO": tricky})
    ops = report.ops()
    assert ops["cognivern-test-env"] == "update"
    assert ops["cognivern-test-release-activate"] == "same"
    assert {ops[f"cognivern-test-{c}"] for c in HOST_COMMANDS if c != "env"} == {"same"}
    env_file = (stack.host.root / "shared" / ".env").read_text()
    assert "FIXTURE_ECHO='it'\"'\"'s $(touch" in env_file  # shell-quoted, so `set -a; . .env` reads it verbatim
    assert not marker.exists()
    assert not [c for c in report.commands if "it's" in c]  # the secret rides on stdin, not in a command
    assert "it's" not in report.output
    assert stack.serving()["release"] == V1 and stack.serving()["pid"] != pid_before  # reloaded
    assert stack.serving()["env"]["FIXTURE_ECHO"] == tricky


@story.stage
def test_06b_no_secret_reaches_the_state_the_export_or_the_stack_file_in_clear_text(stack: TargetStack) -> None:
    secrets = [SECRET, stack.settings["secretEnv"]["FIXTURE_ECHO"], stack.host.config()["sshPrivateKey"].splitlines()[1]]
    exported = json.dumps(stack.engine.export())
    for place, text in (("raw state", stack.engine.raw_state()), ("stack export", exported), ("stack file", stack.engine.stack_file())):
        for secret in secrets:
            assert secret not in text, f"a secret in clear text in the {place}"
    env_state = stack.engine.resources()["cognivern-test-env"]
    assert is_secret(env_state["outputs"]["stdout"]) and is_secret(env_state["inputs"]["stdin"])


@story.stage
def test_07_agents_enabled_starts_and_stops_the_forecasting_agent(stack: TargetStack) -> None:
    report = stack.up(agentsEnabled=True)
    assert report.ops()["cognivern-test-ecosystem"] == "update" and report.ops()["cognivern-test-env"] == "update"
    assert stack.pm2_apps() == {"cognivern-agent-blue": "online", "forecasting-agent": "online"}
    assert "AGENTS_ENABLED=true" in (stack.host.root / "shared" / ".env").read_text()
    assert stack.serving()["env"]["AGENTS_ENABLED"] == "true"

    stack.up(agentsEnabled=False)
    assert stack.pm2_apps() == {"cognivern-agent-blue": "online"}
    assert "AGENTS_ENABLED=false" in (stack.host.root / "shared" / ".env").read_text()
    assert stack.serving()["env"]["AGENTS_ENABLED"] == "false"


@story.stage
def test_07b_a_stack_with_no_secret_env_at_all_deploys(stack: TargetStack) -> None:
    """`config rm cognivern:secretEnv`: the program gets Pulumi.yaml's plain `{}`, which holds nothing secret."""
    report = stack.up(secretEnv=None)
    assert report.ops()["cognivern-test-env"] == "update"
    assert "FIXTURE_ECHO" not in (stack.host.root / "shared" / ".env").read_text()
    assert "FIXTURE_ECHO" not in stack.serving()["env"], "a removed variable leaves the app at the reload (env-preload.cjs)"
    assert "secretEnv" not in stack.engine.stack_file()
    assert stack.serving()["release"] == V1
    stack.up(secretEnv={"FIXTURE_ECHO": SECRET})
    assert stack.serving()["env"]["FIXTURE_ECHO"] == SECRET


@story.stage
def test_08_keep_releases_holds(stack: TargetStack) -> None:
    stack.up(release=V4, artifact=stack.artifact(V4), keepReleases=2)
    # newest 2 (v4 and the last bad one) plus current (v4) and previous (v1); v2 pruned
    dirs = stack.release_dirs()
    assert {V4, V1} <= dirs and V2 not in dirs and len(dirs) == 3, dirs
    assert stack.releases()[V4] == "current" and stack.releases()[V1] == "previous"

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
def test_09_shell_metacharacters_are_refused_before_anything_reaches_the_host(stack: TargetStack, change: dict[str, Any]) -> None:
    before, state_before = stack.snapshot(), stack.engine.resources(masked=True)
    saved = dict(stack.settings)
    try:
        report = stack.up(check=False, **change)
    finally:
        stack.settings = saved
    assert not report.ok and report.program_error is not None, report.summary()
    assert report.steps == [] and report.commands == []
    assert stack.snapshot() == before
    assert stack.engine.resources(masked=True) == state_before
    assert not Path("/tmp/pwned").exists()


@story.stage
def test_10_refresh_then_up_changes_nothing(stack: TargetStack) -> None:
    before = stack.snapshot()
    refreshed = stack.engine.refresh()
    assert refreshed.commands == [] and stack.snapshot() == before
    report = stack.up()  # also puts back any config test_09 left
    assert report.commands == [] and set(report.ops().values()) == {"same"}, report.summary()
    assert stack.serving()["release"] == V5


def ops(stack: TargetStack, *args: str) -> subprocess.CompletedProcess[str]:
    """scripts/ops against the test host (COGNIVERN_SSH stands in for the stack's sshCommand output)."""
    assert stack.host.sshd is not None
    env = {**os.environ, "COGNIVERN_SSH": " ".join(stack.host.sshd.ssh_argv()), "COGNIVERN_ROOT": str(stack.host.root)}
    return subprocess.run([str(REPO / "scripts" / "ops"), "test", *args], capture_output=True, text=True, env=env, timeout=120, check=False)


@story.stage
def test_11_operator_commands_from_the_runbook(stack: TargetStack) -> None:
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
def test_12_emergency_rollback_without_pulumi_then_the_stack_follows(stack: TargetStack) -> None:
    rolled = ops(stack, "activate", V4)
    assert rolled.returncode == 0, rolled.stderr
    assert f"scripts/pulumi-local test config set cognivern:release {V4}" in rolled.stderr
    assert stack.serving()["release"] == V4 and stack.current() == V4
    # bringing the stack in line: the same id in config; the run only confirms it (no switch, no downtime)
    report = stack.up(release=V4, artifact=None)
    assert report.ops()["cognivern-test-release-activate"] == "replace"
    assert stack.serving()["release"] == V4
    assert report.outputs["activeRelease"] == V4


@story.stage
def test_13_destroy_forgets_the_stack_but_leaves_releases_data_and_the_serving_app(stack: TargetStack) -> None:
    data = stack.host.root / "shared" / "data" / "kept.json"
    data.write_text('{"kept": true}\n')
    dirs, before = stack.release_dirs(), stack.snapshot()
    report = stack.engine.destroy()
    assert set(report.ops().values()) == {"delete"} and report.commands == []  # the commands have no delete
    assert stack.engine.resources() == {}
    assert stack.release_dirs() == dirs and data.read_text() == '{"kept": true}\n'
    assert stack.snapshot() == before
    assert stack.serving()["release"] == V4
    # and a later `pulumi up` adopts the host again: provisioning says "already", the release is kept current
    again = stack.up()
    assert set(again.ops().values()) == {"create"}
    assert stack.serving()["release"] == V4 and stack.current() == V4 and data.exists()
