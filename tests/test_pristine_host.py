"""The pristine host itself (tests/support/pristine_host.py): a fresh Debian cloud server's disk,
booted with systemd as PID 1, seeded through cloud-init's NoCloud datasource with the user data the
program renders for a created server, rebooted, and torn down without a trace.

One booted host per Debian release for the module (a boot takes a few seconds; the base root is
built once per recipe and cached); the teardown tests start hosts of their own.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from components.server.host_key import generate_ed25519
from tests.support.pristine_host import ID_SHIFT, RECIPES, PristineHost, base_root, cgroup2_mount, recipe_key

pytestmark = pytest.mark.needs_root("it boots a Debian root in namespaces and cgroups it creates")


@pytest.fixture(scope="module", params=sorted(RECIPES))
def host(request: pytest.FixtureRequest) -> Iterator[PristineHost]:
    """Each release booted once: Debian 12 (systemd 252, cloud-init 22.4) and 13 (systemd 257, cloud-init 25.1)."""
    with PristineHost(request.param) as h:
        yield h


def fingerprint(public_key_line: str) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", "-"], input=public_key_line, capture_output=True, text=True, check=True).stdout
    return out.split()[1]


@pytest.mark.parametrize("release", sorted(RECIPES))
def test_the_base_root_is_what_a_cloud_image_ships_before_its_first_boot(release: str) -> None:
    root = base_root(release)
    assert not list((root / "etc/ssh").glob("ssh_host_*")), "host keys come from cloud-init, not from the image"
    assert (root / "etc/machine-id").read_text() == "", "systemd makes the machine id at first boot"
    assert not [p for p in (root / "var/lib/apt/lists").iterdir() if p.name not in ("partial", "lock")]
    stanzas = (root / "var/lib/dpkg/status").read_text().split("\n\n")
    installed = {re.findall(r"^Package: (\S+)$", st, re.M)[0] for st in stanzas if "\nStatus: install ok installed" in st}
    assert set(RECIPES[release].packages) <= installed
    # what provisioning must install itself
    assert not {"nginx", "nodejs", "npm", "curl", "gpg"} & installed


def test_a_changed_recipe_is_a_new_cache_key() -> None:
    recipe = RECIPES["bookworm"]
    assert recipe_key(recipe) == recipe_key(dataclasses.replace(recipe))
    assert recipe_key(dataclasses.replace(recipe, packages=(*recipe.packages, "curl"))) != recipe_key(recipe)
    assert recipe_key(RECIPES["trixie"]) != recipe_key(recipe)


def test_systemd_is_pid_1_and_the_boot_finishes_running(host: PristineHost) -> None:
    assert host.boot_report is not None
    assert (host.boot_report.state, host.boot_report.failed) == ("running", {})
    assert host.run(["cat", "/proc/1/comm"], check=True).stdout.strip() == "systemd"
    assert host.ssh("systemctl is-system-running", check=True).stdout.strip() == "running"
    assert host.run(["systemd-detect-virt", "--container"]).stdout.strip() == "container-other"


def test_cloud_init_ran_from_the_nocloud_seed_with_the_programs_user_data(host: PristineHost) -> None:
    status = host.run(["cloud-init", "status", "--long"], check=True).stdout
    assert "status: done" in status
    # each of its four stages ran under the guest's systemd, without an error
    stages = json.loads(host.read("/run/cloud-init/status.json"))["v1"]
    ran = {
        name: (stage["finished"] is not None, stage["errors"])
        for name, stage in stages.items()
        if isinstance(stage, dict) and stage.get("start")
    }
    assert ran == {stage: (True, []) for stage in ("init-local", "init", "modules-config", "modules-final")}
    assert "DataSourceNoCloud [seed=/var/lib/cloud/seed/nocloud]" in status
    user_data = host.read("/var/lib/cloud/instance/user-data.txt")
    assert user_data == host.user_data
    assert yaml.safe_load(user_data)["ssh_keys"]["ed25519_public"] == host.host_key
    assert host.run(["hostname"], check=True).stdout.strip() == f"pristine-{host.tag}"  # meta-data's local-hostname


def test_sshd_presents_the_generated_host_key_and_no_other(host: PristineHost) -> None:
    assert host.host_key is not None
    keys = host.run("ls /etc/ssh/ssh_host_*", check=True).stdout.split()
    assert keys == ["/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub"]
    presented = subprocess.run(["ssh-keyscan", "-t", "ed25519", host.address], capture_output=True, text=True, timeout=30).stdout
    assert fingerprint(presented.split(None, 1)[1]) == fingerprint(host.host_key)
    # The pinned connection works; pinned to any other key, the same connection is refused.
    assert host.ssh("true").returncode == 0
    known = host.base / "known_hosts"
    pinned = known.read_text()
    try:
        known.write_text(f"{host.address} {generate_ed25519()[1]}\n")
        refused = host.ssh("true")
        assert refused.returncode == 255 and "Host key verification failed" in refused.stderr
    finally:
        known.write_text(pinned)


def test_the_guests_users_are_not_this_machines(host: PristineHost) -> None:
    """Every process of the guest runs as a uid of its own user namespace, shifted out of this
    machine's range: test users here are created and their processes killed by uid while it runs."""
    cgroup = cgroup2_mount() / f"cognivern-pristine-{host.tag}"
    pids = [int(pid) for procs in cgroup.rglob("cgroup.procs") for pid in procs.read_text().split()]
    uids = {}
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        if status.exists():
            uids[pid] = int(next(line for line in status.read_text().splitlines() if line.startswith("Uid:")).split()[1])
    assert len(uids) > 5  # systemd, journald, dbus, logind, sshd, ...
    guest = {pid: uid for pid, uid in uids.items() if pid != host.boot_proc.pid} if host.boot_proc else uids
    assert all(ID_SHIFT <= uid < ID_SHIFT + 65536 for uid in guest.values()), guest
    assert host.run(["id", "-u"], check=True).stdout.strip() == "0"  # root in there


def test_the_user_datas_metadata_filter_is_in_place(host: PristineHost) -> None:
    ruleset = host.run(["nft", "list", "table", "inet", "cognivern_metadata"], check=True).stdout
    assert "ip daddr 169.254.169.254 meta skuid != 0 reject" in ruleset


def test_reboot_stops_the_system_and_boots_the_same_disk(host: PristineHost) -> None:
    host.run("echo before > /root/marker", check=True)
    boot_id = host.read("/proc/sys/kernel/random/boot_id")
    machine_id = host.read("/etc/machine-id")
    report = host.reboot()
    assert report.how == "reboot"
    assert (report.boot.state, report.boot.failed) == ("running", {})
    assert host.read("/root/marker") == "before\n"
    assert host.read("/etc/machine-id") == machine_id
    # The (persistent) journal shows the shutdown the reboot went through. The kernel is this
    # machine's, so its boot id does not change and journalctl sees one boot (`-b -1` finds nothing).
    journal = host.run(["journalctl", "--no-pager", "-o", "cat"], check=True).stdout
    assert "Reached target reboot.target" in journal and journal.count("Reached target multi-user.target") >= 2
    assert host.read("/proc/sys/kernel/random/boot_id") == boot_id
    # cloud-init's per-instance modules do not run again: the host key is still the generated one
    assert host.ssh("true").returncode == 0


def _traces(h: PristineHost) -> dict[str, object]:
    """What a host leaves on this machine while it exists."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return {
        "holder": h.holder is not None and h.holder.poll() is None,
        "netns": h.netns in netns,
        "veth": f"{h.veth}@" in links,
        "cgroup": (cgroup2_mount() / f"cognivern-pristine-{h.tag}").exists(),
        "processes": [line for line in procs.splitlines() if str(h.base) in line],
        "dir": h.base.exists(),
    }


def test_teardown_leaves_nothing_behind() -> None:
    h = PristineHost("bookworm")
    with h:
        assert h.pid1 is not None
        during = _traces(h)
        pid1 = h.pid1
    assert during["holder"] and during["netns"] and during["veth"] and during["cgroup"] and during["processes"] and during["dir"]
    assert _traces(h) == {"holder": False, "netns": False, "veth": False, "cgroup": False, "processes": [], "dir": False}
    assert not Path(f"/proc/{pid1}").exists()


def test_a_failed_start_leaves_nothing_behind() -> None:
    h = PristineHost("bookworm", boot_timeout=0.5)  # systemd cannot finish booting in half a second
    with pytest.raises(TimeoutError, match="boot not finished"):
        h.start()
    assert _traces(h) == {"holder": False, "netns": False, "veth": False, "cgroup": False, "processes": [], "dir": False}
