"""Provisioning a pristine Debian server (tests/support/pristine_host.py): the program's own
provisioning command, shipped as the program ships it, on a fresh cloud image's disk booted with
systemd as PID 1, with Node from the distribution (NodeSource is not reachable from here).

What no other test host shows: apt installing from nothing, `pm2 startup` writing a real unit that
systemd runs, nginx under systemd, logrotate's systemd timer, and a second run that changes nothing.
One provisioned host for the module (provisioning from nothing takes 2-3 minutes, most of it
Debian's npm and its 335 node-* packages); the refusals run on a second, unprovisioned host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from components.host import pinned_versions
from tests.support.pristine_host import PristineHost, distribution_node_major

pytestmark = pytest.mark.needs_root("it boots a Debian root in namespaces and cgroups it creates")

APP_USER = "cognivern"  # the program's default: the pristine host runs with the program's defaults
PM2_UNIT = f"pm2-{APP_USER}.service"


@dataclass
class Provisioned:
    host: PristineHost
    before: dict[str, str]  # packages before provisioning: name -> version
    first: str  # provisioning's output


@pytest.fixture(scope="module")
def provisioned() -> Iterator[Provisioned]:
    with PristineHost("bookworm") as host:
        before = host.packages()
        result = host.provision()
        assert result.returncode == 0, result.stderr[-4000:]
        yield Provisioned(host, before, result.stdout)


def test_provisioning_installs_from_nothing(provisioned: Provisioned) -> None:
    host, out = provisioned.host, provisioned.first
    new = {name: version for name, version in host.packages().items() if name not in provisioned.before}
    assert {"nginx", "curl", "nodejs", "npm"} <= set(new), sorted(new)
    assert "gpg" not in new, "gpg is only for NodeSource's key"
    major = distribution_node_major(host.image)
    assert new["nodejs"].startswith(f"{major}."), new["nodejs"]
    assert "provision: packages: installed nginx curl" in out.splitlines()
    assert f"provision: node: installed v{major}." in out
    assert f"from the distribution (nodejs {new['nodejs']}) (was none)" in out
    pins = pinned_versions()
    assert f"provision: pnpm: installed {pins['PNPM_VERSION']} (was none)" in out
    assert f"provision: pm2: installed {pins['PM2_VERSION']} (was none)" in out
    assert host.ssh("node --version", check=True).stdout.startswith(f"v{major}.")
    # no NodeSource repository was configured
    assert host.run("ls /etc/apt/sources.list.d /etc/apt/preferences.d", check=True).stdout.split() == [
        "/etc/apt/preferences.d:",
        "/etc/apt/sources.list.d:",
        "debian.sources",
    ]


def test_nginx_and_the_pm2_unit_are_enabled_and_the_daemon_runs_under_systemd(provisioned: Provisioned) -> None:
    host = provisioned.host
    assert host.run(["systemctl", "is-enabled", "nginx", PM2_UNIT]).stdout.split() == ["enabled", "enabled"]
    assert host.run(["systemctl", "is-active", "nginx", PM2_UNIT]).stdout.split() == ["active", "active"]
    assert f"provision: pm2 daemon: started {PM2_UNIT}" in provisioned.first.splitlines()
    # The app's PM2 daemon is the unit's (restarted by systemd if it dies), with the cluster
    # scheduling run.sh requires of it.
    pid = host.run(["systemctl", "show", "--property=MainPID", "--value", PM2_UNIT], check=True).stdout.strip()
    assert f"0::/system.slice/{PM2_UNIT}" in host.read(f"/proc/{pid}/cgroup").splitlines()
    assert host.run(["ps", "-o", "user:32=,args=", "-p", pid], check=True).stdout.split()[:3] == [
        APP_USER,
        "PM2",
        "v" + pinned_versions()["PM2_VERSION"] + ":",
    ]
    assert "NODE_CLUSTER_SCHED_POLICY=none" in host.read(f"/proc/{pid}/environ").split("\0")
    assert host.run(["systemctl", "--failed", "--no-legend", "--plain"], check=True).stdout == ""


def test_logrotate_takes_the_apps_config_and_systemd_runs_it_daily(provisioned: Provisioned) -> None:
    host = provisioned.host
    debug = host.run(["logrotate", "-d", "/etc/logrotate.d/cognivern"])
    assert debug.returncode == 0, debug.stderr
    assert "rotating pattern: /opt/cognivern/shared/logs/*.log" in debug.stderr
    assert host.run(["systemctl", "is-enabled", "logrotate.timer"]).stdout.strip() == "enabled"
    assert host.run(["systemctl", "is-active", "logrotate.timer"]).stdout.strip() == "active"
    full = host.run(["logrotate", "-d", "/etc/logrotate.conf"])  # the whole configuration, ours included
    assert full.returncode == 0 and not [line for line in full.stderr.splitlines() if line.startswith("error:")], full.stderr[-2000:]


def test_a_second_run_changes_nothing(provisioned: Provisioned) -> None:
    host = provisioned.host
    before = host.checksums()
    again = host.provision()
    assert again.returncode == 0, again.stderr
    steps = [line for line in again.stdout.splitlines() if line not in ("provision: done", "provision: cloud-init: ok (finished)")]
    assert steps and all("ok (already" in line for line in steps), again.stdout
    assert host.checksums() == before


@pytest.fixture(scope="module")
def bare() -> Iterator[PristineHost]:
    """A pristine host nothing has provisioned: the refusals below leave it without Node."""
    with PristineHost("bookworm") as host:
        yield host


def test_a_node_major_the_distribution_cannot_give_is_refused_on_the_host(bare: PristineHost) -> None:
    # Preview cannot know an existing host's OS: provisioning asks the host's apt and names the key.
    result = bare.provision(nodeMajor=20)
    assert result.returncode == 1
    assert (
        "provision: error: cognivern:nodeMajor is 20, but Debian GNU/Linux 12 (bookworm) packages Node 18 (nodejs 18." in result.stderr
    ), result.stderr
    assert "set cognivern:nodeMajor to 18, or cognivern:nodeSource to nodesource" in result.stderr
    assert bare.run(["sh", "-c", "command -v node npm"]).stdout == "", "nothing installed"


def test_nodesource_out_of_reach_is_said_with_the_way_out(bare: PristineHost) -> None:
    result = bare.provision(nodeSource="nodesource", nodeMajor=22)
    assert result.returncode == 1
    assert (
        "provision: error: cannot fetch NodeSource's key from https://deb.nodesource.com (cognivern:nodeSource nodesource)" in result.stderr
    )
    assert "can use cognivern:nodeSource distribution" in result.stderr
    assert bare.run(["sh", "-c", "command -v node npm"]).stdout == ""
