"""A pristine Debian server on this machine: a fresh cloud image's disk, booted with systemd as PID 1.

    with PristineHost("bookworm") as host:           # boots; cloud-init applies the program's user data
        host.boot_report                             # BootReport(state='running', seconds=..., failed={})
        host.ssh("systemctl is-enabled nginx")       # over SSH, pinned to the generated host key
        host.run(["nft", "list", "ruleset"])         # inside, as root (nsenter), no SSH
        host.reboot()                                # `systemctl reboot` inside, then boots the same disk
        host.config(release="v1")                    # raw stack config: existing-host mode, this host

Every other test host is this machine's own Debian with nginx, Node, PM2 and pnpm already there, and
no systemd as PID 1. This one starts from what a new server has, so provisioning installs from
nothing, `pm2 startup` writes a real unit, nginx runs under systemd and a reboot is a reboot.

**The disk.** `base_root(release)` builds a root per Debian release once (`pristine_root.sh`:
debootstrap's minimal variant plus `RECIPES[release].packages`) and caches it under
`$COGNIVERN_TOOLS_CACHE` (default ~/.cache/cognivern-tools)/pristine-root/RELEASE/KEY/root, KEY a
hash of the recipe (the package list, pristine_root.sh and ID_SHIFT), so a changed recipe builds a
new root. Its files are owned by the guest's ids shifted by ID_SHIFT (below). Each host gets an
overlay of that root with a disk of its own (`upper`, in a temp dir; `write()` puts a file there
while the host is stopped): nothing is copied, and a reboot mounts the same disk again. Packages
apt downloads are kept per release in ~/.cache/cognivern-tools/pristine-apt-archives, linked into
each host's own archive directory (apt checks each against the package lists; `apt_cache=False`
downloads as a new server does).

**The seed.** cloud-init finds its NoCloud datasource in /var/lib/cloud/seed/nocloud/ (checked:
ds-identify looks there with no kernel command line or DMI data): `user-data` is, unless the test
passes its own, the program's rendering for a created server (`components.server.render_user_data`)
with a host key generated here, and `meta-data` carries an instance id, a host name and the client
key in `public-keys`, as Hetzner's metadata service carries the project's SSH keys.

**The boot** (`pristine_boot.sh`): its own user namespace (the guest's 0-65535 are this machine's
ID_SHIFT + 0-65535, so its root is not this machine's root and its users never share a uid with
the test users other modules create and kill by uid) and network namespace (a veth pair with a /30
from the multi-server hosts' pool, tests/support/netns_host.py), both held by a `sleep` across
reboots; PID, mount, UTS, IPC and cgroup namespaces per boot, a delegated cgroup of its own
(cgroup.kill ends everything in it), /sys and /proc/sys read-only, a private /dev, a pty as
/dev/console (logged to `console.log`), then `chroot DIR /lib/systemd/systemd --system`.

**Where this differs from a Hetzner server** (each a property of the test bed, not of a server):
- the address is set from outside on the veth before boot; cloud-init's fallback network config
  (DHCP on eth0, written for systemd-networkd) is written but nothing applies it;
- no route off the machine: a tinyproxy (per host, on the root side of the veth) lets apt and npm
  reach Debian's mirror and the npm registry only. apt reads it from
  /etc/apt/apt.conf.d/00cognivern-test-proxy, SSH sessions (curl, npm) from /etc/environment
  (with no_proxy for loopback). NodeSource is not reachable here, so Node comes from the
  distribution (cognivern:nodeSource);
- no kernel, bootloader or udev: the kernel is this machine's, systemd runs as in a container
  (`systemd-detect-virt` says container-other);
- no metadata service at 169.254.169.254 (the user data's filter rule is there all the same);
- the kernel's boot id does not change on a reboot (journalctl sees one boot);
- this machine's local CAs (its egress re-signs TLS) are trusted inside, for npm.

Requires root, debootstrap, tinyproxy, iproute2, util-linux (unshare, nsenter) and a cgroup2
hierarchy. The first build of a release takes about 1.5 minutes (Debian's mirror), a boot a few
seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from components.host import PROVISION, provision_args, release_tool_bundle
from components.remote import script_command
from components.server import render_user_data
from components.server.host_key import generate_ed25519
from components.settings import DISTRIBUTION_NODE_MAJORS, Settings, parse_settings
from tests.support.helpers import SYSTEM_PATH, DisposableHost, wait_for_port
from tests.support.netns_host import add_veth_namespace, claimed_slots, remove_veth_namespace, slot_addresses
from tests.support.target_host import _config_string

HERE = Path(__file__).resolve().parent
ROOT_SCRIPT = HERE / "pristine_root.sh"
BOOT_SCRIPT = HERE / "pristine_boot.sh"
MIRROR = os.environ.get("COGNIVERN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The guest's uids and gids 0-65535 are this machine's ID_SHIFT + 0-65535 (its own user namespace):
# its root is not this machine's root, and its users (cognivern, sshd, messagebus) never share a uid
# with this machine's, whose test users are created and cleaned up (their processes killed) by uid
# while the guest runs. The base root's files are owned by the shifted ids on disk.
ID_SHIFT = 1 << 20
ID_COUNT = 1 << 16
PROXY_PORT = 3128  # tinyproxy on the root side of this host's veth (the address is ours alone)
# What the proxy lets through: Debian's mirror (apt) and npm's registry (pnpm, PM2); NodeSource too,
# so a test can show it is unreachable from here rather than refused by us.
PROXY_ALLOW = (r"^deb\.debian\.org$", r"^security\.debian\.org$", r"^registry\.npmjs\.org$", r"^deb\.nodesource\.com$")
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
PID1_SIGNALS = {signal.SIGHUP: "reboot", signal.SIGINT: "poweroff"}
# What provisioning manages on a host with the program's defaults (appUser cognivern, root
# /opt/cognivern), for "a second run changes nothing" (PristineHost.checksums), less UNMANAGED:
# what the daemons write while they run.
MANAGED = (
    "/etc/systemd/system",
    "/etc/nginx",
    "/etc/ssh/sshd_config.d",
    "/etc/logrotate.d",
    "/etc/apt",
    "/usr/local/bin",
    "/usr/local/lib/node_modules/pm2/package.json",
    "/usr/local/lib/node_modules/pnpm/package.json",
    "/opt/cognivern",
    "/home/cognivern",
)
UNMANAGED = ("/home/cognivern/.pm2", "/opt/cognivern/shared/logs", "/opt/cognivern/shared/data")


@dataclass(frozen=True)
class Recipe:
    """A Debian release's base root: `packages` go on top of debootstrap's minimal variant.

    `image` is the Hetzner image name of the same OS (settings' DISTRIBUTION_NODE table is keyed by it).
    """

    release: str
    image: str
    packages: tuple[str, ...]


# What a fresh cloud server has that provisioning relies on, and nothing it installs itself:
# - systemd, systemd-sysv, dbus: PID 1, `systemctl`, logind (dbus is in Debian's cloud images
#   explicitly: "needed for acpi shutdown to work");
# - openssh-server (its unit enabled), cloud-init (Debian's NoCloud-capable 22.4 / 25.1), and
#   python3-cffi-backend, which cloud-init needs through python3-cryptography: debootstrap does not
#   resolve the virtual package (python3-cffi-backend-api-min) that apt would;
# - sudo: Debian's cloud images and Ubuntu's have it (a non-root sshUser runs through sudo -n);
# - iproute2, procps, nftables, logrotate: Debian priority "important", so in every Debian image
#   (debootstrap's default variant; Ubuntu's images have them too). nftables is what the user
#   data's metadata filter uses;
# - locales: cloud-init's locale module sets en_US.UTF-8 at first boot and fails without it
#   (cloud-init then reports an error, which provisioning treats as fatal); cloud images have it.
# Left out on purpose, though Debian's and Ubuntu's cloud images carry them (Debian's through its
# EXTRAS class): curl, ca-certificates, gpg. They are priority optional/standard, and provisioning
# installs them when missing; without them here, that path runs.
_CLOUD_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "cloud-init",
    "python3-cffi-backend",
    "sudo",
    "iproute2",
    "procps",
    "nftables",
    "logrotate",
    "locales",
)
RECIPES = {
    "bookworm": Recipe("bookworm", "debian-12", _CLOUD_PACKAGES),
    "trixie": Recipe("trixie", "debian-13", _CLOUD_PACKAGES),
}


def cache_root() -> Path:
    return Path(os.environ.get("COGNIVERN_TOOLS_CACHE") or Path.home() / ".cache" / "cognivern-tools") / "pristine-root"


def recipe_key(recipe: Recipe) -> str:
    """The cache key: a changed package list, build script or id shift builds a new root."""
    digest = hashlib.sha256()
    digest.update(json.dumps([recipe.release, list(recipe.packages), ID_SHIFT]).encode())
    digest.update(ROOT_SCRIPT.read_bytes())
    return digest.hexdigest()[:16]


def base_root(release: str) -> Path:
    """The cached base root for `release`, built first when missing (one builder at a time)."""
    recipe = RECIPES[release]
    home = cache_root() / release / recipe_key(recipe)
    root = home / "root"
    if (home / "complete").exists():
        return root
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / "complete").exists():
            return root
        shutil.rmtree(root, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="build.", dir=home))
        try:
            started = time.monotonic()
            subprocess.run(
                ["bash", str(ROOT_SCRIPT), release, str(work / "root"), MIRROR, ",".join(recipe.packages)],
                check=True,
                stdin=subprocess.DEVNULL,
                timeout=1200,
            )
            shift_ids(work / "root")
            (work / "root").rename(root)
            (home / "complete").write_text(json.dumps({"release": release, "seconds": round(time.monotonic() - started, 1)}) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


def shift_ids(root: Path) -> None:
    """Every file's owner and group + ID_SHIFT (the guest's user namespace maps them back to 0-65535).

    chown clears set-user/group-ID bits, so they are set again; POSIX ACLs name unshifted ids and
    are dropped (the only one, on /var/log/journal, is set again by systemd-tmpfiles at boot)."""
    done: set[int] = set()  # hard-linked files (gzip's gunzip, ...) once
    _shift(str(root), done)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            _shift(os.path.join(dirpath, name), done)


def _shift(path: str, done: set[int]) -> None:
    st = os.lstat(path)
    if st.st_ino in done:
        return
    done.add(st.st_ino)
    if st.st_uid >= ID_COUNT or st.st_gid >= ID_COUNT:
        raise RuntimeError(f"{path} is owned by {st.st_uid}:{st.st_gid}, outside the guest's 0-{ID_COUNT - 1}")
    os.lchown(path, st.st_uid + ID_SHIFT, st.st_gid + ID_SHIFT)
    if stat.S_ISLNK(st.st_mode):
        return
    if st.st_mode & 0o6000:
        os.chmod(path, stat.S_IMODE(st.st_mode))
    for attr in os.listxattr(path):
        if attr.startswith("system.posix_acl_"):
            os.removexattr(path, attr)


def cgroup2_mount() -> Path:
    """Where this machine mounts its cgroup2 hierarchy (/sys/fs/cgroup on a unified host,
    /sys/fs/cgroup/unified on a hybrid one like this machine kind)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split()[0] == "cgroup2":
            return Path(before.split()[4])
    raise RuntimeError("no cgroup2 hierarchy is mounted: the pristine host needs one")


@dataclass(frozen=True)
class BootReport:
    """One boot: `state` is what `systemctl is-system-running --wait` said (running or degraded),
    `seconds` from starting the boot to that answer, `failed` each failed unit and why."""

    state: str
    seconds: float
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RebootReport:
    """`shutdown_seconds` from `systemctl reboot` to the end of PID 1 (`how` the kernel reported:
    reboot or poweroff), then the next boot."""

    shutdown_seconds: float
    how: str
    boot: BootReport


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where both are on one filesystem (instant, no space), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class PristineHost(DisposableHost):
    """One pristine server (see the module docstring). Attributes:
    release, image     Debian release and the Hetzner image name of the same OS
    address, peer      its IP on eth0; the root side of its veth (tinyproxy listens there)
    host_key           public half of the host key in its user data (None with custom user_data)
    private_key_path   the client key (its public half is in meta-data's public-keys); `private_key` its text
    base               temp dir: upper/ (the disk), work/, merged/ (mount point), console.log, ...
    disk               `base/upper`: the files this host changed or added (readable while it is stopped)
    pid1               the guest's systemd, as this machine's pid (None while stopped)
    boot_report        the last boot's BootReport
    boot_started       time.monotonic() when the last boot began
    """

    def __init__(
        self,
        release: str = "bookworm",
        *,
        user_data: str | None = None,
        boot_timeout: float = 180,
        proxy: bool = True,
        apt_cache: bool = True,
    ) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("PristineHost needs root (namespaces, mounts, cgroups)")
        self.recipe = RECIPES[release]
        self.release, self.image = release, self.recipe.image
        self.boot_timeout = boot_timeout
        self.use_proxy = proxy
        self.apt_cache = apt_cache
        self.tag = uuid.uuid4().hex[:6]
        self.netns = f"cgvp{self.tag}"
        self.veth = f"cgvp{self.tag}r"
        self.base = Path(tempfile.mkdtemp(prefix="cognivern-pristine-"))
        self.base.chmod(0o711)  # the guest's root (an unprivileged uid here) passes through to merged/
        self.disk = self.base / "upper"
        for sub in ("upper", "work", "merged"):
            (self.base / sub).mkdir(mode=0o755)
        self.private_key_path = self.base / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cognivern-pristine", "-f", str(self.private_key_path)], check=True
        )
        self.private_key = self.private_key_path.read_text()
        self.public_key = self.private_key_path.with_suffix(".pub").read_text().strip()
        self.host_key: str | None = None
        if user_data is None:
            host_private, self.host_key = generate_ed25519()
            user_data = render_user_data(host_private, self.host_key)
        self.user_data = user_data
        self.address = ""
        self.peer = ""
        self.netns_created = False
        self.proxy: subprocess.Popen[bytes] | None = None
        self.holder: subprocess.Popen[bytes] | None = None
        self.boot_proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.cgroup: Path | None = None
        self.boot_report: BootReport | None = None
        self.boot_started = 0.0  # time.monotonic() when the last boot began (boot-to-answer figures start here)
        self.boots = 0
        self._console_master: int | None = None
        self._console_slave: int | None = None
        self._console_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        self.lower = base_root(self.release)
        os.chown(self.disk, ID_SHIFT, ID_SHIFT)  # the guest's / (the overlay takes the upper root's owner)
        self._seed()
        self._start_holder()
        with claimed_slots(1) as (slot,):
            self.peer, self.address = slot_addresses(slot)
            add_veth_namespace(self.netns, self.veth, self.peer, self.address)
        if self.use_proxy:
            self._start_proxy()
        (self.base / "known_hosts").write_text(f"{self.address} {self.host_key}\n" if self.host_key else "")
        self.boot()
        if self.use_proxy:
            self.run("! command -v update-ca-certificates >/dev/null || update-ca-certificates >/dev/null", check=True)

    def _seed(self) -> None:
        """The NoCloud seed, written into the disk before its first boot (offline changes to an
        overlay's upper layer are allowed)."""
        self.write("/var/lib/cloud/seed/nocloud/user-data", self.user_data, 0o600)
        meta = {"instance-id": f"i-{self.tag}", "local-hostname": f"pristine-{self.tag}", "public-keys": [self.public_key]}
        self.write("/var/lib/cloud/seed/nocloud/meta-data", json.dumps(meta, indent=1) + "\n")  # JSON is YAML

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """A file of the guest's root (0644 unless `mode`), written into its disk while it is stopped;
        directories it needs are made (0755, root's)."""
        target = self.disk / path.lstrip("/")
        missing = [d for d in reversed(target.parents) if d.is_relative_to(self.disk) and not d.exists()]
        for d in missing:
            d.mkdir(mode=0o755)
            d.chmod(0o755)
            os.chown(d, ID_SHIFT, ID_SHIFT)
        target.write_text(text)
        target.chmod(mode)
        os.chown(target, ID_SHIFT, ID_SHIFT)

    def _start_holder(self) -> None:
        """The guest's user namespace (0-65535 -> ID_SHIFT + 0-65535) and network namespace, held by
        a process of their own so they outlive reboots; the network namespace is named (ip netns)."""
        self.holder = subprocess.Popen(
            ["unshare", "--user", "--net", "--", "sleep", "infinity"], stdin=subprocess.DEVNULL, start_new_session=True
        )
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/user") == own:
            if time.monotonic() > deadline or self.holder.poll() is not None:
                raise RuntimeError("the namespace holder did not start")
            time.sleep(0.01)
        for kind in ("uid_map", "gid_map"):
            Path(f"/proc/{self.holder.pid}/{kind}").write_text(f"0 {ID_SHIFT} {ID_COUNT}\n")
        self.netns_created = True  # from here on, cleanup removes the name (ip netns del of a missing one is harmless)
        subprocess.run(["ip", "netns", "attach", self.netns, str(self.holder.pid)], check=True, capture_output=True)

    def _start_proxy(self) -> None:
        url = f"http://{self.peer}:{PROXY_PORT}/"
        self.write("/etc/apt/apt.conf.d/00cognivern-test-proxy", f'Acquire::http::Proxy "{url}";\nAcquire::https::Proxy "{url}";\n')
        environment = (self.lower / "etc/environment").read_text() if (self.lower / "etc/environment").exists() else ""
        lines = [f"http_proxy={url}", f"https_proxy={url}", "no_proxy=localhost,127.0.0.1,::1"]
        # This machine's egress re-signs TLS with local CAs (its own /usr/local/share/ca-certificates):
        # the guest trusts them too, through the system bundle (update-ca-certificates, after boot) and,
        # for Node's own CA list, NODE_EXTRA_CA_CERTS.
        local_cas = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
        for ca in local_cas:
            self.write(f"/usr/local/share/ca-certificates/cognivern-test-bed-{ca.name}", ca.read_text())
        if local_cas:
            lines.append("NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt")
        self.write("/etc/environment", environment + "".join(f"{line}\n" for line in lines))
        conf = self.base / "tinyproxy.conf"
        (self.base / "tinyproxy.allow").write_text("".join(f"{pattern}\n" for pattern in PROXY_ALLOW))
        conf.write_text(
            "\n".join(
                [
                    f"Port {PROXY_PORT}",
                    f"Listen {self.peer}",
                    f"Allow {self.address}",
                    "Timeout 300",
                    "MaxClients 64",
                    f'LogFile "{self.base / "tinyproxy.log"}"',
                    "LogLevel Connect",
                    f'Filter "{self.base / "tinyproxy.allow"}"',
                    "FilterType ere",
                    "FilterDefaultDeny Yes",
                    "ConnectPort 443",
                ]
            )
            + "\n"
        )
        self.proxy = subprocess.Popen(
            ["tinyproxy", "-d", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(PROXY_PORT, host=self.peer, alive=self.proxy)

    def boot(self) -> BootReport:
        """Boot the disk (systemd as PID 1) and wait until the boot is over (`wait_running`)."""
        if self.boot_proc is not None:
            raise RuntimeError("already booted")
        assert self.holder is not None, "boot() after start()"
        started = self.boot_started = time.monotonic()
        self.cgroup = cgroup2_mount() / f"cognivern-pristine-{self.tag}"
        self._remove_cgroup()
        self.cgroup.mkdir()
        # delegated to the guest's root (systemd's own rule for a delegated subtree)
        for entry in (self.cgroup, *(self.cgroup / f for f in ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control"))):
            os.chown(entry, ID_SHIFT, ID_SHIFT)
        self._open_console()
        assert self._console_slave is not None
        log = open(self.base / "boot.log", "ab")  # noqa: SIM115 - the Popen owns it
        self.boots += 1
        with log:
            self.boot_proc = subprocess.Popen(
                [
                    "bash",
                    str(BOOT_SCRIPT),
                    str(self.cgroup),
                    str(self.holder.pid),
                    str(self.lower),
                    str(self.disk),
                    str(self.base / "work"),
                    str(self.base / "merged"),
                    os.ttyname(self._console_slave),
                    str(self._apt_archives()) if self.apt_cache else "",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid1 = self._find_pid1()
        self.boot_report = self.wait_running(started)
        return self.boot_report

    def _shared_archives(self) -> Path:
        """Downloaded packages, kept between hosts of a release (pristine-apt-archives/RELEASE)."""
        archives = cache_root().parent / "pristine-apt-archives" / self.release
        archives.mkdir(parents=True, exist_ok=True)
        return archives

    def _apt_archives(self) -> Path:
        """This host's /var/cache/apt/archives: the release's kept packages linked in, its own lock and
        downloads. One directory bound into two guests made the second apt fail at once on
        `archives/lock` ("held by process 0": a holder in another PID namespace; DPkg::Lock::Timeout
        does not cover that lock), which a real server never meets. `_keep_downloads` links what the
        host fetched back into the shared cache at cleanup."""
        mine = self.base / "apt-archives"
        if not mine.exists():
            (mine / "partial").mkdir(parents=True)
            for deb in self._shared_archives().glob("*.deb"):
                link_or_copy(deb, mine / deb.name)
            for path in (mine, *mine.iterdir()):  # the guest's root's
                if path.lstat().st_uid != ID_SHIFT:
                    os.lchown(path, ID_SHIFT, ID_SHIFT)
        return mine

    def _keep_downloads(self) -> None:
        mine, shared = self.base / "apt-archives", self._shared_archives()
        for deb in mine.glob("*.deb") if mine.is_dir() else ():
            if not (shared / deb.name).exists():
                temp = shared / f".{deb.name}.{os.getpid()}"
                link_or_copy(deb, temp)
                temp.replace(shared / deb.name)  # whole files only: another host may read the cache now

    def _find_pid1(self) -> int:
        """The guest's systemd: the child of `unshare --fork` (the boot process once it has exec'd)."""
        assert self.boot_proc is not None
        proc = self.boot_proc
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the boot ended with {proc.returncode} before systemd started: {self._log_tail('boot.log')}")
            with contextlib.suppress(OSError, ValueError):
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "systemd":
                    return int(children[0])
            time.sleep(0.02)
        raise TimeoutError(f"systemd did not start within 30 s: {self._log_tail('boot.log')}")

    def wait_running(self, started: float | None = None) -> BootReport:
        """Until `systemctl is-system-running --wait` says running or degraded (then: which units
        failed, and the last lines of their logs); fails after `boot_timeout` with the state."""
        started = time.monotonic() if started is None else started
        deadline = started + self.boot_timeout
        state = "(no answer)"
        while time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            try:
                state = self.run(["systemctl", "is-system-running", "--wait"], timeout=left).stdout.strip() or state
            except subprocess.TimeoutExpired:
                break
            if state in ("running", "degraded"):
                return BootReport(state, round(time.monotonic() - started, 2), self.failed_units())
            if self.boot_proc is None or self.boot_proc.poll() is not None:
                raise RuntimeError(f"the guest's systemd ended while booting: {self._log_tail('console.log')}")
            time.sleep(0.2)
        raise TimeoutError(
            f"boot not finished after {self.boot_timeout} s (state {state}); jobs: {self.run(['systemctl', 'list-jobs']).stdout}"
        )

    def failed_units(self) -> dict[str, str]:
        """Failed unit -> its result and the last lines of its journal."""
        out = self.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager"]).stdout
        failed = {}
        for line in out.splitlines():
            unit = line.split()[0]
            result = self.run(["systemctl", "show", "--property=Result", "--value", unit]).stdout.strip()
            journal = self.run(["journalctl", "--no-pager", "-o", "cat", "-n", "8", "-u", unit]).stdout.strip()
            failed[unit] = f"result {result}: {journal}"
        return failed

    def reboot(self, timeout: float = 90) -> RebootReport:
        """What `reboot` does on a server: systemd stops every unit and ends; then the same disk boots."""
        assert self.boot_proc is not None
        started = time.monotonic()
        self.run(["systemctl", "reboot"], check=False)
        how = self._wait_ended(timeout)
        shutdown = round(time.monotonic() - started, 2)
        return RebootReport(shutdown, how, self.boot())

    def stop(self, timeout: float = 60) -> str | None:
        """Power off (SIGRTMIN+4 to the guest's systemd: a clean shutdown); after `timeout`, kill
        everything in its cgroup. Returns how PID 1 ended (None: it was not running)."""
        if self.boot_proc is None:
            return None
        how = "killed"
        if self.boot_proc.poll() is None and self.pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGRTMIN + 4)
            with contextlib.suppress(TimeoutError):
                how = self._wait_ended(timeout)
        if self.boot_proc is not None:  # still running: the timeout passed
            self._kill_all()
        return how

    def _wait_ended(self, timeout: float) -> str:
        """Wait for the boot process (it ends with the guest's PID 1); its status says why it ended."""
        assert self.boot_proc is not None
        try:
            code = self.boot_proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the guest's systemd still runs {timeout} s after the shutdown began") from None
        self._ended()
        return PID1_SIGNALS.get(signal.Signals(-code), f"signal {-code}") if code < 0 else f"exit {code}"

    def _kill_all(self) -> None:
        if self.cgroup is not None and (self.cgroup / "cgroup.kill").exists():
            (self.cgroup / "cgroup.kill").write_text("1")
        if self.boot_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.boot_proc.wait(30)
        self._ended()

    def _ended(self) -> None:
        self.boot_proc = None
        self.pid1 = None
        self._close_console()
        self._remove_cgroup()

    def _remove_cgroup(self) -> None:
        """The guest's cgroup subtree, leaves first (empty once its processes are gone)."""
        if self.cgroup is None or not self.cgroup.exists():
            return
        deadline = time.monotonic() + 10
        while True:
            dirs = sorted((Path(d) for d, _, _ in os.walk(self.cgroup)), key=lambda p: len(p.parts), reverse=True)
            try:
                for d in dirs:
                    d.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cleanup(self) -> None:
        """Everything this host started or made, also after a failed start; safe to call twice."""
        with contextlib.suppress(Exception):
            self.stop(timeout=20)
        if self.boot_proc is not None:
            self._kill_all()
        self._remove_cgroup()
        self._close_console()
        if self.proxy is not None:
            self.proxy.terminate()
            try:
                self.proxy.wait(5)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
            self.proxy = None
        if self.netns_created:
            remove_veth_namespace(self.netns, self.veth)
            self.netns_created = False
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
            self.holder = None
        if self.apt_cache:
            with contextlib.suppress(OSError):
                self._keep_downloads()
        shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------------ console
    def _open_console(self) -> None:
        """A pty as the guest's /dev/console; its output is appended to console.log."""
        master, slave = os.openpty()
        os.fchown(slave, ID_SHIFT, ID_SHIFT)  # the guest's root opens it as /dev/console
        self._console_master, self._console_slave = master, slave
        path = self.base / "console.log"

        def drain() -> None:
            with open(path, "ab") as out:
                while True:
                    try:
                        data = os.read(master, 65536)
                    except OSError:
                        return
                    if not data:
                        return
                    out.write(data)
                    out.flush()

        self._console_thread = threading.Thread(target=drain, name=f"console-{self.tag}", daemon=True)
        self._console_thread.start()

    def _close_console(self) -> None:
        for fd in (self._console_slave, self._console_master):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._console_master = self._console_slave = None
        if self._console_thread is not None:
            self._console_thread.join(5)
            self._console_thread = None

    def _log_tail(self, name: str, lines: int = 30) -> str:
        path = self.base / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    # ------------------------------------------------------------------ inside
    def run(
        self, command: str | Sequence[str], input: str | None = None, *, check: bool = False, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the guest as root (all its namespaces and its root directory, through
        nsenter), in a clean environment; a string runs through bash -c."""
        if self.pid1 is None:
            raise RuntimeError("the host is not running")
        argv = ["bash", "-c", command] if isinstance(command, str) else list(command)
        env = ["env", "-i", f"PATH={SYSTEM_PATH}", "LANG=C.UTF-8", "HOME=/root"]
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "-r", "-w", *env, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} exited {result.returncode} in the guest: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def ssh_argv(self, command: str, *, user: str = "root") -> list[str]:
        """The ssh client the program's commands travel through: this host's key pinned, no agent, no TOFU."""
        return [
            "ssh",
            "-i",
            str(self.private_key_path),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.base / 'known_hosts'}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            f"{user}@{self.address}",
            command,
        ]

    def ssh(
        self, command: str, stdin: str | None = None, *, check: bool = False, timeout: float = 1200, user: str = "root"
    ) -> subprocess.CompletedProcess[str]:
        """`command` over SSH, as the program runs it (a login shell on the guest, data on stdin)."""
        result = subprocess.run(
            self.ssh_argv(command, user=user),
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ssh {command[:80]!r} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
        return result

    def provision(self, **values: object) -> subprocess.CompletedProcess[str]:
        """provision.sh over SSH as the program ships it: `script_command` (lib.sh + the script, its
        arguments from these settings) with the release tool bundle on stdin."""
        command = script_command(PROVISION, provision_args(self.settings(**values)))
        return self.ssh(command, release_tool_bundle())

    def packages(self) -> dict[str, str]:
        """Installed Debian packages: name -> version."""
        out = self.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Package} ${Version}\\n"], check=True).stdout
        return {name: version for status, name, version in (line.split() for line in out.splitlines()) if status == "installed"}

    def read(self, path: str) -> str:
        return self.run(["cat", "--", path], check=True).stdout

    def checksums(self) -> list[str]:
        """Every file provisioning manages (MANAGED) with its path, mode, owner and sha256, and the
        packages with their versions; not what running daemons write (PM2's own files, the app's logs
        and data)."""
        prune = ["(", *" -o ".join(f"-path {p}/*" for p in UNMANAGED).split(), ")", "-prune", "-o"]
        listing = self.run(["find", *MANAGED, *prune, "-printf", "%p %m %u:%g %y\\n"], check=True).stdout
        digests = self.run(["find", *MANAGED, *prune, "-type", "f", "-exec", "sha256sum", "{}", "+"], check=True).stdout
        packages = [f"package {k}={v}" for k, v in self.packages().items()]
        return sorted([*listing.splitlines(), *digests.splitlines(), *packages])

    # ------------------------------------------------------------------ the stack
    def config(self, **values: object) -> dict[str, str]:
        """Raw stack config (strings, JSON for lists/objects) deploying to this host in existing-host
        mode with the program's defaults for paths and users, Node from the distribution."""
        raw: dict[str, object] = {
            "release": "test-release",
            "host": self.address,
            "sshUser": "root",
            "sshPrivateKey": self.private_key,
            "hostKey": self.host_key,
            "nodeSource": "distribution",
            "nodeMajor": distribution_node_major(self.image),
        }
        raw.update(values)
        return {k: _config_string(v) for k, v in raw.items() if v is not None}

    def settings(self, **values: object) -> Settings:
        cfg = self.config(**values)
        return parse_settings(cfg.get)


def distribution_node_major(image: str) -> int:
    """The Node major an image's own nodejs package gives (settings.DISTRIBUTION_NODE_MAJORS)."""
    return DISTRIBUTION_NODE_MAJORS[image]


def _main(argv: list[str]) -> int:
    """`python -m tests.support.pristine_host build [RELEASE...]`: build (or find) the cached roots."""
    if not argv or argv[0] != "build":
        print("usage: python -m tests.support.pristine_host build [RELEASE...]", file=sys.stderr)
        return 2
    for release in argv[1:] or ["bookworm"]:
        started = time.monotonic()
        root = base_root(release)
        print(f"pristine-root: {release}: {root} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
