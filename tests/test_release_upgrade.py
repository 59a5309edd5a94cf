"""A host the bash tool ran is taken over in place by the Python tool (issue 23: existing hosts upgrade).

The host is first prepared by the program as of BASELINE (its provision.sh with its bash tool, Node
helper and run.sh; its conf, ecosystem and .env; its nginx site: the commands its Host component
runs, rendered by that commit's own code, from git), and its bash tool installs and activates r1:
the state is text (config/slots, .deploy/previous, .deploy/meta/, ...). Then this checkout's steps
run on the same host, as the next `pulumi up` would: provisioning installs the Python tool and the
build account and removes run.sh, and the ecosystem's reload is the new tool's first run (it takes
the text state in and writes the JSON). The new tool then installs and activates r2 and rolls back
to r1 (installed by the bash tool), with the app serving throughout.
Run as root: venv/bin/pytest tests/test_release_upgrade.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hardened_host import HardenedHost
from tests.support.helpers import http_get
from tests.support.load import Load
from tests.support.release_host import REPO
from tests.support.target_host import TargetHost

BASELINE = "eb6022a"  # main with the bash tool, before issue 23

pytestmark = pytest.mark.needs_root("it provisions a host and runs the tools as root")

# The Host component's commands at BASELINE, in its order, rendered by that commit's code.
_STEPS = """
import json, sys
from components.host import NGINX_SITE, PROVISION, PUT_FILE, RUN_SH, env_file, provision_args, release_tool_bundle
from components.remote import script_command
from components.render import NginxTarget, render_ecosystem, render_env, render_nginx_site, render_release_conf, site_name
from components.settings import parse_settings
given = json.load(sys.stdin)
s = parse_settings(given["config"].get)
nginx = NginxTarget(conf=given["nginx_conf"], prefix=given["nginx_prefix"])
def put(dest, mode, owner, reload):
    return script_command(PUT_FILE, ["--dest", dest, "--mode", mode, "--owner", owner] + (["--reload-root", s.root] if reload else []))
steps = [
    (script_command(PROVISION, provision_args(s)), release_tool_bundle()),
    (put(f"{s.root}/shared/run.sh", "0755", "root:root", True), RUN_SH.read_text()),
    (put(f"{s.root}/config/cognivern.conf", "0644", "root:root", False), render_release_conf(s, nginx)),
    (put(f"{s.root}/config/ecosystem.config.cjs", "0644", "root:root", True), render_ecosystem(s)),
    (put(*env_file(s), True), render_env(s.stack_env, s.secret_env)),
    (script_command(NGINX_SITE, ["--name", site_name(s.app_name), "--upstream-port", str(s.port)]), render_nginx_site(s)),
]
json.dump(steps, sys.stdout)
"""


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    """components/ of BASELINE from git, in a directory the app user can read."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", BASELINE, "components"], capture_output=True, check=True)
    tree = tmp_path / "baseline"
    tree.mkdir()
    (tree / "b.tar").write_bytes(archive.stdout)
    with tarfile.open(tree / "b.tar") as t:
        t.extractall(tree, filter="data")
    return tree


@pytest.fixture
def old_host(tmp_path: Path, baseline: Path) -> Iterator[HardenedHost]:
    with TargetHost() as target:
        host = HardenedHost(target, tmp_path)
        given = {"config": target.config(**host.config), "nginx_conf": str(target.nginx.conf_path)}
        given["nginx_prefix"] = str(target.nginx.prefix)
        steps = subprocess.run(
            [sys.executable, "-c", _STEPS],
            input=json.dumps(given),
            capture_output=True,
            text=True,
            cwd=baseline,
            env={**os.environ, "PYTHONPATH": str(baseline)},
            check=True,
        )
        for command, stdin in json.loads(steps.stdout):
            result = target.run(command, stdin=stdin)
            assert result.returncode == 0, result.stdout + result.stderr
        yield host


def test_a_host_the_bash_tool_ran_is_taken_over_in_place(old_host: HardenedHost, tmp_path: Path) -> None:
    h, root = old_host, old_host.root
    tool = h.target.bin_dir / "cognivern-release"
    assert tool.read_text().startswith("#!/usr/bin/env bash"), "the bash tool of BASELINE"
    for rid in ("r0", "r1"):
        assert h.install(rid).returncode == 0
        h.ok("activate", rid)  # r1 live in green: the ecosystem must not fall back to blue on `current`
    assert (root / "config" / "slots").read_text().startswith("live=green\nblue=\ngreen=r1\n") and (
        root / ".deploy" / "meta" / "r1"
    ).exists()
    assert (root / "shared" / "run.sh").exists() and not (root / "config" / "state.json").exists()

    with Load([h.url("/release")], clients=2) as load:
        h.prepare()  # this checkout's Host steps: provision (the new tool), conf, ecosystem (reload: the new tool's first run), .env, site
        assert os.readlink(tool) == "../lib/cognivern-release/current/cognivern-release", "the Python tool"
        assert not (root / "shared" / "run.sh").exists(), "provisioning removed the old run.sh"
        state = json.loads((root / "config" / "state.json").read_text())
        assert state["slots"] == {"live": "green", "blue": None, "green": "r1", "agent": "r1"} and state["previous"] == "r0"
        assert state["releases"]["r1"]["sha256"] and state["releases"]["r1"]["installed_epoch"] > 0
        for gone in ("config/slots", ".deploy/previous", ".deploy/meta"):
            assert not (root / gone).exists(), f"{gone}: the text state was taken into state.json"
        assert http_get(h.url("/release"), timeout=5).json()["release"] == "r1"

        assert h.install("r2").returncode == 0
        second = h.ok("activate", "r2")
        assert "release r2 is live and healthy" in second.stderr
        assert http_get(h.url("/release"), timeout=5).json()["release"] == "r2"
        back = h.ok("activate", "r1")  # r1: installed and sealed by the bash tool
        assert "release r1 is live and healthy" in back.stderr and "making it root's" not in back.stderr
    assert load.failures == [], load.failures[:5]
    listing = json.loads(h.ok("list", "--json").stdout)
    assert (listing["current"], listing["previous"]) == ("r1", "r2")
    assert {r["id"]: r["state"] for r in listing["releases"]} == {"r0": "installed", "r1": "current", "r2": "previous"}
    assert http_get(h.url("/release"), timeout=5).json()["release"] == "r1"
    log = (root / ".deploy" / "releases.log").read_text().splitlines()
    assert [line.split()[1:3] for line in log] == [
        ["install", "r0"],
        ["activate", "r0"],
        ["install", "r1"],
        ["activate", "r1"],
        ["reload", "r1"],
        ["install", "r2"],
        ["activate", "r2"],
        ["activate", "r1"],
    ]
