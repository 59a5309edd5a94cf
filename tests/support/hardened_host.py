"""A provisioned TargetHost driven the way the program drives it, for the hardening tests.

provision.sh (over SSH, as root), then put-file for cognivern.conf, the ecosystem file and
shared/.env, then the installed `cognivern-release` for releases. Nothing is mocked: the attack and
backup tests need the real layout, owners and modes that provisioning makes.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.host import NGINX_SITE, PROVISION, PUT_FILE, env_file, host_bundle, nginx_site_input, provision_args
from components.remote import script_command
from components.render import (
    ENV_PRELOAD,
    NginxTarget,
    env_preload_path,
    render_ecosystem,
    render_env,
    render_nginx_site,
    render_release_conf,
    site_name,
)
from components.settings import Settings
from components.tool import INSTALL_TOOL, bundle, release_tool_files
from tests.support.release_host import build_release_tarball, read_state
from tests.support.target_host import SYSTEM_PATH, TargetHost, end_user_processes

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "scripts" / "ops"


class HardenedHost:
    """`TargetHost` + the program's host steps; `tool(...)` runs the installed release tool as root."""

    def __init__(self, target: TargetHost, tmp: Path, **config: object) -> None:
        self.target = target
        self.tmp = tmp
        self.root = target.root
        self.user = target.app_user
        self.config: dict[str, object] = {"healthTimeout": 10, "waitReady": True, "listenTimeoutMs": 4000, "bakeSeconds": 2, **config}
        self.settings: Settings = target.settings(**self.config)
        self.env_serial = 0

    # -- the program's steps ---------------------------------------------------------------
    def provision(self) -> subprocess.CompletedProcess[str]:
        """provision.sh, then the release tool's own install (the program's two commands): provisioning's
        result, or the install's when that failed."""
        provisioned = self.target.run(script_command(PROVISION, provision_args(self.settings)), stdin=host_bundle())
        if provisioned.returncode != 0:
            return provisioned
        tool = self.target.run(script_command(INSTALL_TOOL, []), stdin=bundle(release_tool_files()))
        return provisioned if tool.returncode == 0 else tool

    def put(self, dest: str, mode: str, owner: str, content: str, reload: bool = False) -> subprocess.CompletedProcess[str]:
        argv = ["--dest", dest, "--mode", mode, "--owner", owner] + (["--reload-root", str(self.root)] if reload else [])
        return self.target.run(script_command(PUT_FILE, argv), stdin=content)

    def put_env(self, **extra: str) -> subprocess.CompletedProcess[str]:
        s = self.settings
        return self.put(*env_file(s), render_env({**s.stack_env, **extra}, s.secret_env), reload=True)

    @property
    def front_port(self) -> int:
        """The host's nginx site: where clients reach whichever slot is live."""
        return self.target.nginx.port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.front_port}{path}"

    def prepare(self) -> None:
        """provision + the runtime files + the nginx site, as `pulumi up` does before any release."""
        s = self.settings
        nginx = self.target.nginx
        target = NginxTarget(conf=str(nginx.conf_path), prefix=str(nginx.prefix))
        site = script_command(NGINX_SITE, ["--name", site_name(s.app_name)])
        for result in (
            self.provision(),
            self.put(f"{s.root}/config/cognivern.conf", "0644", "root:root", render_release_conf(s, target)),
            self.put(env_preload_path(s.root), "0644", "root:root", ENV_PRELOAD.read_text()),
            self.put(f"{s.root}/config/ecosystem.config.cjs", "0644", "root:root", render_ecosystem(s), reload=True),
            self.put_env(),
            self.target.run(site, stdin=nginx_site_input(s, render_nginx_site(s))),
        ):
            assert result.returncode == 0, result.stdout + result.stderr

    # -- the release tool ------------------------------------------------------------------
    def tool(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.target.bin_dir / "cognivern-release"), "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={"PATH": f"{self.target.bin_dir}:{SYSTEM_PATH}", "LANG": "C.UTF-8"},
            cwd="/",
        )

    def ok(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        result = self.tool(*args, timeout=timeout)
        assert result.returncode == 0, f"cognivern-release {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
        return result

    def install(self, release_id: str, mode: str = "ok", **fixture: object) -> subprocess.CompletedProcess[str]:
        tarball, sha = build_release_tarball(self.tmp / "artifacts", release_id, mode, **fixture)
        dest = self.root / "incoming" / tarball.name
        shutil.copy(tarball, dest)
        return self.tool("install", release_id, str(dest), sha)

    def state(self) -> dict[str, Any]:
        """The release tool's state (ROOT/config/state.json)."""
        return read_state(self.root)

    def current(self) -> str | None:
        link = self.root / "current"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    def ops(self, *args: str) -> subprocess.CompletedProcess[str]:
        """scripts/ops against this host: COGNIVERN_SSH is a stand-in ssh that runs the line as root here."""
        fake_ssh = self.tmp / "fake-ssh"
        if not fake_ssh.exists():
            fake_ssh.write_text('#!/usr/bin/env bash\n# ssh stand-in: fake-ssh root@host -- LINE\nshift 2\nexec bash -c "$1"\n')
            fake_ssh.chmod(0o755)
        return subprocess.run(
            [str(OPS), "stack", *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env={
                "PATH": f"{self.target.bin_dir}:{SYSTEM_PATH}",
                "COGNIVERN_SSH": f"{fake_ssh} root@127.0.0.1",
                "COGNIVERN_ROOT": str(self.root),
            },
        )

    # -- as the app user -------------------------------------------------------------------
    def as_app(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        home = pwd.getpwnam(self.user).pw_dir
        return subprocess.run(
            ["runuser", "-u", self.user, "--", "env", "-i", f"HOME={home}", f"PATH={SYSTEM_PATH}", *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
            cwd="/",
        )


@contextmanager
def hardened_host(tmp: Path, **config: object) -> Iterator[HardenedHost]:
    """A started TargetHost, provisioned with the runtime files in place; everything removed after."""
    with TargetHost() as target:
        host = HardenedHost(target, tmp, **config)
        host.prepare()
        yield host


@contextmanager
def other_user() -> Iterator[str]:
    """A second unprivileged account (test-only, removed afterwards)."""
    name = f"cgo{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/bash", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        end_user_processes(name)
        subprocess.run(["userdel", name], capture_output=True, check=False)


def snapshot(path: Path) -> Mapping[str, object]:
    """Owner, mode and content of a file, or of a directory and everything in it (links not followed)."""
    out: dict[str, object] = {}
    items = [path, *sorted(path.rglob("*"))] if path.is_dir() and not path.is_symlink() else [path]
    for item in items:
        st = item.lstat()
        content = item.read_bytes() if item.is_file() and not item.is_symlink() else None
        out[str(item)] = (st.st_uid, st.st_gid, oct(st.st_mode), content)
    return out
