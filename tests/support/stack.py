"""A stack deployed by the real engine (tests/support/real_engine.py), its config evolving like `pulumi config set`.

Shared by the deploy scenarios and the interrupted-deploy test (TargetStack: one TargetHost), the
several-servers test (NetnsHosts behind a balancer), the pristine-host scenarios (PristineStack: a
Debian booted with systemd, tests/support/pristine_host.py) and bench/engine_bench.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from components.settings import SECRET_KEYS
from tests.support.helpers import SYSTEM_PATH, http_get, run_pm2
from tests.support.pristine_host import PristineHost
from tests.support.real_engine import RealEngine, RunReport
from tests.support.release_host import build_release_tarball
from tests.support.target_host import TargetHost

RELEASE_STEPS = ("upload", "activate", "prune")  # a release's resources (one server), in order
TRIGGERED_STEPS = ("upload", "activate")  # those a release change replaces (prune's trigger is keepReleases)
# Fixture-friendly PM2 and health timings: the fixture app signals `ready` and shuts down in ms.
FIXTURE_SETTINGS: dict[str, Any] = {"waitReady": True, "healthTimeout": 10, "listenTimeoutMs": 4000, "killTimeoutMs": 3000}


class DeployStack:
    def __init__(self, host_config: Callable[..., dict[str, str]], tmp: Path, **settings: Any) -> None:
        """`host_config(**settings)` turns the stack's settings into config pointing at the test host(s)."""
        self.host_config = host_config
        self.tmp = tmp
        self.engine = RealEngine(tmp / "engine")
        self.settings: dict[str, Any] = {**FIXTURE_SETTINGS, **settings}

    def artifact(self, release: str, mode: str = "ok", **fixture: object) -> str:
        """The fixture app as `cognivern-<release>.tar.gz` with its .sha256, as scripts/build-artifact leaves it."""
        path, sha = build_release_tarball(self.tmp / "artifacts", release, mode, **fixture)
        path.with_name(path.name + ".sha256").write_text(f"{sha}  {path.name}\n")
        return str(path)

    def config(self, **changes: Any) -> dict[str, str]:
        """The stack config after `changes` (kept for later runs, like `pulumi config set`; None removes)."""
        self.settings.update(changes)
        return self.host_config(**{k: v for k, v in self.settings.items() if v is not None})

    def up(self, *, check: bool = True, **changes: Any) -> RunReport:
        return readable(self.engine.up(self.config(**changes), secret_keys=SECRET_KEYS, check=check))

    def preview(self, **changes: Any) -> RunReport:
        """`pulumi preview --diff` of the config after `changes` (kept, like a `config set` before a preview)."""
        return readable(self.engine.preview(self.config(**changes), secret_keys=SECRET_KEYS))


def readable(report: RunReport) -> RunReport:
    """Every run, passed or failed, reads as the engine's and the tool's messages: no Python traceback.
    Lines of a preview's diff (`- ...`, `+ ...`: a script or the tool's source that changed) are text
    the program sends, not what it printed, and are not looked at."""
    printed = "\n".join(line for line in report.output.splitlines() if not line.lstrip().startswith(("- ", "+ ")))
    assert "Traceback (most recent call last)" not in printed and "KeyboardInterrupt" not in printed, report.output
    return report


class TargetStack(DeployStack):
    """A stack on one TargetHost: its config, the engine that deploys it and views of the host."""

    def __init__(self, host: TargetHost, tmp: Path, **settings: Any) -> None:
        super().__init__(host.config, tmp, **settings)
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

    def release_state(self) -> dict[str, str]:
        """The release id each release resource's state was last created for (its first trigger)."""
        steps = {f"cognivern-test-release-{step}": step for step in TRIGGERED_STEPS}
        return {steps[name]: r["inputs"]["triggers"][0] for name, r in self.engine.resources().items() if name in steps}


class PristineStack(DeployStack):
    """A stack on one PristineHost in existing-host mode, with the program's defaults for paths and
    users; views of the guest through nsenter (`host.run`), never through SSH, so the guest's SSH
    log holds the deploy's sessions only."""

    APP_USER, ROOT = "cognivern", "/opt/cognivern"

    def __init__(self, host: PristineHost, tmp: Path, **settings: Any) -> None:
        super().__init__(host.config, tmp, **settings)
        self.host = host

    def url(self, path: str) -> str:
        return f"http://{self.host.address}{path}"

    def get(self, path: str) -> httpx.Response:
        return http_get(self.url(path), timeout=5)

    def serving(self) -> dict[str, Any]:
        response = self.get("/release")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def as_app(self, command: str) -> subprocess.CompletedProcess[str]:
        """`command` (bash) as the app user, in the environment the release tool gives PM2 calls."""
        env = ["env", "-i", f"HOME=/home/{self.APP_USER}", f"PATH={SYSTEM_PATH}", "LANG=C.UTF-8"]
        return self.host.run(["runuser", "-u", self.APP_USER, "--", *env, "bash", "-c", f"cd / && {command}"])

    def pm2_apps(self) -> dict[str, str]:
        """PM2 app name -> status, from the app user's own daemon (the one systemd runs)."""
        proc = self.as_app("pm2 jlist")
        assert proc.returncode == 0, proc.stderr
        return {p["name"]: p["pm2_env"]["status"] for p in json.loads(proc.stdout)}

    def current(self) -> str:
        return self.host.run(["readlink", f"{self.ROOT}/current"], check=True).stdout.strip().rsplit("/", 1)[-1]

    def releases(self) -> dict[str, str]:
        listing = json.loads(self.host.run(["cognivern-release", "--root", self.ROOT, "list", "--json"], check=True).stdout)
        return {r["id"]: r["state"] for r in listing["releases"]}

    def unit(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show -p ...` of a unit as a dict."""
        out = self.host.run(["systemctl", "show", unit, *(f"--property={p}" for p in properties)], check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.host.run(["journalctl", "--no-pager", "-o", "cat", *args], check=True).stdout

    def cursor(self) -> str:
        """Where the guest's journal ends now (`journal("--after-cursor", cursor)`: what came after)."""
        out = self.host.run(["journalctl", "--no-pager", "-n", "0", "--show-cursor"], check=True).stdout
        return out.strip().rsplit("-- cursor: ", 1)[1]
