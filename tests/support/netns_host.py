"""Several disposable "servers" on one machine, each in its own network and mount namespace.

    with NetnsHosts(2) as pool:                          # two hosts, one shared stack config
        config = pool.config(release="v1")              # hosts: [10.213.0.2, 10.213.0.6], hostKeys, ...
        engine.up(config, ...)                          # the real program, over SSH to each host
        pool.hosts[0].current()                         # that host's `current` release

A stack has ONE sshPort, root, appUser, port and nginxListen for all its hosts, so two hosts on
one machine cannot share a network or a filesystem view. Each `NetnsHost` gets:

- a network namespace with a veth pair from the root namespace (10.213.0.4k+1 here, 10.213.0.4k+2
  there, a /30 per host; nothing is routed off the machine) and its own loopback;
- an sshd started as `ip netns exec NS unshare --mount --propagation private sh -c 'mount --bind
  <host>/root <ROOT> && mount --bind <host>/home <APP_HOME> && exec sshd -D ...'`, so every command
  it runs (provision, the release tool, PM2, the app) sees that host's ROOT and app home at the
  common paths of the stack config; the binds live only in that private mount namespace and go
  away with its last process;
- its own nginx (a PrivateNginx prefix) started inside the sshd's network and mount namespaces
  (nsenter), so it reads the same files as the commands that reload it, listening on the common
  site port on all of the namespace's addresses;
- optionally (`binds`), a private copy of system directories such as /etc/letsencrypt, bound over
  them in that mount namespace: the program's own paths then work unchanged on the host (the TLS
  test lets certbot and nginx use /etc/letsencrypt and /var/www as on a server), while the
  machine's directories are never written;
- the COGNIVERN_* SetEnv overrides of TargetHost (bin dir, logrotate dir, sshd config and pid file,
  nginx paths), all per host, and its own host key (pinned through `hostKeys`).

The pool owns what the hosts share: the client key (one `sshPrivateKey`), the app user (created
here, with no home of its own in the root namespace: each host binds its own), the common ROOT
and home mount points. Cleanup (also after failures): each host's PM2 killed as the app user with
its PM2_HOME inside that host's namespaces (nsenter), nginx and sshd stopped, remaining processes
of the (unique, test-only) app user ended by pid, the user removed, veths and namespaces deleted,
temp dirs removed. Requires root, iproute2 and util-linux (unshare, nsenter).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from components.release.cognivern_release import facts
from components.settings import parse_settings
from tests.support.helpers import SYSTEM_PATH, DisposableHost, end_user_processes, root_base, run_pm2, user_pids
from tests.support.nginx import PrivateNginx
from tests.support.sshd import LocalSshd
from tests.support.target_host import _config_string, node_major

SUBNET_PREFIX = "10.213.0."  # a /30 per host out of 10.213.0.0/24, on our own veth pairs only
SSH_PORT = 22  # inside each namespace: one sshPort for the whole stack
SITE_PORT = 8080  # each host's nginx site (nginxListen), on all of its namespace's addresses
APP_PORT = 3000  # the app on 127.0.0.1 inside each namespace (cognivern:port; the green slot on 3001)
SLOT_LOCK = "/run/lock/cognivern-netns-slots.lock"  # flock only: choosing the /30s (below)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _used_slots() -> set[int]:
    out = _ip("-4", "-o", "addr", "show").stdout
    used = set()
    for word in out.split():
        if word.startswith(SUBNET_PREFIX):
            used.add(int(word.split("/")[0].rsplit(".", 1)[1]) // 4)
    return used


@contextlib.contextmanager
def claimed_slots(count: int) -> Iterator[list[int]]:
    """`count` free /30s of 10.213.0.0/24 (slot k: k*4+1 on the root side, k*4+2 in the namespace).

    Concurrent test runs pick their /30s one at a time: the lock is held until the caller has put
    its addresses on them (an address added twice on two veths would not fail, only misroute).
    """
    with open(SLOT_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = _used_slots()
        free = [s for s in range(1, 63) if s not in used][:count]
        if len(free) < count:
            raise RuntimeError("no free /30 left in 10.213.0.0/24")
        yield free


def slot_addresses(slot: int) -> tuple[str, str]:
    """(root side, namespace side) of a slot's /30."""
    return f"{SUBNET_PREFIX}{4 * slot + 1}", f"{SUBNET_PREFIX}{4 * slot + 2}"


def add_veth_namespace(netns: str, veth: str, peer: str, address: str) -> None:
    """Network namespace `netns` (already added) gets eth0 = address/30 and lo up; `veth` is its
    peer in the root namespace with `peer`/30. Nothing is routed off the machine."""
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    _ip("addr", "add", f"{peer}/30", "dev", veth)
    _ip("link", "set", veth, "up")
    for args in (["addr", "add", f"{address}/30", "dev", "eth0"], ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
        _ip("netns", "exec", netns, "ip", *args)


def remove_veth_namespace(netns: str | None, veth: str) -> None:
    """The veth (gone with the namespace anyway, but a failed start may leave only the veth) and the namespace."""
    _ip("link", "del", veth, check=False)
    if netns is not None:
        _ip("netns", "del", netns, check=False)


class NetnsSshd(LocalSshd):
    """A LocalSshd started inside a network namespace and a private mount namespace with binds."""

    def __init__(self, *, netns: str, address: str, binds: list[tuple[Path, Path]], **kwargs: Any) -> None:
        super().__init__(port=SSH_PORT, extra_config=[f"ListenAddress {address}"], **kwargs)
        self.netns = netns
        self.address = address
        self.binds = binds
        self.known_hosts_path.write_text(f"{address} {self.host_key}\n")

    @property
    def listen_address(self) -> str:
        return self.address

    def daemon_argv(self) -> list[str]:
        """LocalSshd's daemon inside the namespaces, after the binds (ip netns exec and unshare exec in place)."""
        mounts = " && ".join(f'mount --bind "{src}" "{dst}"' for src, dst in self.binds)
        script = f"{mounts} && exec {shlex.join(super().daemon_argv())}"
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def ssh_argv(self, command: str | None = None, *, user: str | None = None, options: Sequence[str] = ()) -> list[str]:
        """LocalSshd's client argv, aimed at the namespace's address (port 22 there)."""
        login = f"{user or self.user}@127.0.0.1"
        return [f"{user or self.user}@{self.address}" if a == login else a for a in super().ssh_argv(command, user=user, options=options)]


class NetnsHost:
    """One host of a NetnsHosts pool. Attributes:
    index      1-based
    netns      namespace name;  address  its IP (the stack's `hosts` entry);  peer  the root side
    base       per-host temp dir: root/ (bound onto the pool's ROOT), home/ (onto APP_HOME), bin/, logrotate.d/
    root       this host's ROOT as seen from the root namespace (base/root)
    home       this host's app home as seen from the root namespace (base/home)
    sshd       NetnsSshd;  nginx  PrivateNginx (started inside the namespace)
    """

    def __init__(self, pool: NetnsHosts, index: int, slot: int) -> None:
        self.pool = pool
        self.index = index
        self.netns = f"cgv{pool.tag}{index}"
        self.veth = f"cgv{pool.tag}{index}r"  # root side (<= 15 chars)
        self.peer, self.address = slot_addresses(slot)
        self.base = pool.base / f"host-{index}"
        self.root = self.base / "root"
        self.home = self.base / "home"
        self.bin_dir = self.base / "bin"
        self.logrotate_dir = self.base / "logrotate.d"
        for d in (self.root, self.home, self.bin_dir, self.logrotate_dir):
            d.mkdir(parents=True)
        self.base.chmod(0o755)
        self.root.chmod(0o755)
        # system directory -> this host's private copy of it (bound over it inside the namespaces)
        self.binds = {path: self.base / "private" / str(path).strip("/").replace("/", "_") for path in pool.binds}
        for path, copy in self.binds.items():
            if not path.is_dir():
                raise RuntimeError(f"{path} must exist on this machine: it is the mount point of the host's private copy")
            shutil.copytree(path, copy, symlinks=True)  # what a fresh server has there (e.g. certbot's cli.ini)
        self.nginx = PrivateNginx(port=SITE_PORT, autostart=False)
        self.sshd: NetnsSshd | None = None
        self.netns_created = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        pool = self.pool
        _ip("netns", "add", self.netns)
        self.netns_created = True
        add_veth_namespace(self.netns, self.veth, self.peer, self.address)
        os.chown(self.home, pool.uid, pool.gid)
        self.home.chmod(0o750)
        self.sshd = NetnsSshd(
            netns=self.netns,
            address=self.address,
            binds=[(self.root, pool.root), (self.home, pool.app_home), *((copy, path) for path, copy in self.binds.items())],
            set_env={
                "PATH": f"{self.bin_dir}:{SYSTEM_PATH}",
                "COGNIVERN_BIN_DIR": str(self.bin_dir),
                "COGNIVERN_LOGROTATE_DIR": str(self.logrotate_dir),
                "COGNIVERN_SSHD_CONFIG": "{config}",
                "COGNIVERN_SSHD_PIDFILE": "{pidfile}",
                **self.nginx.env,
                **{key: value.replace("{base}", str(self.base)) for key, value in pool.env.items()},
            },
        )
        # one sshPrivateKey for the stack: every host accepts the pool's client key
        (self.sshd.dir / "authorized_keys").write_text(pool.public_key + "\n")
        self.sshd.private_key_path, self.sshd.private_key, self.sshd.public_key = pool.key_path, pool.private_key, pool.public_key
        self.sshd.start()
        assert self.sshd.pid is not None
        proc = subprocess.run(["nsenter", "-t", str(self.sshd.pid), "-m", "-n", "--", *self.nginx.argv()], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nginx in {self.netns}: {proc.stderr.strip()}")
        deadline = time.monotonic() + 10
        while self.nginx.master_pid is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx in {self.netns} did not start")
            time.sleep(0.05)

    def cleanup(self) -> None:
        """PM2 (inside the namespaces), nginx, sshd, veth, namespace. Safe to call twice."""
        self.kill_pm2()
        with contextlib.suppress(Exception):
            self.nginx.stop()
        if self.sshd is not None:
            with contextlib.suppress(Exception):
                self.sshd.stop()
        remove_veth_namespace(self.netns if self.netns_created else None, self.veth)
        self.netns_created = False

    def kill_pm2(self) -> None:
        """`pm2 kill` as the app user with this host's PM2_HOME, inside its network and mount namespaces."""
        pm2_dir = self.home / ".pm2"
        sshd_pid = self.sshd.pid if self.sshd is not None else None
        if sshd_pid is None or not any((pm2_dir / f).exists() for f in ("pm2.pid", "rpc.sock")):
            return
        pool = self.pool
        run_pm2(pool.app_user, pool.app_home, pool.app_home / ".pm2", "kill", prefix=["nsenter", "-t", str(sshd_pid), "-m", "-n", "--"])

    # ------------------------------------------------------------------ views
    def run(self, command: str, stdin: bytes | str | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """A command over this host's SSH, as the program runs it."""
        assert self.sshd is not None
        return self.sshd.run(command, stdin, **kwargs)

    def current(self) -> str | None:
        link = self.root / "current"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    def releases(self) -> dict[str, str]:
        """Release id -> state (`cognivern-release list`)."""
        out = self.run(f"cognivern-release --root {self.pool.root} list --json", check=True).stdout
        return {r["id"]: r["state"] for r in json.loads(out)["releases"]}

    def url(self, path: str = "/") -> str:
        return f"http://{self.address}:{SITE_PORT}{path}"


class NetnsHosts(DisposableHost):
    """A pool of NetnsHost sharing one stack config (see the module docstring)."""

    def __init__(self, count: int, *, binds: Sequence[Path] = (), env: Mapping[str, str] | None = None) -> None:
        """`binds`: system directories each host gets a private copy of; `env`: more SetEnv overrides
        for every host's commands ("{base}" in a value stands for that host's temp dir)."""
        self.binds = tuple(binds)
        self.env = dict(env or {})
        if os.geteuid() != 0:
            raise RuntimeError("NetnsHosts needs root (network namespaces, bind mounts, useradd)")
        self.tag = uuid.uuid4().hex[:6]
        self.base = root_base("cognivern-netns-")
        self.root = self.base / "root"  # the stack's ROOT: an empty mount point here, bound per host
        self.root.mkdir()
        self.app_user = f"cvm{uuid.uuid4().hex[:8]}"
        self.build_user = facts.build_user(self.app_user)
        self.app_home = Path("/home") / self.app_user
        self.key_path = self.base / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cognivern-netns", "-f", str(self.key_path)], check=True)
        self.private_key = self.key_path.read_text()
        self.public_key = self.key_path.with_suffix(".pub").read_text().strip()
        self.hosts: list[NetnsHost] = []
        self.user_created = False
        self.home_created = False
        self.count = count

    def _start(self) -> None:
        home = ["--no-create-home", "--home-dir", str(self.app_home)]
        subprocess.run(
            ["useradd", "--system", *home, "--shell", "/bin/bash", "--user-group", self.app_user],
            check=True,
            capture_output=True,
        )
        self.user_created = True
        # the build account as provisioning makes it (provision.sh on each host then finds it in that shape)
        build_home = ["--no-create-home", "--home-dir", str(self.root / "cache" / "build" / "work"), "--shell", "/usr/sbin/nologin"]
        subprocess.run(["useradd", "--system", *build_home, "--user-group", self.build_user], check=True, capture_output=True)
        self.app_home.mkdir(mode=0o750)  # mount point; each host binds its own home here
        self.home_created = True
        with claimed_slots(self.count) as free:
            for index, slot in enumerate(free, start=1):
                host = NetnsHost(self, index, slot)
                self.hosts.append(host)
                host.start()

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.app_user).pw_uid

    @property
    def gid(self) -> int:
        return pwd.getpwnam(self.app_user).pw_gid

    def cleanup(self) -> None:
        for host in self.hosts:
            host.cleanup()
        if self.user_created:
            self._end_user_processes()
            subprocess.run(["userdel", self.app_user], capture_output=True)
            end_user_processes(self.build_user)
            subprocess.run(["userdel", self.build_user], capture_output=True)
            self.user_created = False
        if self.home_created:
            with contextlib.suppress(OSError):
                self.app_home.rmdir()  # the empty mount point (homes live under base)
            self.home_created = False
        shutil.rmtree(self.base, ignore_errors=True)

    def user_pids(self) -> list[int]:
        return user_pids(self.app_user)

    def _end_user_processes(self) -> None:
        end_user_processes(self.app_user)

    def seed_pnpm_store(self, app_dir: Path) -> None:
        """Fill every host's pnpm store (the build account's, ROOT/cache/build/work/store) with
        `app_dir`'s production dependencies.

        The namespaces have no route off the machine (on purpose), so `pnpm install --prefer-offline`
        on a host must find its packages in the store: they are fetched once here, in the root
        namespace, and copied to each host (owned by the build account, as the release tool keeps it).
        """
        seed = self.base / "pnpm-seed"
        work = seed / "app"
        shutil.copytree(app_dir, work, ignore=shutil.ignore_patterns("node_modules"))
        subprocess.run(
            ["pnpm", "install", "--prod", "--frozen-lockfile", "--store-dir", str(seed / "store"), "--reporter=silent"],
            cwd=work,
            check=True,
            capture_output=True,
            env={**os.environ, "CI": "true"},
            timeout=300,
        )
        for host in self.hosts:
            build_home = host.root / "cache" / "build" / "work"
            build_home.mkdir(parents=True, exist_ok=True)
            build_home.chmod(0o700)
            shutil.copytree(seed / "store", build_home / "store", symlinks=True)
            subprocess.run(["chown", "-R", f"{self.build_user}:{self.build_user}", str(build_home)], check=True)
        shutil.rmtree(seed, ignore_errors=True)

    # ------------------------------------------------------------------ the stack
    def config(self, **values: object) -> dict[str, str]:
        """Raw stack config for all hosts: `hosts`, a host key pin per host, one key/port/root/user."""
        raw: dict[str, object] = {
            "release": "test-release",
            "hosts": [h.address for h in self.hosts],
            "hostKeys": {h.address: h.sshd.host_key for h in self.hosts if h.sshd is not None},
            "sshUser": "root",
            "sshPort": SSH_PORT,
            "sshPrivateKey": self.private_key,
            "root": str(self.root),
            "appUser": self.app_user,
            "port": APP_PORT,
            "nodeMajor": node_major(),
            "nginxListen": [str(SITE_PORT)],
            "bakeSeconds": 3,  # each server bakes before the next one starts (short: the suite's time)
        }
        raw.update(values)
        return {k: _config_string(v) for k, v in raw.items() if v is not None}

    def settings(self, **values: object) -> Any:
        cfg = self.config(**values)
        return parse_settings(cfg.get)
