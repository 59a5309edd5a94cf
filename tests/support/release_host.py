"""A throwaway server layout for exercising cognivern-release for real (Node, pnpm, PM2).

`ReleaseHost` lays out a temp ROOT the way provisioning does, renders conf/ecosystem/.env with
components.render from a real `Settings`, gives PM2 a private home (PM2_HOME in cognivern.conf),
puts a private nginx in front of the two slots (the rendered site on `front_port`, the upstream
file the tool switches), installs the tool into a bin dir of its own as provisioning installs it
(`install_release_tool`), and runs it from there. `url()` goes through nginx, as clients do.
Used by tests/test_release_tool.py and bench/release_bench.py.
"""

from __future__ import annotations

import grp
import io
import json
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.host import env_file, release_tool_files
from components.release.cognivern_release import facts
from components.release.cognivern_release.facts import shell_prelude
from components.release.component import TOOL as TOOL_NAME
from components.release.component import sha256_file
from components.remote import LIB
from components.render import (
    ENV_PRELOAD,
    NginxTarget,
    env_preload_path,
    render_ecosystem,
    render_env,
    render_nginx_site,
    render_release_conf,
    render_upstream,
    site_name,
    upstream_include,
)
from components.settings import Settings, parse_settings
from tests.support.helpers import DisposableHost, end_user_processes, free_port_pair, http_get, port_open, root_base, run_pm2
from tests.support.nginx import PrivateNginx

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "components" / "release" / "cognivern-release"
FIXTURE_APP = REPO / "tests" / "fixtures" / "app"
APP_USER = "cgv-rt"  # the benches' user; tests take a unique one (unique_app_user) so parallel runs never share one
SECRET_VALUE = "fixture-secret-must-never-be-printed"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def build_release_tarball(out_dir: Path, release_id: str, mode: str = "ok", **fixture: object) -> tuple[Path, str]:
    """The fixture app as a release artifact (dist/, package.json, pnpm-lock.yaml, config/)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cognivern-{release_id}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("package.json", "pnpm-lock.yaml"):
            tar.add(FIXTURE_APP / name, arcname=name)
        tar.add(FIXTURE_APP / "dist", arcname="dist")
        for item in sorted((FIXTURE_APP / "config").iterdir()):
            if item.name != "fixture.json":
                tar.add(item, arcname=f"config/{item.name}")
        _add_bytes(tar, "config/fixture.json", json.dumps({"mode": mode, **fixture}).encode())
    return path, sha256_file(path)


def build_evil_tarball(out_dir: Path, name: str, member: str = "../../escaped.txt") -> tuple[Path, str]:
    """A tarball with a member (`../`, absolute) that would escape releases/ID if unpacked naively."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(FIXTURE_APP / "package.json", arcname="package.json")
        _add_bytes(tar, member, b"escaped\n")
    return path, sha256_file(path)


def read_state(root: Path) -> dict[str, Any]:
    """The release tool's state (ROOT/config/state.json), or {} before the tool wrote it."""
    path = root / facts.STATE_FILE
    state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return state


def install_release_tool(tool: Path, base: Path) -> Path:
    """The release tool installed under `base` as provision.sh installs it on a server (lib.sh's
    install_release_tool: base/lib/cognivern-release/<digest>/, root's, base/bin/cognivern-release
    linking to its launcher); the installed command. The tool's files come from
    components.host.release_tool_files, as provisioning's stdin carries them; nothing is run from
    the checkout, which may sit where other users cannot enter (a clone under a 0700 home).
    An older bash tool (bench/release_designs.py's baseline) is copied with its Node helper beside it."""
    bin_dir = base / "bin"
    bin_dir.mkdir(mode=0o755, exist_ok=True)
    if tool.suffix == ".sh":
        for source, mode in ((tool, 0o755), (tool.parent / "cognivern-pm2.cjs", 0o644)):
            dest = bin_dir / (TOOL_NAME if source == tool else source.name)
            if source.exists():
                shutil.copyfile(source, dest)
                os.chown(dest, 0, 0)
                dest.chmod(mode)
        return bin_dir / TOOL_NAME
    files = base / "tool-files"
    for name, text in release_tool_files():
        (files / name).parent.mkdir(parents=True, exist_ok=True)
        (files / name).write_text(text)
    script = f'{LIB.read_text()}\n{shell_prelude()}script_init install-tool \'\'\ninstall_release_tool "$1" "$2"\n'
    subprocess.run(["bash", "-c", script, "install-tool", str(files), str(bin_dir)], check=True, capture_output=True)
    shutil.rmtree(files)
    return bin_dir / TOOL_NAME


def unique_app_user() -> str:
    """A fresh test-only user name: ReleaseHosts of concurrent test runs never share a user or its processes."""
    return f"cgvr{uuid.uuid4().hex[:8]}"


def ensure_app_user(name: str = APP_USER) -> pwd.struct_passwd:
    """The app user and its build account (the one that runs pnpm install), as provisioning makes them."""
    build = facts.build_user(name)
    try:
        pwd.getpwnam(build)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", build], check=True)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "--shell", "/bin/bash", name], check=True)
        return pwd.getpwnam(name)


def remove_app_user(name: str = APP_USER) -> None:
    for user in (name, facts.build_user(name)):
        end_user_processes(user)
        subprocess.run(["userdel", "-r", user], check=False, capture_output=True)


@dataclass
class ReleaseHost(DisposableHost):
    """A temp ROOT laid out like provisioning, plus helpers to run the tool and talk to the app.

    Nothing runs until the tool starts PM2; `cleanup()` (alias `stop()`) kills this host's PM2
    daemon and removes ROOT. `snapshot()`/`restore()` let a test module install once and give
    every test the same starting state (ROOT and PM2_HOME as they were, no daemon running).
    """

    user: str = APP_USER
    port: int = field(default_factory=free_port_pair)
    extra_config: Mapping[str, str] = field(default_factory=dict)
    root: Path = field(init=False)
    bin_dir: Path = field(init=False)  # where the tool is installed: bin/, lib/ (install_release_tool)
    installed_tool: Path = field(init=False)
    nginx: PrivateNginx = field(init=False)
    pm2_home: Path = field(init=False)
    settings: Settings = field(init=False)
    tool = TOOL  # the release tool it installs and runs (bench/release_bench.py gives one from an older commit)

    def __post_init__(self) -> None:
        self.root = root_base("cgv_root_")
        self.bin_dir = root_base("cgv_bin_")
        self.installed_tool = install_release_tool(self.tool, self.bin_dir)
        self.pm2_home = self.root / "pm2-home"
        self._upstreams: dict[Path, str] = {}
        self.nginx = PrivateNginx()
        config = {
            "release": "fixture-1",
            "host": "127.0.0.1",
            "root": str(self.root),
            "appUser": self.user,
            "port": str(self.port),
            "waitReady": "true",
            "listenTimeoutMs": "4000",
            "killTimeoutMs": "3000",
            "healthTimeout": "10",
            "bakeSeconds": "2",
            "nginxListen": json.dumps([f"127.0.0.1:{self.nginx.port}"]),
            "keepReleases": "3",
            "dataBackupsKeep": "3",
            "env": json.dumps({"FIXTURE_ECHO": "hello-from-env"}),
            "secretEnv": json.dumps({"FIXTURE_SECRET": SECRET_VALUE}),
            **self.extra_config,
        }
        self.settings = parse_settings(config.get)
        self.config = config  # what `settings` was parsed from (a bench renders an older commit's files from it)
        self.layout()
        self.nginx.start()  # (users that never call start(), such as the benches, get it too)

    # -- layout, like provisioning -------------------------------------------------------
    def layout(self) -> None:
        pw = pwd.getpwnam(self.user)
        own = (pw.pw_uid, pw.pw_gid)
        for sub in ("releases", "shared", "shared/data", "shared/logs", "cache", "backups", "config", ".deploy", "incoming"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("releases", "shared", "shared/data", "shared/logs", "cache", "backups"):
            os.chown(self.root / sub, *own)
        (self.root / ".deploy").chmod(0o700)  # root's only, as provisioning makes it
        self.pm2_home.mkdir(exist_ok=True)
        os.chown(self.pm2_home, *own)
        s = self.settings
        shutil.copy(ENV_PRELOAD, env_preload_path(s.root))  # every app process loads it (the ecosystem's node_args)
        (self.root / "config" / "ecosystem.config.cjs").write_text(render_ecosystem(s))
        target = NginxTarget(conf=str(self.nginx.conf_path), prefix=str(self.nginx.prefix))
        conf = render_release_conf(s, target) + f"PM2_HOME={self.pm2_home}\n"
        (self.root / "config" / "cognivern.conf").write_text(conf)
        env_path, env_mode, env_owner = env_file(s)  # as the program writes it: root's, the app's group reads it
        env = Path(env_path)
        env.write_text(render_env(s.stack_env, s.secret_env))
        os.chown(env, pwd.getpwnam(env_owner.split(":")[0]).pw_uid, grp.getgrnam(env_owner.split(":")[1]).gr_gid)
        env.chmod(int(env_mode, 8))
        name = site_name(s.app_name)
        (self.nginx.sites_available / f"{name}.conf").write_text(render_nginx_site(s))
        (self.nginx.sites_enabled / f"{name}.conf").symlink_to(self.nginx.sites_available / f"{name}.conf")
        self.upstream_file.write_text(render_upstream(s, s.port))

    def set_conf(self, **values: str) -> None:
        """Override settings in config/cognivern.conf (later lines win when the tool sources it)."""
        with (self.root / "config" / "cognivern.conf").open("a") as conf:
            conf.writelines(f"{key}={value}\n" for key, value in values.items())

    @property
    def upstream_file(self) -> Path:
        """The nginx upstream file the tool rewrites at each switch."""
        return self.nginx.prefix / upstream_include(self.settings.app_name)

    def _start(self) -> None:
        self.nginx.start()

    @property
    def front_port(self) -> int:
        """nginx's port: where clients reach whichever slot is live."""
        return self.nginx.port

    def state(self) -> dict[str, Any]:
        """The tool's state (ROOT/config/state.json); empty before the tool wrote it."""
        return read_state(self.root)

    def slots(self) -> dict[str, str]:
        """The state's slots (live, blue, green, agent; "" for an empty one); empty before the first activation."""
        return {k: v or "" for k, v in self.state().get("slots", {}).items()}

    def bad(self, release_id: str) -> bool:
        """Whether the release is marked bad in the state."""
        return "bad" in self.state().get("releases", {}).get(release_id, {})

    def journal(self) -> dict[str, Any] | None:
        """The journal of an activation under way (one a killed worker left), or None."""
        journal: dict[str, Any] | None = self.state().get("journal")
        return journal

    def slot_port(self, slot: str) -> int:
        return self.port if slot == "blue" else self.port + 1

    # -- the tool ------------------------------------------------------------------------
    def run(
        self, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.installed_tool), "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(self.installed_tool), "--root", str(self.root), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def ok(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = self.run(*args, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"cognivern-release {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
        return proc

    def upload(self, tarball: Path) -> Path:
        """Copy a tarball into ROOT/incoming, as the deploy's upload step does."""
        dest = self.root / "incoming" / tarball.name
        shutil.copy(tarball, dest)
        return dest

    def install(self, release_id: str, tarball: Path, sha: str) -> subprocess.CompletedProcess[str]:
        return self.ok("install", release_id, str(self.upload(tarball)), sha)

    def list_json(self) -> dict[str, Any]:
        listing: dict[str, Any] = json.loads(self.ok("list", "--json").stdout)
        return listing

    def current(self) -> str | None:
        link = self.root / "current"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    # -- the app -------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.front_port}{path}"

    def get_json(self, path: str, timeout: float = 3) -> tuple[int, dict[str, object]]:
        r = http_get(self.url(path), timeout=timeout)
        return r.status_code, r.json()

    def serving_release(self) -> str:
        status, body = self.get_json("/release")
        assert status == 200, body
        return str(body["release"])

    def serving_pid(self) -> int:
        """The pid of the worker that answered (the fixture names it): unchanged means not reloaded."""
        status, body = self.get_json("/release")
        assert status == 200, body
        return int(str(body["pid"]))

    def pm2(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_pm2(self.user, Path(pwd.getpwnam(self.user).pw_dir), self.pm2_home, *args)

    def data_digest(self) -> dict[str, str]:
        data = self.root / "shared" / "data"
        return {str(p.relative_to(data)): sha256_file(p) for p in sorted(data.rglob("*")) if p.is_file()}

    def log_lines(self) -> list[list[str]]:
        log = self.root / ".deploy" / "releases.log"
        return [line.split(" ") for line in log.read_text().splitlines()] if log.exists() else []

    # -- state -----------------------------------------------------------------------------
    def stop_pm2(self) -> None:
        """Kill this host's PM2 daemon and its apps; wait until the app port is closed."""
        if any((self.pm2_home / f).exists() for f in ("pm2.pid", "rpc.sock")):
            self.pm2("kill")
        self._wait_port_closed()

    def _wait_port_closed(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (port_open(self.port) or port_open(self.port + 1)):
            time.sleep(0.1)

    def snapshot(self) -> Path:
        """Stop PM2 and copy ROOT (PM2_HOME included) aside; `restore(path)` brings it back."""
        self.stop_pm2()
        snap = Path(tempfile.mkdtemp(prefix="cgv_snap_", dir="/tmp"))
        subprocess.run(["cp", "-a", f"{self.root}/.", str(snap)], check=True)
        self._upstreams[snap] = self.upstream_file.read_text()
        return snap

    def restore(self, snap: Path) -> None:
        """ROOT and PM2_HOME exactly as at `snapshot()`, with no PM2 daemon or app process left running.

        The user is test-only and its PM2_HOME is replaced below, so its processes (the daemon, the
        app, a pre-flight, a tool child) are SIGKILLed, not stopped through `pm2 kill`: that was a
        PM2 CLI start (a node process, about a second of CPU) and a graceful app stop per test."""
        end_user_processes(self.user, graceful=False)
        self._wait_port_closed()
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        subprocess.run(["cp", "-a", f"{snap}/.", str(self.root)], check=True)
        self.upstream_file.write_text(self._upstreams[snap])
        if self.nginx.master_pid is not None:
            self.nginx.reload()

    # -- teardown ------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Kill this host's PM2 daemon (and its apps); remove the temp root."""
        self.stop_pm2()
        self.nginx.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.bin_dir, ignore_errors=True)

    stop = cleanup
