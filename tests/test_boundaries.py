"""Only what changed runs (issue 22): one change at a time, on the real engine and a real host.

One TargetHost (private sshd, nginx, ROOT, unique app user) and one stack deployed by the real
engine. Each stage (tests/support/story.py: stages run in file order, a test alone first runs the
ones before it) makes one change of the table below and proves its row:
- `pulumi preview --diff` names only those resources: the preview is compared with a golden file
  (tests/goldens/preview/<name>.txt; tests/support/goldens.py normalises what varies between runs;
  GOLDEN_UPDATE=1 rewrites them, and a golden that changes is reviewed like code);
- `pulumi up` executes only those steps (the engine's own event log), and on the host only those
  commands;
- PM2's restart counters and the app's pids are unchanged wherever no restart is expected, and
  nginx's workers wherever no reload is;
- 8 clients through nginx see no failed request, from before the preview to after the run.

| change | runs | must not happen |
|---|---|---|
| release id | upload (when there is an artifact) and deploy (install + activate) | provision |
| keepReleases | the prune command | any app process restarted |
| release tool or PM2 helper edited | the tool's install | provision, restarts |
| a secretEnv or env value (or a removed one) | .env rewritten, then one graceful reload | a new slot start |
| an nginx setting | the site rendered, nginx -t, nginx reloaded | app restart |
| bakeSeconds, health settings | the config file rewritten | activation |
| a host-key pin | every command's connection is updated; on the server nothing changes | a provision, an activation, a reload |
| nothing | nothing | anything |

No golden holds a secret (checked on the files).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.tool import RELEASE_PACKAGE
from tests.support.goldens import GOLDENS, Run, assert_golden, normalise
from tests.support.helpers import run_pm2
from tests.support.load import Load
from tests.support.real_engine import PASSPHRASE
from tests.support.release_host import read_state
from tests.support.stack import TargetStack
from tests.support.story import Story
from tests.support.target_host import TargetHost, node_major

V1, V2 = "gold-v1", "gold-v2"
SECRET, ROTATED = "golden-secret-one", "golden-secret-rotated"
SECOND = "127.0.0.2"  # the second server of the "second server" preview: a preview connects to nothing
NODE = "cognivern-test"

story = Story()
story_outcomes = story.fixture()

Pm2 = dict[str, list[tuple[int, int]]]


class Stack(TargetStack):
    def __init__(self, host: TargetHost, tmp: Path) -> None:
        super().__init__(host, tmp, secretEnv={"FIXTURE_ECHO": SECRET})

    def config(self, **changes: Any) -> dict[str, str]:
        cfg = super().config(**changes)
        if self.settings.get("hosts") is not None:
            cfg.pop("host")  # TargetHost.config names `host`; a `hosts` stack has none
        return cfg

    def run_values(self) -> Run:
        """What this host and this run picked, as the goldens' placeholders."""
        host, sshd = self.host, self.host.sshd
        assert sshd is not None
        return Run(
            {
                str(host.root): "<ROOT>",
                str(self.tmp): "<TMP>",
                host.app_user: "<APP_USER>",
                sshd.host_key: "<HOST_KEY>",
                f"-p {sshd.port} ": "-p <SSH_PORT> ",
                f"]:{sshd.port} ": "]:<SSH_PORT> ",
                f"127.0.0.1:{host.nginx.port}": "127.0.0.1:<SITE_PORT>",
                f"PORT={host.app_port}\n": "PORT=<APP_PORT>\n",
                f"PORT = {host.app_port};": "PORT = <APP_PORT>;",
                f"server 127.0.0.1:{host.app_port};": "server 127.0.0.1:<APP_PORT>;",
                f"server 127.0.0.1:{host.app_port} ": "server 127.0.0.1:<APP_PORT> ",
                f"server 127.0.0.1:{host.app_port + 1} ": "server 127.0.0.1:<APP_PORT+1> ",
                f'"port": {host.app_port}}}': '"port": <APP_PORT>}',
                f'"port": {host.app_port + 1}}}': '"port": <APP_PORT+1>}',
                f"--node-major {node_major()} ": "--node-major <NODE_MAJOR> ",
            }
        )

    def pm2(self) -> Pm2:
        """PM2 app -> (pid, restart count) of each process."""
        proc = run_pm2(self.host.app_user, self.host.app_home, self.host.pm2_home, "jlist")
        assert proc.returncode == 0, proc.stderr
        out: Pm2 = {}
        for p in json.loads(proc.stdout):
            out.setdefault(p["name"], []).append((p["pid"], p["pm2_env"]["restart_time"]))
        return out

    def nginx_workers(self) -> set[int]:
        return self.host.nginx.worker_pids()

    def tool_log(self) -> list[str]:
        return (self.host.root / ".deploy" / "releases.log").read_text().splitlines()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with TargetHost() as host:
        yield Stack(host, tmp_path_factory.mktemp("boundaries"))


class Change:
    """One change under 8 clients: its preview (kept as a golden), then its `pulumi up`, with the
    host's PM2 processes, nginx workers and tool log taken before and after."""

    def __init__(self, stack: Stack, golden: str, **change: Any) -> None:
        self.stack = stack
        pm2, workers, log = stack.pm2(), stack.nginx_workers(), stack.tool_log()
        with Load([stack.host.nginx.url("/release"), stack.host.nginx.url("/health")], clients=8) as load:
            self.preview = stack.preview(**change)
            self.started = time.monotonic()
            self.report = stack.up()
            time.sleep(0.5)
        self.load = load
        self.golden = normalise(self.preview.text, stack.run_values())
        assert_golden(golden, self.golden)
        self.pm2_before, self.pm2_after = pm2, stack.pm2()
        self.workers_before, self.workers_after = workers, stack.nginx_workers()
        self.log = stack.tool_log()[len(log) :]
        assert load.failures == [], load.failures

    def ran(self) -> dict[str, str]:
        """Resource -> operation of every step that was not `same` (a replaced copy's later delete is not its op)."""
        return self.report.ops(include_same=False)

    def assert_no_restart(self) -> None:
        assert self.pm2_after == self.pm2_before, "an app process was restarted"

    def assert_nginx_not_reloaded(self) -> None:
        assert self.workers_after == self.workers_before, "nginx was reloaded"


def name(role: str) -> str:
    return f"{NODE}-{role}"


@story.stage
def test_01_a_fresh_host_goes_live_on_v1(stack: Stack) -> None:
    report = stack.up(release=V1, artifact=stack.artifact(V1))
    assert set(report.ops().values()) == {"create"}, report.summary()
    assert stack.serving()["release"] == V1 and stack.serving()["env"]["FIXTURE_ECHO"] == SECRET


@story.stage
def test_02_nothing_changed_runs_nothing(stack: Stack) -> None:
    change = Change(stack, "nothing")
    assert change.preview.ops(include_same=False) == {} and change.ran() == {}
    assert change.report.commands == [] and change.log == []
    change.assert_no_restart()
    change.assert_nginx_not_reloaded()


@story.stage
def test_03_keep_releases_runs_a_prune_only(stack: Stack) -> None:
    change = Change(stack, "keep-releases", keepReleases=4)
    assert change.ran() == {name("release-prune"): "replace"}, change.report.summary()
    assert change.report.commands == [f"cognivern-release --root {stack.host.root} prune --keep 4"]
    assert [line.split()[1] for line in change.log] == ["prune"]
    assert read_state(stack.host.root)["keep_releases"] == 4, "remembered in the tool's JSON state"
    change.assert_no_restart()
    change.assert_nginx_not_reloaded()


@story.stage
def test_04_bake_and_health_settings_rewrite_the_config_file_only(stack: Stack) -> None:
    change = Change(stack, "bake-and-health", bakeSeconds=3, healthTimeout=12)
    assert change.ran() == {name("tool-conf"): "update"}, change.report.summary()
    conf = (stack.host.root / "config" / "cognivern.conf").read_text()
    assert "BAKE_SECONDS=3" in conf and "HEALTH_TIMEOUT=12" in conf
    assert change.log == [], "no activation, no tool run at all"
    change.assert_no_restart()
    change.assert_nginx_not_reloaded()


@story.stage
def test_05_an_nginx_setting_renders_tests_and_reloads_nginx_only(stack: Stack) -> None:
    change = Change(stack, "nginx-setting", framePolicy="deny")
    assert change.ran() == {name("nginx-site"): "update"}, change.report.summary()
    assert stack.get("/release").headers["x-frame-options"] == "DENY"
    assert change.workers_after != change.workers_before, "nginx was reloaded"
    assert change.log == []
    change.assert_no_restart()


def live_slot(stack: Stack) -> str:
    return f"cognivern-agent-{read_state(stack.host.root)['slots']['live']}"


@story.stage
def test_06_a_secret_rotation_rewrites_env_and_reloads_the_live_slot_once(stack: Stack) -> None:
    slots = read_state(stack.host.root)["slots"]
    change = Change(stack, "secret-rotation", secretEnv={"FIXTURE_ECHO": ROTATED})
    assert "[secret] => [secret]" in change.golden
    assert change.ran() == {name("env"): "update"}, change.report.summary()
    live = live_slot(stack)
    before, after = change.pm2_before, change.pm2_after
    assert set(after) == set(before) == {live}, "no other slot started"
    assert [r for _, r in after[live]] == [r + 1 for _, r in before[live]], "one graceful reload"
    assert read_state(stack.host.root)["slots"] == slots
    assert [line.split()[1] for line in change.log] == ["reload"]
    assert stack.serving()["env"]["FIXTURE_ECHO"] == ROTATED
    assert ROTATED not in change.report.output and ROTATED not in change.preview.output
    change.assert_nginx_not_reloaded()


@story.stage
def test_07_a_removed_variable_leaves_the_app_at_the_reload(stack: Stack) -> None:
    """PM2 merges environments on reload; env-preload.cjs drops what .env no longer has."""
    change = Change(stack, "env-removal", secretEnv=None, env={"FIXTURE_PLAIN": "kept"})
    # the config file names the secret variables the tool masks in what it prints: one fewer now
    assert change.ran() == {name("env"): "update", name("tool-conf"): "update"}, change.report.summary()
    live = live_slot(stack)
    assert [r for _, r in change.pm2_after[live]] == [r + 1 for _, r in change.pm2_before[live]]
    assert "FIXTURE_ECHO" not in (stack.host.root / "shared" / ".env").read_text()
    serving = stack.serving()
    assert "FIXTURE_ECHO" not in serving["env"], "the removed variable is gone from the app"
    assert serving["names"] == ["FIXTURE_PLAIN"], "the new one is there, the preload's markers are not"


@story.stage
def test_08_an_edited_release_tool_is_reinstalled_and_nothing_else(stack: Stack) -> None:
    edited = (RELEASE_PACKAGE / "cli.py").read_text() + "# edited by test_boundaries\n"
    stack.engine.edit("components/release/cognivern_release/cli.py", edited)
    change = Change(stack, "tool-edit")
    assert change.ran() == {name("tool-install"): "update"}, change.report.summary()
    installed = (stack.host.bin_dir / "cognivern-release").resolve().parent
    assert (installed / "cognivern_release" / "cli.py").read_text() == edited
    assert "release tool: installed" in change.report.output
    assert change.log == []
    change.assert_no_restart()
    change.assert_nginx_not_reloaded()


@story.stage
def test_09_a_host_key_pin_changes_nothing_on_the_server(stack: Stack) -> None:
    """Every command holds the connection, so each is updated; none changes the server."""
    assert stack.host.sshd is not None
    before = stack.snapshot()
    change = Change(stack, "host-key-pin", hostKey=f"{stack.host.sshd.host_key} re-pinned")
    ran = change.ran()
    assert set(ran.values()) == {"update"} and set(ran) == set(stack.engine.resources()), change.report.summary()
    provision = change.report.step(name("provision"))
    assert provision.commands == ["true"], "provisioning is not run again"
    assert change.report.step(name("release-activate")).commands == [f"cognivern-release --root {stack.host.root} list --json"]
    assert change.report.step(name("release-prune")).commands == ["true"], "nothing is pruned"
    assert change.log == [], "the tool did nothing that it logs"
    after = stack.snapshot()
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert {p for p in changed if "/.deploy/" not in p} == set(), "no file of the deploy changed"
    change.assert_no_restart()
    change.assert_nginx_not_reloaded()


@story.stage
def test_10_a_new_release_is_its_upload_and_one_deploy_command(stack: Stack) -> None:
    artifact = stack.artifact(V2)
    change = Change(stack, "release", release=V2, artifact=artifact)
    assert change.ran() == {name("release-upload"): "replace", name("release-activate"): "replace"}, change.report.summary()
    deploy = [c for c in change.report.commands if not c.startswith("copy ")]
    assert len(deploy) == 1 and re.match(
        rf"cognivern-release --root \S+ deploy {V2} \S+/incoming/cognivern-{V2}.tar.gz [0-9a-f]{{64}}$", deploy[0]
    )
    assert stack.serving()["release"] == V2 and set(change.load.served()) - {"ok"} == {V1, V2}
    assert [line.split()[1] for line in change.log] == ["install", "activate", "prune"]


@story.stage
def test_11_a_rollback_to_an_installed_release_is_one_ssh_command(stack: Stack) -> None:
    change = Change(stack, "rollback", release=V1, artifact=None)
    assert change.ran() == {name("release-upload"): "delete", name("release-activate"): "replace"}, change.report.summary()
    assert change.report.commands == [f"cognivern-release --root {stack.host.root} deploy {V1} - -"]
    assert stack.serving()["release"] == V1 and change.report.outputs["activeRelease"] == V1
    assert [line.split()[1] for line in change.log] == ["install", "activate", "prune"]


@story.stage
def test_12_a_second_server_leaves_the_first_ones_state(stack: Stack) -> None:
    """Server 1's resources keep their state (aliases): only its nginx site (it now sits behind a
    balancer) and the install check that gates the rollout are new there."""
    preview = stack.preview(hosts=["127.0.0.1", SECOND])
    stack.settings["hosts"] = None
    text = normalise(preview.text, stack.run_values())
    assert_golden("second-server", text)
    first = {n: op for n, op in preview.ops(include_same=False).items() if not n.startswith(f"{NODE}-2")}
    assert first == {f"{NODE}-1-nginx-site": "update", f"{NODE}-1-release-install": "create"}, preview.summary()


def test_no_golden_holds_a_secret(stack: Stack) -> None:
    """Every secret the stack ever held, in none of the goldens (checked on the files, whichever tests ran)."""
    private_key = stack.host.config()["sshPrivateKey"]
    secrets = [SECRET, ROTATED, PASSPHRASE, *[line for line in private_key.splitlines() if "PRIVATE KEY" not in line]]
    files = sorted(GOLDENS.glob("*.txt"))
    assert len(files) >= 10, files
    for path in files:
        text = path.read_text()
        for secret in secrets:
            assert secret not in text, f"{path.name} holds a secret"
