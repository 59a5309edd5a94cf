"""The activation designs bench/release_bench.py compares, each on its own ROOT, app user, PM2 daemon and nginx.

today       cognivern-release and the files it works with (ecosystem, cognivern.conf, .env, run.sh,
            nginx site) as of commit BASELINE: the bash tool (1,436 lines) with its Node PM2 helper
            and run.sh, blue/green slots, the bake and the revert. Taken from git at bench time (`git
            archive` of that commit's components/ into a temp dir, rendered by that commit's own
            renderers); nothing is copied into the checkout.
checkout    this checkout's tool and renderers (issue 23: the same activation in stdlib Python,
            asking PM2 over its socket in-process), through tests/support's ReleaseHost like the
            tool's own tests.
Both use the same fixture app (tests/fixtures/app) and the same configuration keys.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.release_host import REPO, ReleaseHost, ensure_app_user, remove_app_user, unique_app_user

BASELINE = "eb6022a"  # today's tool: bash + cognivern-pm2.cjs + run.sh (main before issue 23)

# Run by the baseline tree's Python path: that commit's settings parser and renderers, config on stdin.
_RENDER = """
import json, sys
from components.render import NginxTarget, render_ecosystem, render_env, render_nginx_site, render_release_conf
from components.settings import parse_settings
given = json.load(sys.stdin)
s = parse_settings(given["config"].get)
nginx = NginxTarget(conf=given["nginx_conf"], prefix=given["nginx_prefix"])  # the host's private nginx, never the system's
json.dump({"ecosystem": render_ecosystem(s), "conf": render_release_conf(s, nginx),
           "env": render_env(s.stack_env, s.secret_env), "site": render_nginx_site(s)}, sys.stdout)
"""


class BaselineTree:
    """components/ of commit BASELINE unpacked into a temp dir (git archive); `cleanup()` removes it."""

    def __init__(self, commit: str = BASELINE) -> None:
        self.commit = commit
        self.path = Path(tempfile.mkdtemp(prefix="cgv-baseline-", dir="/tmp"))
        self.path.chmod(0o755)  # the app user runs run.sh and the tool reads from here
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, "components"], capture_output=True, check=False
        )
        if archive.returncode != 0:
            shutil.rmtree(self.path)
            raise RuntimeError(f"git archive {commit} failed (a shallow clone?): {archive.stderr.decode().strip()}")
        tar = self.path / "baseline.tar"
        tar.write_bytes(archive.stdout)
        with tarfile.open(tar) as t:
            t.extractall(self.path, filter="data")
        tar.unlink()
        self.tool = self.path / "components" / "release" / "cognivern-release.sh"
        self.run_sh = self.path / "components" / "host" / "run.sh"

    def render(self, config: dict[str, str], nginx_conf: str, nginx_prefix: str) -> dict[str, str]:
        """The commit's rendered ecosystem, cognivern.conf (for the nginx at `nginx_conf`, -p
        `nginx_prefix`), .env and nginx site for `config`."""
        proc = subprocess.run(
            [sys.executable, "-c", _RENDER],
            input=json.dumps({"config": config, "nginx_conf": nginx_conf, "nginx_prefix": nginx_prefix}),
            capture_output=True,
            text=True,
            cwd=self.path,
            env={**os.environ, "PYTHONPATH": str(self.path)},
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rendering with {self.commit}'s components failed: {proc.stderr.strip()}")
        rendered: dict[str, str] = json.loads(proc.stdout)
        return rendered

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class BaselineHost(ReleaseHost):
    """A ReleaseHost whose tool, run.sh and rendered files are the baseline commit's."""

    tree: BaselineTree | None = None
    rendered: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        assert self.tree is not None
        self.tool = self.tree.tool
        super().__post_init__()

    def layout(self) -> None:
        super().layout()
        assert self.tree is not None
        self.rendered = self.tree.render(self.config, str(self.nginx.conf_path), str(self.nginx.prefix))
        own = pwd.getpwnam(self.user)
        (self.root / "config" / "ecosystem.config.cjs").write_text(self.rendered["ecosystem"])
        (self.root / "config" / "cognivern.conf").write_text(self.rendered["conf"] + f"PM2_HOME={self.pm2_home}\n")
        env = self.root / "shared" / ".env"
        env.write_text(self.rendered["env"])
        os.chown(env, 0, own.pw_gid)  # root:APP 0640, as that commit's put-file wrote it
        env.chmod(0o640)
        shutil.copy(self.tree.run_sh, self.root / "shared" / "run.sh")
        (self.root / "shared" / "run.sh").chmod(0o755)
        for site in self.nginx.sites_enabled.glob("*.conf"):  # the site includes the upstream file the tool switches
            site.resolve().write_text(self.rendered["site"])


class Design:
    """One design under test: a ReleaseHost (ROOT, app user, PM2, its private nginx in front)."""

    key = "checkout"
    label = "this checkout"
    bake = 15  # bakeSeconds of the rows that bake (release_bench sets it)

    def __init__(self, config: dict[str, str]) -> None:
        self.user = unique_app_user()
        ensure_app_user(self.user)
        self.config = config
        self.host = self.make_host()
        self.nginx = self.host.nginx

    def make_host(self) -> ReleaseHost:
        return ReleaseHost(user=self.user, extra_config=self.config)

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    def start(self) -> None:
        self.host.start()

    def activate(self, release_id: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.host.run("activate", release_id, timeout=timeout)

    def keep_previous_warm(self, warm: bool) -> None:
        """Rollback rows: whether the slot of the release before stays running after the bake."""
        self.host.set_conf(KEEP_PREVIOUS_WARM="true" if warm else "false")

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "tool": str(self.host.tool), "user": self.user, "nginx_port": self.nginx.port}

    def stop(self) -> None:
        try:
            self.host.stop()  # PM2 and nginx
        finally:
            remove_app_user(self.user)


class Today(Design):
    """Commit BASELINE's tool and files."""

    key = "today"
    label = f"today ({BASELINE})"

    def __init__(self, config: dict[str, str], tree: BaselineTree) -> None:
        self.tree = tree
        super().__init__(config)

    def make_host(self) -> ReleaseHost:
        return BaselineHost(user=self.user, extra_config=self.config, tree=self.tree)
