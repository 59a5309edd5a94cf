"""The host scripts over real SSH, sent exactly as the program sends them (remote.script_command).

One TargetHost (private sshd + private nginx + temp ROOT + unique app user) serves the module:
provision prepares it, then nginx-site and put-file run against the prepared host.
"""

from __future__ import annotations

import base64
import dataclasses
import grp
import hashlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from components import metadata_filter
from components.host import (
    BUNDLE_MARKER,
    NGINX_SITE,
    PROVISION,
    PUT_FILE,
    host_bundle,
    nginx_site_input,
    provision_args,
    release_tool_bundle,
)
from components.release.cognivern_release import facts
from components.remote import script_command
from components.render import render_nginx_site, render_upstream, site_name
from components.settings import Settings
from components.tool import INSTALL_TOOL, bundle, release_tool_files
from tests.support.fs import manifest
from tests.support.helpers import http_get, wait_until
from tests.support.target_host import TargetHost

FAKE_TOOL = '#!/usr/bin/env bash\n# stand-in for cognivern-release\necho "cognivern-release $*" >>"${COGNIVERN_TOOL_LOG:-/dev/null}"\n'
FAKE_BUNDLE = BUNDLE_MARKER.format("cognivern-release") + "\n" + FAKE_TOOL  # the shape of install-tool.sh's stdin, one file


# ---------------------------------------------------------------------------- helpers
def provision_cmd(s: Settings) -> str:
    return script_command(PROVISION, provision_args(s))


def install_tool_cmd() -> str:
    return script_command(INSTALL_TOOL, [])


def put_cmd(dest: str, mode: str, owner: str, reload_root: str | None = None) -> str:
    args = ["--dest", dest, "--mode", mode, "--owner", owner] + (["--reload-root", reload_root] if reload_root else [])
    return script_command(PUT_FILE, args)


def site_cmd(name: str) -> str:
    return script_command(NGINX_SITE, ["--name", name])


def owner_mode(p: Path) -> tuple[str, str, str]:
    st = p.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, oct(stat.S_IMODE(st.st_mode))


def ws_accept(key: str) -> str:
    """RFC 6455 Sec-WebSocket-Accept for a client key."""
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()  # noqa: S324 (protocol-mandated)
    return base64.b64encode(digest).decode()


class Backend(BaseHTTPRequestHandler):
    """A stand-in app: /health JSON, anything else echoes the path; WebSocket handshake + echo."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.headers.get("Upgrade", "").lower() == "websocket":
            accept = ws_accept(self.headers["Sec-WebSocket-Key"])
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            data = self.rfile.read(5)
            self.wfile.write(data.upper())
            self.wfile.flush()
            self.close_connection = True
            return
        info = {"status": "ok", "path": self.path, "host": self.headers.get("Host"), "xff": self.headers.get("X-Forwarded-For")}
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def host() -> Iterator[TargetHost]:
    with TargetHost() as h:
        yield h


@pytest.fixture(scope="module")
def first_run(host: TargetHost) -> subprocess.CompletedProcess[str]:
    """provision.sh on a fresh host (a distro default site present, as after `apt install nginx`)."""
    (host.nginx.sites_enabled / "default").write_text("server { listen 127.0.0.1:9; server_name distro-default; }\n")
    assert host.sshd is not None
    assert host.sshd.auth_methods() >= {"publickey", "password"}
    result = host.run(provision_cmd(host.settings()), stdin=host_bundle())
    assert result.returncode == 0, result.stderr + result.stdout
    tool = host.run(install_tool_cmd(), stdin=FAKE_BUNDLE)
    assert tool.returncode == 0, tool.stderr + tool.stdout
    return result  # provision.sh returns once the reloaded sshd listens again (test below)


@pytest.fixture(scope="module")
def backend(host: TargetHost) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", host.app_port), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------- provision
def test_provision_prepares_user_and_layout(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    u, b = host.app_user, facts.build_user(host.app_user)
    assert host.user_exists()
    build = pwd.getpwnam(b)
    assert (build.pw_dir, build.pw_shell) == (str(host.root / "cache/build/work"), "/usr/sbin/nologin")
    assert b != u and build.pw_uid < 1000, "a system account of its own"
    entry = pwd.getpwnam(u)
    assert entry.pw_dir == str(host.app_home) and host.app_home.is_dir()
    assert entry.pw_shell == "/bin/bash"
    assert entry.pw_uid < 1000, "a system account"
    root = host.root
    expected = {
        root: ("root", "root", "0o755"),
        root / "releases": ("root", "root", "0o755"),
        root / "shared": ("root", "root", "0o755"),
        root / "shared/data": (u, u, "0o750"),
        root / "shared/logs": (u, u, "0o750"),
        root / "cache": ("root", "root", "0o755"),
        root / "cache/pnpm-store": (u, u, "0o750"),
        root / "cache/build": ("root", "root", "0o755"),
        root / "cache/build/work": (b, b, "0o700"),
        root / "backups": ("root", "root", "0o700"),
        host.app_home: (u, u, "0o700"),
        host.app_home / ".pm2": (u, u, "0o700"),
        root / "config": ("root", "root", "0o755"),
        root / ".deploy": ("root", "root", "0o700"),
        root / "incoming": ("root", "root", "0o700"),
    }
    for path, want in expected.items():
        assert owner_mode(path) == want, path
    lines = first_run.stdout.splitlines()
    assert all(line.startswith("provision: ") for line in lines), first_run.stdout
    assert "provision: pm2 startup: skipped (systemd is not running on this host)" in lines
    assert "provision: cloud-init: ok (did not run on this boot; not waiting)" in lines


def test_install_tool_installs_the_tool_by_rename_only_when_it_differs(
    host: TargetHost, first_run: subprocess.CompletedProcess[str]
) -> None:
    """Provisioning installs no tool (it has its own command, so an edit of the tool never re-runs
    provisioning); install-tool.sh installs it, says "ok (already ...)" when it is there, and
    switches to an edited one by rename."""
    tool = host.bin_dir / "cognivern-release"
    assert [line for line in first_run.stdout.splitlines() if "release tool" in line] == [
        "provision: release tool: skipped (not on stdin: it has a command of its own)"
    ]
    assert tool.read_text() == FAKE_TOOL
    assert owner_mode(tool) == ("root", "root", "0o755")
    assert os.readlink(tool) == "../lib/cognivern-release/current/cognivern-release"
    # PATH on the host (SetEnv) finds it by name, as the release component calls it.
    assert host.run("command -v cognivern-release").stdout.strip() == str(tool)
    lib = host.bin_dir.parent / "lib" / "cognivern-release"
    digest = os.readlink(lib / "current")
    again = host.run(install_tool_cmd(), stdin=FAKE_BUNDLE)
    assert again.returncode == 0 and again.stdout.splitlines() == [f"install-tool: release tool: ok (already {digest})"], again.stdout
    edited = FAKE_TOOL + "# edited\n"
    changed = host.run(install_tool_cmd(), stdin=BUNDLE_MARKER.format("cognivern-release") + "\n" + edited)
    assert changed.returncode == 0, changed.stderr
    assert tool.read_text() == edited and os.readlink(lib / "current") != digest, "switched by rename: a run under way keeps its version"
    assert f"install-tool: release tool: installed {os.readlink(lib / 'current')}" in changed.stdout
    assert not [p for p in lib.iterdir() if p.name.startswith(".")], "no temporary file left"
    edited_digest = os.readlink(lib / "current")
    # back to the first version (its directory is the older one), then a third: the version that was
    # current before each switch stays, whatever its age (an activation may still import from it)
    assert host.run(install_tool_cmd(), stdin=FAKE_BUNDLE).returncode == 0
    assert os.readlink(lib / "current") == digest and (lib / edited_digest).is_dir()
    third = host.run(install_tool_cmd(), stdin=BUNDLE_MARKER.format("cognivern-release") + "\n" + FAKE_TOOL + "# third\n")
    assert third.returncode == 0, third.stderr
    assert sorted(p.name for p in lib.iterdir()) == sorted([digest, os.readlink(lib / "current"), "current"])
    assert host.run(install_tool_cmd(), stdin=FAKE_BUNDLE).returncode == 0


def test_provision_installs_logrotate(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    conf = host.logrotate_dir / "cognivern"
    text = conf.read_text()
    assert f"{host.root}/shared/logs/*.log {{" in text
    for directive in ("daily", "rotate 14", "compress", "missingok", "copytruncate"):
        assert f"    {directive}\n" in text
    check = subprocess.run(["logrotate", "-d", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_provision_disables_password_login_and_reloads_sshd(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    assert host.sshd is not None
    dropin = host.sshd.dropin_dir / "10-cognivern-hardening.conf"
    assert dropin.exists()
    assert sorted(p.name for p in host.sshd.dropin_dir.iterdir())[0] < "50-cloud-init.conf"
    effective = host.sshd.effective_config()
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitrootlogin"] == "without-password"  # sshd -T spells prohibit-password this way
    # The running daemon picked it up (SIGHUP via COGNIVERN_SSHD_PIDFILE): only keys are offered now.
    assert host.sshd.auth_methods() == {"publickey"}
    assert "reloaded" in next(line for line in first_run.stdout.splitlines() if line.startswith("provision: sshd:"))


def test_provision_returns_only_once_the_reloaded_sshd_accepts_connections() -> None:
    """The reload (SIGHUP) makes sshd re-execute itself; until it has bound again, connections are
    refused. Here that takes 2 s (LocalSshd's reexec_delay), so the very next SSH command, one
    attempt and no retry, fails unless provision.sh waits for the new listening sockets."""
    with TargetHost(sshd_reexec_delay=2) as host:
        assert host.sshd is not None and host.sshd.auth_methods() >= {"publickey", "password"}
        pid = host.sshd.pid
        result = host.run(provision_cmd(host.settings()), stdin=host_bundle())
        assert result.returncode == 0, result.stderr + result.stdout
        assert f"sshd (pid {pid}) reloaded" in result.stdout
        after = host.run("true", retries=0)
        assert after.returncode == 0, after.stderr
        assert host.sshd.pid == pid and host.sshd.auth_methods() == {"publickey"}, "the same daemon, reloaded"


def test_provision_removes_distro_default_site(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    assert not (host.nginx.sites_enabled / "default").exists()
    assert "provision: nginx default site: removed" in first_run.stdout


def test_provision_second_run_changes_nothing(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    assert host.sshd is not None
    watched = (host.root, host.bin_dir, host.logrotate_dir, host.sshd.dropin_dir, host.nginx.sites_enabled, host.app_home)
    before = manifest(*watched)
    sshd_config = host.sshd.config_path.stat().st_mtime_ns
    again = host.run(provision_cmd(host.settings()), stdin=host_bundle())
    assert again.returncode == 0, again.stderr
    assert manifest(*watched) == before
    assert host.sshd.config_path.stat().st_mtime_ns == sshd_config
    steps = [line for line in again.stdout.splitlines() if line != "provision: done"]
    changed = [line for line in steps if "ok (" not in line and "skipped" not in line]
    assert not changed, again.stdout  # how long it takes is measured by bench/provision_rerun.py


def test_provision_keeps_shared_content(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    data = host.root / "shared/data/usage.json"
    data.write_text("{}")
    assert host.run(provision_cmd(host.settings())).returncode == 0
    assert data.read_text() == "{}"
    data.unlink()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--root", "opt/cognivern"], "--root must be an absolute"),
        (["--root", "/opt/../etc"], "--root must be an absolute"),
        (["--root", "/opt/cognivern/"], "--root must be an absolute"),
        (["--app-user", "Root;x"], "--app-user must be"),
        (["--app-user", "root"], "must not be root"),
        (["--node-major", "22x"], "--node-major must be a number"),
        (["--build-user", "cvtbad"], "--build-user must be an account of its own"),
        (["--build-user", "Bad;x"], "--build-user must be"),
        (["--metadata-filter", "maybe"], "--metadata-filter must be yes or no"),
        (["--metadata-filter", "yes"], "--metadata-filter yes needs cognivern-metadata-filter and its unit on stdin"),
        (["--node-source", "debian"], "--node-source must be nodesource or distribution"),
        (["--bogus", "1"], "unknown argument: --bogus"),
    ],
)
def test_provision_rejects_bad_arguments(host: TargetHost, first_run: object, args: list[str], message: str) -> None:
    base = {"--root": str(host.root) + "-bad", "--app-user": "cvtbad", "--build-user": "cvtbad-build", "--node-major": "20"}
    base |= {"--node-source": "nodesource", "--ssh-user": "root"}
    base |= {"--pm2-version": "7.0.4", "--pnpm-version": "9.15.9", "--metadata-filter": "no"}
    argv: list[str] = []
    for key, value in base.items():
        argv += [key, value]
    argv += args  # a repeated option overrides; an unknown one is rejected
    result = host.run(script_command(PROVISION, argv), stdin="")
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stdout == ""
    assert not Path(str(host.root) + "-bad").exists()


# ---------------------------------------------------------------------------- units: PM2 after the metadata filter
FILTER_UNIT = metadata_filter.UNIT_NAME


def pm2_unit_text(user: str, home: Path) -> str:
    """pm2-<user>.service as `pm2 startup systemd -u USER --hp HOME` writes it: PM2's own template,
    filled in as its lib/API/Startup.js does (that command itself would write into /etc/systemd)."""
    npm_root = Path(subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, check=True).stdout.strip())
    node = shutil.which("node")
    assert node is not None
    fill = {
        "%PM2_PATH%": str(npm_root / "pm2" / "bin" / "pm2"),
        "%NODE_PATH%": str(Path(node).parent),
        "%USER%": user,
        "%HOME_PATH%": str(home / ".pm2"),
    }
    text = (npm_root / "pm2" / "lib" / "templates" / "init-scripts" / "systemd.tpl").read_text()
    for placeholder, value in fill.items():
        text = text.replace(placeholder, value)
    return text


def systemd_verify(unit_dir: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """systemd's own check of units (loads them with their drop-ins from `unit_dir`, before the
    system's unit directories, and builds each one's start transaction: missing units, cycles)."""
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    return subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, env=env, cwd=unit_dir, timeout=60)


@pytest.fixture
def pm2_unit(host: TargetHost) -> Iterator[str]:
    """PM2's unit in the host's unit directory (provisioning writes only drop-ins there without systemd)."""
    name = f"pm2-{host.app_user}.service"
    path = host.systemd_dir / name
    path.write_text(pm2_unit_text(host.app_user, host.app_home))
    yield name
    path.unlink()


def test_provision_orders_pm2_after_the_metadata_filter_on_servers_it_created(
    host: TargetHost, first_run: subprocess.CompletedProcess[str], pm2_unit: str
) -> None:
    """--metadata-filter yes (a server the program created): the filter script and its unit are
    installed, PM2's unit Requires= and After= it, and systemd accepts the result."""
    args = provision_args(host.settings())
    args[args.index("--metadata-filter") + 1] = "yes"
    units, script = host.systemd_dir, host.bin_dir / metadata_filter.SCRIPT_NAME
    unit, dropin = units / FILTER_UNIT, units / f"{pm2_unit}.d" / "cognivern-metadata-filter.conf"
    try:
        first = host.run(script_command(PROVISION, args), stdin=host_bundle())
        assert first.returncode == 0, first.stderr
        lines = first.stdout.splitlines()
        assert f"provision: metadata filter: installed {script}; wrote {unit} (not loaded: systemd is not running)" in lines
        assert f"provision: pm2 startup order: wrote {dropin} (after {FILTER_UNIT})" in lines
        assert script.read_text() == metadata_filter.SCRIPT.read_text() and owner_mode(script) == ("root", "root", "0o755")
        assert f"ExecStart={script}\n" in unit.read_text() and "@BIN_DIR@" not in unit.read_text()
        assert dropin.read_text() == f"[Unit]\nRequires={FILTER_UNIT}\nAfter={FILTER_UNIT}\n"
        verify = systemd_verify(units, pm2_unit, FILTER_UNIT)
        assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr

        again = host.run(script_command(PROVISION, args), stdin=host_bundle())
        assert "provision: metadata filter: ok (already installed; not loaded: systemd is not running)" in again.stdout
        assert f"provision: pm2 startup order: ok (already after {FILTER_UNIT})" in again.stdout

        # controls: systemd-analyze refuses the same drop-in where the filter unit is missing (an
        # existing host: PM2 would never start), and an ordering cycle between the two units
        hidden = unit.rename(units / "hidden")
        missing = systemd_verify(units, pm2_unit)
        assert missing.returncode != 0 and f"Unit {FILTER_UNIT} not found" in missing.stderr, missing.stderr
        unit.write_text(hidden.read_text().replace("Wants=network-pre.target\n", f"Wants=network-pre.target\nAfter={pm2_unit}\n"))
        cycle = systemd_verify(units, pm2_unit, FILTER_UNIT)
        assert cycle.returncode != 0 and "ordering cycle" in cycle.stderr, cycle.stderr
        hidden.unlink()
    finally:
        for path in (dropin, unit, script):
            path.unlink(missing_ok=True)


def test_provision_leaves_pm2_free_of_the_filter_on_existing_hosts(
    host: TargetHost, first_run: subprocess.CompletedProcess[str], pm2_unit: str
) -> None:
    """--metadata-filter no (`host`/`hosts`): no filter unit, and PM2's drop-ins require nothing that is missing."""
    assert "--metadata-filter no" in provision_cmd(host.settings()) and "metadata filter" not in first_run.stdout
    assert sorted(p.name for p in (host.systemd_dir / f"{pm2_unit}.d").iterdir()) == ["cognivern.conf"]
    assert not (host.systemd_dir / FILTER_UNIT).exists() and not (host.bin_dir / metadata_filter.SCRIPT_NAME).exists()
    verify = systemd_verify(host.systemd_dir, pm2_unit)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr


# Parents of ROOT that another user could write (or swap): provisioning refuses ROOT below each one.
# name -> (how the parent is made inside the host's base directory, root's 0755)
UNTRUSTED_PARENTS = {
    "sticky-world-writable": "mkdir -m 1777 {p}",  # what /tmp, /var/tmp and /dev/shm are
    "world-writable": "mkdir -m 0777 {p}",
    "group-writable": "mkdir -m 0775 {p}",
    "owned-by-a-user": "mkdir -m 0755 {p} && chown nobody {p}",
    "a-link": "mkdir -m 0755 {p}.real && ln -s {p}.real {p}",
}


@pytest.mark.parametrize("parent", sorted(UNTRUSTED_PARENTS))
@pytest.mark.parametrize("depth", ["child", "grandchild"])
def test_provision_refuses_a_root_below_a_directory_others_can_write(host: TargetHost, first_run: object, parent: str, depth: str) -> None:
    made = host.base / f"parent-{parent}"
    subprocess.run(["sh", "-c", UNTRUSTED_PARENTS[parent].format(p=made)], check=True)
    try:
        root = made / "cognivern" if depth == "child" else made / "missing" / "cognivern"
        result = host.run(provision_cmd(dataclasses.replace(host.settings(), root=str(root))), stdin="")
        assert result.returncode != 0
        assert f"--root {root} is under {made}" in result.stderr and "not root's alone" in result.stderr, result.stderr
        assert result.stdout == "" and not root.exists() and not (made / "missing").exists()
    finally:
        subprocess.run(["rm", "-rf", "--", str(made), f"{made}.real"], check=True)


def test_provision_accepts_a_root_whose_parents_are_roots_alone(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    """Control for the test above: the host's own ROOT sits below root's 0755 directories (/srv/...)."""
    assert first_run.returncode == 0
    assert stat.S_IMODE(host.base.stat().st_mode) == 0o755 and host.base.stat().st_uid == 0
    assert "not root's alone" not in first_run.stderr


# ---------------------------------------------------------------------------- nginx-site
def get(url: str, **kwargs: object) -> httpx.Response:
    return http_get(url, timeout=5, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site(host: TargetHost, first_run: subprocess.CompletedProcess[str], backend: ThreadingHTTPServer) -> tuple[str, str]:
    s = host.settings()
    name, text = site_name(s.app_name), render_nginx_site(s)
    result = host.run(site_cmd(name), stdin=nginx_site_input(s, text))
    assert result.returncode == 0, result.stderr
    assert "reloaded nginx" in result.stdout
    wait_until(lambda: get(host.nginx.url("/health")).status_code == 200)
    return name, text


def test_nginx_site_serves_through_private_nginx(host: TargetHost, site: tuple[str, str]) -> None:
    name, text = site
    available = host.nginx.sites_available / f"{name}.conf"
    assert available.read_text() == text
    assert os.readlink(host.nginx.sites_enabled / f"{name}.conf") == str(available)
    assert not [p for p in host.nginx.sites_available.iterdir() if p.name.startswith(".")], "temp files left"
    health = get(host.nginx.url("/health"))
    assert health.json()["status"] == "ok" and health.json()["path"] == "/health"
    assert health.headers["server"] == "nginx", "server_tokens off: no version"
    other = get(host.nginx.url("/api/x?y=1"))
    assert other.json()["path"] == "/api/x?y=1"
    assert other.json()["xff"] == "127.0.0.1"


def test_nginx_site_passes_websocket_upgrade(host: TargetHost, site: tuple[str, str]) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", host.nginx.port), timeout=5) as sock:
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 101"), head
        assert f"Sec-WebSocket-Accept: {ws_accept(key)}".encode() in head
        rest = head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(b"hello")
        while len(rest) < 5:
            chunk = sock.recv(16)
            assert chunk
            rest += chunk
        assert rest == b"HELLO", "bytes tunnel both ways after the upgrade"


def settled_workers(host: TargetHost) -> set[int]:
    """nginx's one worker (worker_processes 1) once an earlier test's reload has let the old ones finish."""

    def one() -> set[int]:
        workers = host.nginx.worker_pids()
        return workers if len(workers) == 1 else set()

    return wait_until(one, timeout=30)


def test_nginx_site_unchanged_does_not_reload(host: TargetHost, site: tuple[str, str]) -> None:
    name, text = site
    workers = settled_workers(host)
    result = host.run(site_cmd(name), stdin=text)
    assert result.returncode == 0, result.stderr
    assert "unchanged" in result.stdout
    time.sleep(0.3)
    assert host.nginx.worker_pids() == workers


def test_nginx_site_broken_config_keeps_previous_site(host: TargetHost, site: tuple[str, str]) -> None:
    name, text = site
    workers = settled_workers(host)
    master = host.nginx.master_pid
    broken = text.replace("    server_tokens off;\n", "    server_tokens off;\n    bogus_directive on;\n")
    assert broken != text
    result = host.run(site_cmd(name), stdin=broken)
    assert result.returncode != 0
    assert "bogus_directive" in result.stderr and "nginx -t rejected" in result.stderr
    assert (host.nginx.sites_available / f"{name}.conf").read_text() == text
    assert (host.nginx.sites_enabled / f"{name}.conf").exists()
    assert not [p for p in host.nginx.sites_available.iterdir() if p.name.startswith(".")], "temp files left"
    time.sleep(0.3)
    assert host.nginx.master_pid == master and host.nginx.worker_pids() == workers, "running nginx untouched"
    assert get(host.nginx.url("/health")).status_code == 200


def test_nginx_site_broken_new_site_is_removed(host: TargetHost, site: tuple[str, str]) -> None:
    result = host.run(site_cmd("brand-new"), stdin="server { listen 127.0.0.1:1; bogus_directive on; }\n")
    assert result.returncode != 0
    assert not (host.nginx.sites_available / "brand-new.conf").exists()
    assert not (host.nginx.sites_enabled / "brand-new.conf").is_symlink()
    assert get(host.nginx.url("/health")).status_code == 200


def test_nginx_site_change_reloads_and_starts_stopped_nginx(host: TargetHost, site: tuple[str, str]) -> None:
    name, text = site
    changed = text.replace("client_max_body_size 10m;", "client_max_body_size 11m;")
    workers = host.nginx.worker_pids()
    result = host.run(site_cmd(name), stdin=changed)
    assert result.returncode == 0 and "reloaded nginx" in result.stdout, result.stderr
    wait_until(lambda: host.nginx.worker_pids() and host.nginx.worker_pids().isdisjoint(workers))
    # nginx not running: the script starts it (same -c/-p).
    subprocess.run(host.nginx.argv("-s", "quit"), check=True)
    wait_until(lambda: host.nginx.master_pid is None)
    result = host.run(site_cmd(name), stdin=text)
    assert result.returncode == 0 and "started nginx" in result.stdout, result.stderr
    wait_until(lambda: get(host.nginx.url("/health")).status_code == 200)


def test_nginx_site_creates_the_upstream_only_when_missing(host: TargetHost, site: tuple[str, str]) -> None:
    """The upstream file is the release tool's once it exists: a `pulumi up` re-run never flips the live slot."""
    name, text = site
    s = host.settings()
    upstream = host.nginx.sites_available / f"{name}.upstream"
    assert upstream.read_text() == render_upstream(s, s.port), "created pointing at the blue slot"
    switched = render_upstream(s, s.port + 1)  # what the tool writes after a switch to green
    upstream.write_text(switched)
    try:
        changed = text.replace("client_max_body_size 10m;", "client_max_body_size 12m;")
        result = host.run(site_cmd(name), stdin=nginx_site_input(s, changed))
        assert result.returncode == 0 and "reloaded nginx" in result.stdout, result.stderr
        assert upstream.read_text() == switched
        assert get(host.nginx.url("/health")).status_code == 200, "green is down here: the blue backup answers"
    finally:
        upstream.write_text(render_upstream(s, s.port))
        assert host.run(site_cmd(name), stdin=nginx_site_input(s, text)).returncode == 0


@pytest.mark.parametrize("args", [["--name", "../etc"], ["--name", ""], ["--nam", "x"], [], ["--name", "x", "--upstream-port", "80"]])
def test_nginx_site_rejects_bad_arguments(host: TargetHost, site: tuple[str, str], args: list[str]) -> None:
    result = host.run(script_command(NGINX_SITE, args), stdin="server {}\n")
    assert result.returncode != 0 and result.stderr


# ---------------------------------------------------------------------------- put-file
SECRET = "ROUTEWAY_API_KEY='sk-test-" + hashlib.sha256(b"cognivern").hexdigest()[:24] + "'"


def test_put_file_creates_with_mode_and_owner_then_unchanged(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    dest = host.root / "shared/.env"
    dest.unlink(missing_ok=True)  # starts from a host without it (test_put_file_secret_never_in_output_or_argv writes one)
    u = host.app_user
    content = f"PORT=3000\n{SECRET}\n"
    first = host.run(put_cmd(str(dest), "0600", f"{u}:{u}"), stdin=content)
    assert first.returncode == 0, first.stderr
    assert dest.read_text() == content
    assert owner_mode(dest) == (u, u, "0o600")
    assert "created" in first.stdout
    inode, mtime = dest.stat().st_ino, dest.stat().st_mtime_ns
    again = host.run(put_cmd(str(dest), "0600", f"{u}:{u}"), stdin=content)
    assert again.returncode == 0 and "unchanged" in again.stdout
    assert (dest.stat().st_ino, dest.stat().st_mtime_ns) == (inode, mtime)
    # Same content, wrong mode: fixed.
    dest.chmod(0o644)
    fixed = host.run(put_cmd(str(dest), "0600", u), stdin=content)
    assert fixed.returncode == 0 and "updated" in fixed.stdout
    assert owner_mode(dest) == (u, u, "0o600")
    for out in (first, again, fixed):
        assert "sk-test" not in out.stdout + out.stderr
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".env.")], "temp files left"


def test_put_file_secret_never_in_output_or_argv(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    assert host.sshd is not None
    dest = host.root / "shared/.env"
    u = host.app_user
    content = f"# secret\n{SECRET}\nOTHER=1\n".encode()
    proc = host.sshd.popen(put_cmd(str(dest), "0600", f"{u}:{u}"))
    assert proc.stdin is not None
    proc.stdin.write(content[:12])
    proc.stdin.flush()
    # While the script waits for the rest of stdin, no process shows the secret in its argv.
    seen = []
    for _ in range(10):
        seen.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
        time.sleep(0.05)
    out, err = proc.communicate(input=content[12:], timeout=30)
    assert proc.returncode == 0, err
    assert dest.read_bytes() == content
    assert all("sk-test" not in snapshot for snapshot in seen)
    assert b"sk-test" not in out + err


def test_put_file_replaces_atomically(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    dest = host.root / "config/big.txt"
    versions = [b"a" * 2_000_000, b"b" * 2_000_000]
    assert host.run(put_cmd(str(dest), "0644", "root:root"), stdin=versions[0]).returncode == 0
    stop = threading.Event()
    bad: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            data = dest.read_bytes()
            if data not in versions:
                bad.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(6):
            result = host.run(put_cmd(str(dest), "0644", "root:root"), stdin=versions[(i + 1) % 2])
            assert result.returncode == 0, result.stderr
    finally:
        stop.set()
        thread.join()
    assert not bad, f"readers saw partial files of sizes {bad[:5]}"
    dest.unlink()


def test_put_file_reload_uses_the_release_tool(host: TargetHost, first_run: subprocess.CompletedProcess[str]) -> None:
    root = host.root
    log = root / "shared/logs/reload.log"
    tool = host.bin_dir / "cognivern-release"
    installed = os.readlink(tool)
    release = root / "releases/r1"
    release.mkdir()
    (root / "current").symlink_to(release)

    def stub(text: str | None) -> None:
        tool.unlink()
        if text is not None:
            tool.write_text(text)
            tool.chmod(0o755)

    try:
        eco = str(root / "config/ecosystem.config.cjs")
        # 1) the installed release tool does the reload (it logs its arguments)
        stub(f'#!/usr/bin/env bash\necho "tool $*" >>{log}\n')
        r = host.run(put_cmd(eco, "0644", "root:root", str(root)), stdin="module.exports = {apps: []};\n")
        assert r.returncode == 0, r.stderr
        assert log.read_text() == f"tool --root {root} reload\n"
        unchanged = host.run(put_cmd(eco, "0644", "root:root", str(root)), stdin="module.exports = {apps: []};\n")
        assert "unchanged" in unchanged.stdout and log.read_text().count("\n") == 1, "no reload when unchanged"
        # a failed reload is retried by the next run even though the content is unchanged
        stub(f'#!/usr/bin/env bash\necho "failing $*" >>{log}\nexit 3\n')
        failed = host.run(put_cmd(eco, "0644", "root:root", str(root)), stdin="module.exports = {apps: [0]};\n")
        assert failed.returncode != 0 and "reload failed" in failed.stderr
        assert (root / ".deploy/reload-pending").exists()
        stub(f'#!/usr/bin/env bash\necho "tool $*" >>{log}\n')
        retried = host.run(put_cmd(eco, "0644", "root:root", str(root)), stdin="module.exports = {apps: [0]};\n")
        assert retried.returncode == 0 and "retrying the reload" in retried.stdout, retried.stdout + retried.stderr
        assert log.read_text().splitlines()[-1] == f"tool --root {root} reload"
        assert not (root / ".deploy/reload-pending").exists()
        # 2) no release tool: nothing else starts the apps (no shell script as before); retried next time
        stub(None)
        r = host.run(put_cmd(eco, "0644", "root:root", str(root)), stdin="module.exports = {apps: [] };\n")
        assert r.returncode != 0 and "the release tool" in r.stderr and "is not installed" in r.stderr, r.stderr
        assert (root / ".deploy/reload-pending").exists()
        # 3) no current yet: nothing to reload
        (root / "current").unlink()
        r = host.run(put_cmd(eco, "0644", "root:root", str(root)), stdin="module.exports = {apps: [1] };\n")
        assert r.returncode == 0 and "reload: skipped" in r.stdout
    finally:
        if tool.is_symlink() or tool.exists():
            tool.unlink()
        tool.symlink_to(installed)
        for p in (root / "current", log, root / "config/ecosystem.config.cjs", root / ".deploy/reload-pending"):
            if p.is_symlink() or p.exists():
                p.unlink()
        release.rmdir()


def test_install_tool_installs_the_real_tool_by_rename_and_keeps_the_version_before(
    host: TargetHost, first_run: subprocess.CompletedProcess[str]
) -> None:
    """The bundle the program sends (ReleaseTool's install): installed as a directory named by its digest, `current` and the
    command switched by rename; the same bundle again changes nothing; a malformed one is refused
    with the installed tool untouched."""
    lib = host.bin_dir.parent / "lib" / "cognivern-release"
    before = os.readlink(lib / "current")
    try:
        tool_files = bundle(release_tool_files())
        first = host.run(install_tool_cmd(), stdin=tool_files)
        assert first.returncode == 0, first.stderr
        digest = os.readlink(lib / "current")
        assert digest != before and f"release tool: installed {digest}" in first.stdout
        assert sorted(p.name for p in lib.iterdir()) == sorted([before, digest, "current"]), "the version before stays"
        help_text = host.run("cognivern-release --help")
        assert help_text.returncode == 0 and "install ID SOURCE SHA256" in help_text.stdout, help_text.stderr
        files = {str(p.relative_to(lib / digest)): owner_mode(p) for p in (lib / digest).rglob("*")}
        assert files["cognivern-release"] == ("root", "root", "0o755")
        assert files["cognivern_release/facts.py"] == ("root", "root", "0o644")
        again = host.run(install_tool_cmd(), stdin=tool_files)
        assert f"release tool: ok (already {digest})" in again.stdout
        for bad in (FAKE_TOOL, BUNDLE_MARKER.format("../escape") + "\nx\n", BUNDLE_MARKER.format("cognivern_release/x.sh") + "\nx\n"):
            refused = host.run(install_tool_cmd(), stdin=bad)
            assert refused.returncode != 0 and "is not a bundle of the release tool's files" in refused.stderr, refused.stderr
            assert os.readlink(lib / "current") == digest and not list(lib.glob(".stage.*"))
        assert not (host.bin_dir.parent / "escape").exists()
        # provision.sh takes the same files in front of its own (test hosts prepare a host in one command)
        both = host.run(provision_cmd(host.settings()), stdin=release_tool_bundle())
        assert both.returncode == 0 and f"provision: release tool: ok (already {digest})" in both.stdout, both.stderr
    finally:
        assert host.run(install_tool_cmd(), stdin=FAKE_BUNDLE).returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dest", "relative/.env", "--mode", "0600", "--owner", "root"], "--dest must be an absolute"),
        (["--dest", "/tmp/../etc/x", "--mode", "0600", "--owner", "root"], "--dest must be an absolute"),
        (["--dest", "/tmp/x y", "--mode", "0600", "--owner", "root"], "--dest must be an absolute"),
        (["--dest", "{d}/x", "--mode", "999", "--owner", "root"], "--mode must be an octal"),
        (["--dest", "{d}/x", "--mode", "4755", "--owner", "root"], "--mode must be an octal"),
        (["--dest", "{d}/x", "--mode", "0600", "--owner", "Root"], "--owner user must be"),
        (["--dest", "{d}/x", "--mode", "0600", "--owner", "root:"], "--owner group must be"),
        (["--dest", "{d}/x", "--mode", "0600", "--owner", "nosuchuser1"], "user nosuchuser1 does not exist"),
        (["--dest", "{d}/missing/x", "--mode", "0600", "--owner", "root"], "does not exist"),
        (["--dest", "{d}/x", "--mode", "0600"], "--owner is required"),
        (["--dest", "{d}/x", "--mode", "0600", "--owner", "root", "--reload", "{d}"], "unknown argument: --reload"),
        (["--dest", "{d}/x", "--mode", "0600", "--owner", "root", "--reload-root", "x"], "--reload-root must be"),
    ],
)
def test_put_file_rejects_bad_arguments(host: TargetHost, first_run: object, args: list[str], message: str) -> None:
    d = str(host.root / "config")
    argv = [a.replace("{d}", d) for a in args]
    result = host.run(script_command(PUT_FILE, argv), stdin=SECRET)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "sk-test" not in result.stdout + result.stderr
    assert not (host.root / "config/x").exists()
    assert not [p for p in (host.root / "config").iterdir() if p.name.startswith(".")]
