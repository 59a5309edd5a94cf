"""The real `pulumi up` against a pristine Debian server booted with systemd as PID 1 (issue 24).

One PristineHost (tests/support/pristine_host.py: bookworm, seeded through cloud-init's NoCloud
datasource with the user data the program renders for a created server, its generated host key
included) and one stack of the real program (`scripts/pulumi-local STACK up`, tests/support/
real_engine.py) deploying to it in existing-host mode, pinned to the generated host key, with
`metadataFilter`: the provisioning command a created server gets, byte for byte (checked below and
in test_program). The stages are one server's history (tests/support/story.py: a stage alone first
runs the ones before it):

1. pristine -> serving v1 (issue 24's scenario 1): the only connection that works is pinned to the
   key cloud-init installed (a stack pinned to another key runs nothing); units enabled;
2. logrotate's config accepted (`-d`) and run by Debian's own logrotate.service under systemd;
3. the metadata filter (issue 25 item 1): files, units, the rule, root vs the app user against a
   metadata stand-in, a reload that leaves PM2 alone;
4. a reboot (scenario 2): the app serves again with no deploy, same release, data and agent as they
   were, and the filter came up before network-pre.target and PM2 (boot -> first 200 measured);
5. v2 under 8 clients through nginx after the reboot (scenario 3), nginx reloaded through systemctl;
6. a second `pulumi up` with no change opens no SSH session (scenario 4);
7. provisioning again (`pulumi up --replace` of its command) changes nothing (scenario 5);
8. a broken release fails the run while v2 keeps serving, also after a reboot (scenario 6);
9. fail closed: without nft or iptables PM2 stays down after a reboot (issue 25 item 1).
Node comes from the distribution (NodeSource is out of reach here); bakeSeconds is short.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from components import metadata_filter
from components.host import PROVISION, provision_args
from components.remote import script_command
from components.server.host_key import generate_ed25519
from components.settings import SECRET_KEYS, parse_settings
from tests.support.helpers import http_post
from tests.support.load import Load
from tests.support.pristine_host import PristineHost, base_root
from tests.support.real_engine import RealEngine, Running
from tests.support.stack import PristineStack
from tests.support.story import Story
from tests.support.target_host import _config_string

pytestmark = pytest.mark.needs_root("it boots a Debian root in namespaces and cgroups it creates")

V1, V2, V3 = "prs-v1", "prs-v2", "prs-v3-broken"
PM2_UNIT = "pm2-cognivern.service"
FILTER_UNIT = metadata_filter.UNIT_NAME
FILTER_SCRIPT = f"/usr/local/bin/{metadata_filter.SCRIPT_NAME}"
RULE = "ip daddr 169.254.169.254 meta skuid != 0 reject"
NODE = "cognivern-test"  # the stack's server name: its commands are NODE-<role>
METADATA, METADATA_PORT = "169.254.169.254", 8169  # a stand-in for Hetzner's metadata service (stage 2)

story = Story()
story_outcomes = story.fixture()


@dataclass
class History:
    """What later stages compare against (figures are printed: `pytest -s`)."""

    stack: PristineStack
    figures: dict[str, float] = field(default_factory=dict)
    wrong_pin: Running | None = None
    wrong_engine: RealEngine | None = None
    facts: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    with PristineHost("bookworm") as host:
        stack = PristineStack(host, tmp_path_factory.mktemp("pristine-scenarios"), metadataFilter=True, agentsEnabled=True, bakeSeconds=2)
        h = History(stack)
        yield h
        print(f"\npristine scenarios (seconds): { {k: round(v, 1) for k, v in h.figures.items()} }")


def accepted_sessions(stack: PristineStack) -> int:
    """SSH logins the guest's sshd accepted so far (every deploy command is one)."""
    return stack.journal("-u", "ssh.service").count("Accepted publickey for root")


def health_watch(stack: PristineStack) -> Load:
    """One client asking /health through nginx every 50 ms (no retry: an answer or an error)."""
    return Load([stack.url("/health")], clients=1, retry=False)


def created_server_provisioning(stack: PristineStack) -> str:
    """The provisioning command the program sends to a server it creates from the same settings."""
    raw = {k: v for k, v in stack.config().items() if k not in ("host", "hostKey", "metadataFilter")}
    raw |= {"sshPublicKey": stack.host.public_key, "image": stack.host.image}
    return script_command(PROVISION, provision_args(parse_settings(raw.get)))


def outside_pm2_unit(stack: PristineStack) -> dict[str, str]:
    """The app user's processes that are not in PM2's unit (pid -> cgroup): its daemon and every app
    must be systemd's (stopped in order at shutdown, restarted if they die), not left over from the
    deploy's SSH session."""
    pids = stack.host.run(["pgrep", "-u", stack.APP_USER], check=True).stdout.split()
    assert pids
    unified = {pid: stack.host.run(["grep", "^0::", f"/proc/{pid}/cgroup"]).stdout.strip() for pid in pids}  # (gone: "")
    return {pid: cgroup for pid, cgroup in unified.items() if cgroup and cgroup != f"0::/system.slice/{PM2_UNIT}"}


def monotonic(stack: PristineStack, unit: str, prop: str) -> int:
    return int(stack.unit(unit, prop)[prop])


# ---------------------------------------------------------------------------------------------- 1
@story.stage
def test_01_pristine_to_serving_v1_through_the_key_cloud_init_installed(history: History) -> None:
    stack, host = history.stack, history.stack.host
    assert host.host_key is not None
    # The image has no host key: the only one sshd has is the generated key from the user data.
    assert not list((base_root(host.release) / "etc/ssh").glob("ssh_host_*"))
    assert host.run("ls /etc/ssh/ssh_host_*", check=True).stdout.split() == [
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_ed25519_key.pub",
    ]
    assert host.read("/etc/ssh/ssh_host_ed25519_key.pub").split()[:2] == host.host_key.split()[:2]
    before = host.packages()
    artifact = stack.artifact(V1)

    # A stack pinned to any other key: its first connection fails (the provider retries the
    # mismatch with back-off, ~2 minutes), so it runs while the real deploy goes on.
    wrong = RealEngine(stack.tmp / "wrong-pin")
    wrong.configure({**stack.config(release=V1, artifact=artifact), "hostKey": _config_string(generate_ed25519()[1])}, SECRET_KEYS)
    history.wrong_engine, history.wrong_pin = wrong, wrong.start("up", "--yes", "--skip-preview")

    with health_watch(stack) as watch:
        started = time.monotonic()
        report = stack.up(release=V1, artifact=artifact)
        first_200 = watch.first("ok", started)
    assert set(report.ops().values()) == {"create"}, report.summary()
    assert first_200 is not None
    history.figures |= {"pristine_to_first_200": first_200, "pristine_up": report.seconds}
    # exactly what a created server gets (test_program checks the same on the mock monitor)
    assert report.step("provision").commands == [created_server_provisioning(stack)]
    assert "--metadata-filter yes" in report.step("provision").commands[0]

    assert stack.serving()["release"] == V1 and stack.current() == V1
    assert host.run(["systemctl", "is-enabled", "nginx", PM2_UNIT]).stdout.split() == ["enabled", "enabled"]
    assert host.run(["systemctl", "is-active", "nginx", PM2_UNIT]).stdout.split() == ["active", "active"]
    debug = host.run(["logrotate", "-d", "/etc/logrotate.d/cognivern"])
    assert debug.returncode == 0 and "rotating pattern: /opt/cognivern/shared/logs/*.log" in debug.stderr, debug.stderr
    assert stack.pm2_apps() == {"cognivern-agent-blue": "online", "forecasting-agent": "online"}
    assert host.run(["systemctl", "--failed", "--plain", "--no-legend"], check=True).stdout == ""
    assert outside_pm2_unit(stack) == {}

    installed = {name: version for name, version in host.packages().items() if name not in before}
    assert {"nginx", "nodejs", "npm", "curl"} <= set(installed), sorted(installed)
    assert installed["nodejs"].startswith("18."), installed["nodejs"]
    history.facts["installed"] = installed
    print(f"\ninstalled on the pristine host ({len(installed)} packages):", " ".join(f"{k}={v}" for k, v in sorted(installed.items())))

    # the wrong pin: nothing ran, nothing is in its state
    wrong_report = history.wrong_pin.wait(check=False)
    assert not wrong_report.ok and [s.name for s in wrong_report.failed] == ["cognivern-test-provision"], wrong_report.summary()
    assert "ssh: handshake failed: ssh: host key mismatch" in wrong_report.errors[0], wrong_report.errors
    assert wrong_report.commands[:1] == report.step("provision").commands and wrong.resources() == {}


# ---------------------------------------------------------------------------------------------- 2
@story.stage
def test_02_logrotate_rotates_the_apps_logs_under_systemd(history: History) -> None:
    """Debian's logrotate.service (its systemd sandbox: ProtectSystem=full, PrivateTmp, ...) with our
    config: `su cognivern` into the app's own log directory, copytruncate while PM2 keeps writing."""
    stack, host = history.stack, history.stack.host
    logs = "/opt/cognivern/shared/logs"
    names = host.run(["find", logs, "-name", "*.log", "-size", "+0", "-printf", "%f\\n"], check=True).stdout.split()
    assert "out.log" in names, names
    # as if they were last rotated long ago (logrotate records a log it first meets, and rotates it a day later)
    status = "/var/lib/logrotate/status"
    old = "".join(f'"{logs}/{name}" 2000-1-1-0:0:0\n' for name in names)
    keep = f"{{ cat {status} 2>/dev/null || echo 'logrotate state -- version 2'; cat; }} > {status}.new && mv {status}.new {status}"
    host.run(["sh", "-c", keep], input=old, check=True)
    host.run(["systemctl", "start", "logrotate.service"], check=True)
    assert stack.unit("logrotate.service", "Result")["Result"] == "success"
    rotated = host.run(["find", logs, "-name", "*.log.1", "-printf", "%f %u\\n"], check=True).stdout.split("\n")
    assert {f"{name}.1 cognivern" for name in names} <= set(rotated), rotated
    stack.get("/release")  # the app writes on: PM2 appends to the truncated file
    assert stack.serving()["release"] == V1


# ---------------------------------------------------------------------------------------------- 3
@story.stage
def test_03_the_metadata_filter_is_installed_loaded_and_reloadable_without_touching_pm2(history: History) -> None:
    stack, host = history.stack, history.stack.host
    assert host.run(["stat", "-c", "%U:%G %a", FILTER_SCRIPT], check=True).stdout.strip() == "root:root 755"
    assert host.read(FILTER_SCRIPT) == metadata_filter.SCRIPT.read_text()
    unit_path = f"/etc/systemd/system/{FILTER_UNIT}"
    assert host.read(unit_path) == metadata_filter.UNIT.read_text().replace("@BIN_DIR@", "/usr/local/bin")
    assert host.run(["readlink", f"/etc/systemd/system/sysinit.target.wants/{FILTER_UNIT}"], check=True).stdout.strip() == unit_path
    dropins = f"/etc/systemd/system/{PM2_UNIT}.d"
    assert host.run(["ls", dropins], check=True).stdout.split() == ["cognivern-metadata-filter.conf", "cognivern.conf"]
    assert host.read(f"{dropins}/cognivern-metadata-filter.conf") == f"[Unit]\nRequires={FILTER_UNIT}\nAfter={FILTER_UNIT}\n"
    pm2 = stack.unit(PM2_UNIT, "Requires", "After")
    assert FILTER_UNIT in pm2["Requires"].split() and FILTER_UNIT in pm2["After"].split(), pm2
    assert host.run(["systemctl", "is-enabled", FILTER_UNIT]).stdout.strip() == "enabled"
    assert host.run(["systemctl", "is-active", FILTER_UNIT]).stdout.strip() == "active"
    assert RULE in host.run(["nft", "list", "table", "inet", "cognivern_metadata"], check=True).stdout

    # A metadata stand-in inside the guest's network namespace, serving the seed (the user data with
    # the private host key), as Hetzner's service serves it.
    host.run(["ip", "address", "add", f"{METADATA}/32", "dev", "lo"], check=True)
    try:
        # Not on port 80: nginx listens on *:80 here, and Linux refuses a more specific bind beside a
        # listening wildcard (a connection would reach nginx, whose replies the rule rejects: nginx's
        # workers are not root). The rule matches the address, whatever the port. socketserver's
        # TCPServer, not http.server's HTTPServer, which resolves its own name (no DNS here: it hangs).
        server = (
            "import functools, http.server, socketserver; "
            "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory='/var/lib/cloud/seed/nocloud'); "
            f"socketserver.TCPServer(('{METADATA}', {METADATA_PORT}), handler).serve_forever()"
        )
        host.run(["systemd-run", "--unit=cognivern-test-metadata", "python3", "-c", server], check=True)
        deadline = time.monotonic() + 30
        while f"{METADATA}:{METADATA_PORT} " not in (listening := host.run(["ss", "-Hltn"]).stdout) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"{METADATA}:{METADATA_PORT} " in listening, stack.journal("-u", "cognivern-test-metadata")
        fetch = f"curl -sS --noproxy '*' --max-time 5 http://{METADATA}:{METADATA_PORT}/user-data"
        as_root = host.run(fetch)
        assert as_root.returncode == 0 and "ed25519_private" in as_root.stdout, as_root.stderr
        refused = stack.as_app(fetch)
        assert refused.returncode == 7 and "ed25519_private" not in refused.stdout, (refused.returncode, refused.stderr)

        pm2_pid = stack.unit(PM2_UNIT, "MainPID")["MainPID"]
        app_pid = stack.serving()["pid"]
        # control: without the rule the app user reads the key; `systemctl reload` puts the rule back
        host.run(["nft", "delete", "table", "inet", "cognivern_metadata"], check=True)
        leaked = stack.as_app(fetch)
        assert leaked.returncode == 0 and "ed25519_private" in leaked.stdout, leaked.stderr
        host.run(["systemctl", "reload", FILTER_UNIT], check=True)
        assert RULE in host.run(["nft", "list", "table", "inet", "cognivern_metadata"], check=True).stdout
        assert stack.as_app(fetch).returncode == 7
        assert stack.unit(PM2_UNIT, "MainPID")["MainPID"] == pm2_pid and stack.serving()["pid"] == app_pid
        assert host.run(["systemctl", "is-active", PM2_UNIT]).stdout.strip() == "active"
    finally:
        host.run(["systemctl", "stop", "cognivern-test-metadata"])
        host.run(["ip", "address", "del", f"{METADATA}/32", "dev", "lo"])


# ---------------------------------------------------------------------------------------------- 4
@story.stage
def test_04_after_a_reboot_the_app_serves_again_without_a_deploy(history: History) -> None:
    stack, host = history.stack, history.stack.host
    posted = http_post(stack.url("/data"), content=b"kept", timeout=5)  # the app writes shared/data/posts.jsonl
    assert posted.status_code == 201, posted.text
    data = host.run(["sha256sum", "/opt/cognivern/shared/data/posts.jsonl"], check=True).stdout
    before = stack.serving()
    runs = host.run(["ls", "/opt/cognivern/.deploy/runs"], check=True).stdout
    sessions = accepted_sessions(stack)
    filter_before = monotonic(stack, FILTER_UNIT, "ActiveEnterTimestampMonotonic")

    with health_watch(stack) as watch:
        rebooted = host.reboot()
        deadline = time.monotonic() + 60
        while watch.first("ok", host.boot_started) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    to_200 = watch.first("ok", host.boot_started)
    assert rebooted.how == "reboot" and (rebooted.boot.state, rebooted.boot.failed) == ("running", {}), rebooted
    assert to_200 is not None, watch.served()
    history.figures |= {"boot_to_first_200": to_200, "reboot_shutdown": rebooted.shutdown_seconds}

    after = stack.serving()
    assert after["release"] == V1 and after["pid"] != before["pid"], (before, after)
    assert stack.current() == V1
    assert stack.pm2_apps() == {"cognivern-agent-blue": "online", "forecasting-agent": "online"}  # agentsEnabled, as configured
    assert outside_pm2_unit(stack) == {}
    assert host.run(["sha256sum", "/opt/cognivern/shared/data/posts.jsonl"], check=True).stdout == data
    assert host.run(["ls", "/opt/cognivern/.deploy/runs"], check=True).stdout == runs, "the release tool ran"
    assert accepted_sessions(stack) == sessions, "something logged in over SSH"

    # The filter's unit came up in this boot, before network-pre.target and before PM2's daemon started.
    filter_up = monotonic(stack, FILTER_UNIT, "ActiveEnterTimestampMonotonic")
    network_pre = monotonic(stack, "network-pre.target", "ActiveEnterTimestampMonotonic")
    pm2_start = monotonic(stack, PM2_UNIT, "ExecMainStartTimestampMonotonic")
    assert filter_before < filter_up <= network_pre <= pm2_start, (filter_before, filter_up, network_pre, pm2_start)
    assert RULE in host.run(["nft", "list", "table", "inet", "cognivern_metadata"], check=True).stdout


# ---------------------------------------------------------------------------------------------- 5
@story.stage
def test_05_v2_goes_live_under_load_and_nginx_is_reloaded_through_systemctl(history: History) -> None:
    stack, host = history.stack, history.stack.host
    master = stack.unit("nginx.service", "MainPID")["MainPID"]
    workers = set(host.run(["pgrep", "-P", master], check=True).stdout.split())
    reloads = len(re.findall(r"^Reloaded ", stack.journal("-u", "nginx.service"), re.M))
    artifact = stack.artifact(V2)
    with Load([stack.url("/release"), stack.url("/health")], clients=8) as load:
        started = time.monotonic()
        report = stack.up(release=V2, artifact=artifact)
        deadline = time.monotonic() + 5
        while load.first(V2, started) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert load.failures == [], load.failures
    assert set(load.served()) - {"ok"} == {V1, V2}
    # the artifact's upload, then one deploy command (install, activate, prune, list); prune's own resource idles
    releases = {name: op for name, op in report.ops().items() if "-release-" in name}
    assert releases == {f"{NODE}-release-upload": "replace", f"{NODE}-release-activate": "replace", f"{NODE}-release-prune": "same"}
    assert report.op("nginx-site") == "same"  # so the reload below is the release tool's
    assert stack.serving()["release"] == V2 and stack.current() == V2
    assert stack.releases() == {V2: "current", V1: "previous"}
    assert outside_pm2_unit(stack) == {}
    # systemd reloaded nginx (a `systemctl reload` job; `nginx -s reload` would not reach systemd):
    # same master, new workers
    assert stack.unit("nginx.service", "MainPID")["MainPID"] == master
    assert len(re.findall(r"^Reloaded ", stack.journal("-u", "nginx.service"), re.M)) > reloads
    assert not workers & set(host.run(["pgrep", "-P", master], check=True).stdout.split())
    history.facts["load"] = (sum(load.served().values()), load.retried)


# ---------------------------------------------------------------------------------------------- 6
@story.stage
def test_06_a_second_up_with_no_change_opens_no_session_on_the_host(history: History) -> None:
    stack = history.stack
    sessions = accepted_sessions(stack)
    report = stack.up()
    assert set(report.ops().values()) == {"same"} and report.commands == [], report.summary()
    assert accepted_sessions(stack) == sessions
    assert stack.serving()["release"] == V2


# ---------------------------------------------------------------------------------------------- 7
@story.stage
def test_07_provisioning_again_changes_nothing(history: History) -> None:
    stack, host = history.stack, history.stack.host
    before = host.checksums()
    pm2_pid, app_pid = stack.unit(PM2_UNIT, "MainPID")["MainPID"], stack.serving()["pid"]
    filter_up = monotonic(stack, FILTER_UNIT, "ActiveEnterTimestampMonotonic")
    # provisioning and the tool's install (a command of its own since issue 22), both run again
    again = (f"{NODE}-provision", f"{NODE}-tool-install")
    urns = [r["urn"] for name, r in stack.engine.resources().items() if name in again]
    report = stack.engine.run("up", "--yes", "--skip-preview", *(a for urn in urns for a in ("--replace", urn)))
    assert report.ops(include_same=False) == dict.fromkeys(again, "replace"), report.summary()
    out = "\n".join(stack.engine.resources()[name]["outputs"]["stdout"] for name in again)
    said = (
        "provision: done",
        "provision: cloud-init: ok (finished)",
        "provision: release tool: skipped (not on stdin: it has a command of its own)",
    )
    steps = [line for line in out.splitlines() if line not in said]
    assert steps and all("ok (already" in line for line in steps), out
    assert any(line.startswith("install-tool: release tool: ok (already") for line in steps), out
    assert host.checksums() == before
    assert stack.unit(PM2_UNIT, "MainPID")["MainPID"] == pm2_pid and stack.serving()["pid"] == app_pid
    assert monotonic(stack, FILTER_UNIT, "ActiveEnterTimestampMonotonic") == filter_up


# ---------------------------------------------------------------------------------------------- 8
@story.stage
def test_08_a_broken_release_fails_the_up_and_v2_serves_on_also_after_a_reboot(history: History) -> None:
    stack, host = history.stack, history.stack.host
    artifact = stack.artifact(V3, mode="crash-after", delayMs=2000)
    with Load([stack.url("/release"), stack.url("/health")], clients=8) as load:
        report = stack.up(release=V3, artifact=artifact, bakeSeconds=6, check=False)
    assert not report.ok and [s.name for s in report.failed] == ["cognivern-test-release-activate"], report.summary()
    assert "failed its bake" in (report.step("release-activate").error or ""), report.output
    assert load.failures == [], load.failures
    assert stack.serving()["release"] == V2 and stack.current() == V2
    assert stack.releases()[V3] == "bad"
    apps = stack.pm2_apps()

    rebooted = host.reboot()
    assert (rebooted.boot.state, rebooted.boot.failed) == ("running", {}), rebooted
    deadline = time.monotonic() + 30
    while stack.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.serving()["release"] == V2 and stack.current() == V2
    assert stack.pm2_apps() == apps, "PM2 resurrected something else than what ran before the reboot"
    assert [status for name, status in apps.items() if name.endswith(("-blue", "-green"))] == ["online"], apps


# ---------------------------------------------------------------------------------------------- 9
@story.stage
def test_09_without_nft_or_iptables_pm2_stays_down_after_a_reboot(history: History) -> None:
    """Fail closed: the filter cannot load, so the unit that requires it never starts the app."""
    stack, host = history.stack, history.stack.host
    host.run(["apt-get", "remove", "-y", "-q", "nftables"], check=True)
    assert host.run("command -v nft || command -v iptables").stdout == ""
    rebooted = host.reboot()
    assert rebooted.boot.state == "degraded" and list(rebooted.boot.failed) == [FILTER_UNIT], rebooted
    assert "no nft or iptables" in rebooted.boot.failed[FILTER_UNIT]
    # PID 1 is new since the reboot: a unit that started in this boot has its timestamps set
    pm2 = stack.unit(PM2_UNIT, "ActiveState", "UnitFileState", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    assert pm2 == {
        "ActiveState": "inactive",
        "UnitFileState": "enabled",
        "ExecMainStartTimestampMonotonic": "0",
        "ActiveEnterTimestampMonotonic": "0",
    }, pm2
    assert host.run(["pgrep", "-u", "cognivern"]).stdout == ""
    assert stack.get("/health").status_code == 502
