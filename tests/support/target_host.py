"""A disposable "server" on this machine: private sshd + private nginx + temp ROOT + unique app user.

    with TargetHost() as host:
        s = host.settings(release="r1")                  # Settings pointing at this host
        host.run(script_command(PROVISION, [...]))
        httpx.get(host.nginx.url("/health"))

The program's commands run unmodified (root over SSH, as the program does for sshUser=root):
the sshd's `SetEnv` hands every command the COGNIVERN_* overrides (`host.env`) so the host
scripts write to temp locations instead of /usr/local/bin, /etc/logrotate.d, /etc/ssh and
/etc/nginx, and PATH starts with `bin_dir`, so an installed `cognivern-release` is found by name.

Cleanup (on exit, also after failures): nginx and sshd stopped, the app user's PM2 killed with
its own PM2_HOME, any process left under the (unique, test-only) app user ended by pid, the user
removed with `userdel -r` (and the build account provisioning made for it), temp dirs removed.
Nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from components.release.cognivern_release import facts
from components.settings import Settings, parse_settings
from tests.support.helpers import SYSTEM_PATH, DisposableHost, end_user_processes, free_port_pair, root_base, run_pm2, user_pids
from tests.support.nginx import PrivateNginx
from tests.support.sshd import LocalSshd

__all__ = ["SYSTEM_PATH", "TargetHost", "end_user_processes", "node_major", "user_pids"]  # the helpers live in helpers.py


class TargetHost(DisposableHost):
    """Attributes:
    base       its own directory in /srv (helpers.root_base) holding root/, bin/, logrotate.d/
    root       the deployment ROOT (cognivern:root), e.g. /srv/cognivern-host-xxxx/root (not yet created)
    bin_dir    COGNIVERN_BIN_DIR (cognivern-release goes here)
    logrotate_dir  COGNIVERN_LOGROTATE_DIR
    systemd_dir    COGNIVERN_SYSTEMD_DIR: provisioning writes its unit files there (no systemd runs here)
    app_user   unique per host ("cvt" + 8 hex), created by provision.sh, removed on cleanup
    app_home   /home/<app_user>;  pm2_home  <app_home>/.pm2
    app_port   a free loopback port for the backend (cognivern:port)
    nginx      PrivateNginx (port = the site's listen port)
    sshd       LocalSshd (root login; SetEnv = env)
    env        the COGNIVERN_* overrides (and PATH) every SSH command sees
    """

    def __init__(self, *, app_user: str | None = None, start_nginx: bool = True, sshd_reexec_delay: float = 0) -> None:
        self.base = root_base("cognivern-host-")
        self.root = self.base / "root"
        self.bin_dir = self.base / "bin"
        self.logrotate_dir = self.base / "logrotate.d"
        self.systemd_dir = self.base / "systemd"
        self.bin_dir.mkdir()
        self.logrotate_dir.mkdir()
        self.app_user = app_user or f"cvt{uuid.uuid4().hex[:8]}"
        self.app_home = Path("/home") / self.app_user
        self.pm2_home = self.app_home / ".pm2"
        self.app_port = free_port_pair()  # blue on it, green on +1
        self.start_nginx = start_nginx
        self.nginx = PrivateNginx(autostart=False)
        self.sshd: LocalSshd | None = None
        self.env: dict[str, str] = {}
        try:
            self.sshd = LocalSshd(
                set_env={
                    "PATH": f"{self.bin_dir}:{SYSTEM_PATH}",
                    "COGNIVERN_BIN_DIR": str(self.bin_dir),
                    "COGNIVERN_LOGROTATE_DIR": str(self.logrotate_dir),
                    "COGNIVERN_SYSTEMD_DIR": str(self.systemd_dir),
                    "COGNIVERN_SSHD_CONFIG": "{config}",
                    "COGNIVERN_SSHD_PIDFILE": "{pidfile}",
                    **self.nginx.env,
                },
                reexec_delay=sshd_reexec_delay,
            )
            self.env = dict(self.sshd.set_env)
        except Exception:
            self.cleanup()
            raise

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        assert self.sshd is not None
        self.sshd.start()
        if self.start_nginx:
            self.nginx.start()

    def cleanup(self) -> None:
        """Stop everything this host started and remove what it created. Safe to call twice."""
        with contextlib.suppress(Exception):
            self.nginx.stop()
        if self.sshd is not None:
            with contextlib.suppress(Exception):
                self.sshd.stop()
        if self.user_exists():
            self.kill_pm2()
            self._end_user_processes()
            subprocess.run(["userdel", "-r", self.app_user], capture_output=True)
            if self.app_home.exists() and self.app_home.name == self.app_user:
                shutil.rmtree(self.app_home, ignore_errors=True)
        build = facts.build_user(self.app_user)  # the account provisioning made to run pnpm install
        with contextlib.suppress(KeyError):
            pwd.getpwnam(build)
            end_user_processes(build)
            subprocess.run(["userdel", build], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def user_exists(self) -> bool:
        try:
            pwd.getpwnam(self.app_user)
        except KeyError:
            return False
        return True

    def kill_pm2(self) -> None:
        """`pm2 kill` as the app user with its own PM2_HOME (never the default ~/.pm2 of root)."""
        if not any((self.pm2_home / f).exists() for f in ("pm2.pid", "rpc.sock")):
            return
        run_pm2(self.app_user, self.app_home, self.pm2_home, "kill")

    def user_pids(self) -> list[int]:
        """Processes running as the (test-only) app user."""
        return user_pids(self.app_user)

    def _end_user_processes(self) -> None:
        end_user_processes(self.app_user)

    # ------------------------------------------------------------------ program view
    def run(self, command: str, stdin: bytes | str | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command string over SSH as the program would (see LocalSshd.run)."""
        assert self.sshd is not None
        return self.sshd.run(command, stdin, **kwargs)

    def config(self, **values: object) -> dict[str, str]:
        """Raw stack config (as Pulumi stores it: strings, JSON for lists/objects) for this host."""
        assert self.sshd is not None
        raw: dict[str, object] = {
            "release": "test-release",
            "host": "127.0.0.1",
            "sshUser": "root",
            "sshPort": self.sshd.port,
            "hostKey": self.sshd.host_key,
            "sshPrivateKey": self.sshd.private_key,
            "root": str(self.root),
            "appUser": self.app_user,
            "port": self.app_port,
            "nodeMajor": node_major(),
            "nginxListen": [f"127.0.0.1:{self.nginx.port}"],
            "bakeSeconds": 2,  # short bakes: the suite's time budget (the mechanism is the same)
        }
        raw.update(values)
        return {k: _config_string(v) for k, v in raw.items() if v is not None}

    def settings(self, **values: object) -> Settings:
        """`parse_settings` over `config(**values)`: the Settings the program would build for this host."""
        cfg = self.config(**values)
        return parse_settings(cfg.get)

    def connection(self) -> dict[str, object]:
        """What a remote.ConnectionArgs needs to reach this host."""
        assert self.sshd is not None
        return {
            "host": "127.0.0.1",
            "port": self.sshd.port,
            "user": "root",
            "private_key": self.sshd.private_key,
            "host_key": self.sshd.host_key,
        }


def node_major() -> int:
    """The installed Node.js major (so provision.sh does not try to install another one)."""
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return int(out.lstrip("v").split(".")[0])


def _config_string(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)
