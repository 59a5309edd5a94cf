"""The tool on a server: ROOT's layout, the app's processes, nginx, data backups, what it prints.

`Server` holds ROOT open (a descriptor: every path under it is looked up from there, O_NOFOLLOW
where the app can write) and is the `activation.Edges` the state machine runs on.

Layout: the directories root works in are root's (`ensure_layout`); releases are root's and
read-only to the app once installed (install.py); whatever root must read inside the app's own
directories (shared/data, shared/logs) is read by a child running as the app, so a link planted
there never makes root read or change anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any

from . import facts, pm2, proc, safefs
from .config import Config
from .proc import Account, iso_now
from .state import Store, current_id

if TYPE_CHECKING:
    from tarfile import TarInfo


class ToolError(Exception):
    """The command fails: exit `code` (1 failure, 2 usage, 3 locked), `result` for releases.log."""

    def __init__(self, message: str | None, code: int = 1, result: str | None = None) -> None:
        super().__init__(message or "")
        self.message = message
        self.code = code
        self.result = result


PROG = "cognivern-release"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def say(msg: str) -> None:
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()


class Server(proc.HostEdges):
    def __init__(self, cfg: Config, root_fd: int) -> None:
        self.cfg = cfg
        self.root_fd = root_fd
        self.store = Store(root_fd)
        self.daemon = pm2.Daemon(cfg.pm2_home, cfg.app)
        self._masker: proc.Masker | None = None
        self._env: tuple[dict[str, str], bool] | None = None  # shared/.env's values, and whether it is root's copy
        self.deploy_lock_fd: int | None = None  # the deploy lock, held until the process ends

    def say(self, msg: str) -> None:
        say(msg)

    @contextlib.contextmanager
    def dir(self, rel: str) -> Iterator[int]:
        """A directory under ROOT, every component opened without following a link."""
        fds: list[int] = []
        try:
            fd = self.root_fd
            for part in rel.split("/"):
                fd = safefs.open_dir(part, fd)
                fds.append(fd)
            yield fd
        finally:
            for fd in reversed(fds):
                os.close(fd)

    # ------------------------------------------------------------------ layout
    def ensure_layout(self) -> None:
        """The layout provisioning makes (parents before children): root's where root works, the
        app's leaves created when missing and never followed when a link."""
        app = self.cfg.app
        for name, mode in (
            ("releases", 0o755),
            ("shared", 0o755),
            ("cache", 0o755),
            ("backups", 0o700),
            (".deploy", 0o700),
            ("config", 0o755),
        ):
            os.close(self.root_dir(self.root_fd, name, mode))
        with self.dir(".deploy") as deploy:
            for name in ("locks", "tmp", "runs"):
                os.close(self.root_dir(deploy, name, 0o700))
        for rel in ("shared/data", "shared/logs", "cache/pnpm-store"):
            parent, name = rel.split("/")
            with self.dir(parent) as pfd:
                self.app_dir(pfd, name, f"{self.cfg.root}/{rel}", app)
        with contextlib.suppress(FileExistsError):
            os.mkdir("incoming", 0o700, dir_fd=self.root_fd)

    def root_dir(self, parent: int, name: str, mode: int) -> int:
        """A directory root works in: root's, not writable by others; a link there is refused."""
        try:
            return safefs.ensure_dir(parent, name, mode, 0, 0, fix=os.geteuid() == 0)
        except safefs.RefusedError as err:
            raise ToolError(_where(self.cfg.root, parent, name, str(err))) from None

    def app_dir(self, parent: int, name: str, path: str, owner: Account) -> None:
        """A directory the app writes: created as the app's when missing, otherwise left alone; a
        link there is refused, never chowned or followed."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            os.mkdir(name, 0o750, dir_fd=parent)
            with safefs.opened_dir(name, parent) as fd:
                os.fchown(fd, owner.uid, owner.gid)
                os.fchmod(fd, 0o750)
            return
        if stat.S_ISLNK(st.st_mode):
            raise ToolError(f"{path} is a symbolic link where the app's directory belongs; refusing to work through it")
        if not stat.S_ISDIR(st.st_mode):
            raise ToolError(f"{path} exists but is not a directory")

    # ------------------------------------------------------------------ the app's environment
    def env_values(self, *, trusted: bool = True) -> dict[str, str] | None:
        """shared/.env as data (a regular file in root's shared/, never through a link); None when
        it is missing. `trusted`: only root's copy (root:APP 0640), the one the secret values to
        mask with come from; a copy someone else could write (the app's, on hosts from before) could
        hold values of the app's choosing. For the app's own environment any copy will do."""
        if self._env is None:
            try:
                with self.dir("shared") as shared:
                    data, st = safefs.read_file(shared, ".env")
            except (OSError, safefs.RefusedError):
                return None
            self._env = (facts.parse_assignments(data.decode("utf-8", "replace")), st.st_uid == 0 and not st.st_mode & 0o022)
        values, roots = self._env
        return values if roots or not trusted else None

    def masker(self) -> proc.Masker:
        """Secret values (cognivern:secretEnv; SECRET_KEYS names them) replaced by *** in anything
        printed from the app: `pulumi up` shows it, and CI logs can be public. ToolError closed: when the
        values cannot be read, nothing from the app is printed."""
        if self._masker is None:
            if not self.cfg.secret_keys:
                self._masker = proc.Masker()
            else:
                env = self.env_values()
                if env is None:
                    self._masker = proc.Masker(
                        withheld=f"(withheld: the secret values to mask it with could not be read from {self.cfg.root}/shared/.env,"
                        " which must be root's and writable by no one else)"
                    )
                else:
                    self._masker = proc.Masker(env.get(k, "") for k in self.cfg.secret_keys)
        return self._masker

    def app_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of every app-user child: nothing of root's but PATH."""
        a = self.cfg.app
        env = {
            "HOME": a.home,
            "USER": a.name,
            "LOGNAME": a.name,
            "PATH": os.environ.get("PATH") or SYSTEM_PATH,
            "PM2_HOME": self.cfg.pm2_home,
            "LANG": "C.UTF-8",
            # whichever pm2 call starts PM2's daemon (the cluster primary) must give it this, or
            # Node's round-robin hands connections to exiting workers (see apps.start)
            "NODE_CLUSTER_SCHED_POLICY": "none",
        }
        return {**env, **(extra or {})}

    def as_app(self, argv: list[str], *, extra: Mapping[str, str] | None = None, timeout: float | None = None) -> tuple[int, bytes]:
        return proc.run(self.cfg.app, argv, self.app_env(extra), timeout=timeout)

    def show(self, data: bytes, indent: str = "") -> None:
        """Print what the app produced to stderr, masked and without control characters."""
        m = self.masker()
        if m.withheld is not None:
            if data.strip():
                say(m.withheld)
            return
        for line in proc.decode(data).rstrip("\n").split("\n"):
            sys.stderr.write(indent + m(line) + "\n")
        sys.stderr.flush()

    def pm2_cli(self, *args: str, extra: Mapping[str, str] | None = None, report: bool = True) -> bool:
        """PM2's CLI as the app user; what it printed is shown (cleaned) only when it failed (`report`)."""
        rc, out = self.as_app(["pm2", *args], extra=extra)
        if rc != 0 and report:
            say(f"pm2 {args[0]} failed (exit {rc}):")
            self.show(out, indent="  ")
        return rc == 0

    # ------------------------------------------------------------------ Edges: PM2
    def pm2_list(self) -> list[dict[str, Any]] | None:
        return self.daemon.list()

    def release_dir(self, rid: str) -> str | None:
        path = f"{self.cfg.root}/releases/{rid}"
        return os.path.realpath(path) if os.path.isdir(path) else None

    def delete_app(self, name: str) -> None:
        """PM2 stops and forgets app `name` over its RPC socket; no daemon: no app to delete (`pm2
        delete` would start a daemon first). Otherwise, on failure, `pm2 delete`."""
        if self.daemon.delete(name) is None:
            self.pm2_cli("delete", name, report=False)

    def app_pids(self, name: str) -> list[int]:
        """The processes of PM2 app `name` of this PM2_HOME (PM2 puts its pm2_env, name first, into
        each worker's environment) in this mount namespace: what must be gone once a slot stops."""
        want_home = f"PM2_HOME={self.cfg.pm2_home}".encode()
        want_name = f'pm2_env={{"name":"{name}",'.encode()
        try:
            mnt = os.readlink("/proc/self/ns/mnt")
        except OSError:
            mnt = ""
        out = []
        for pid in proc.uid_pids(self.cfg.app.uid):
            try:
                if os.readlink(f"/proc/{pid}/ns/mnt") != mnt:
                    continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue
            if want_home in environ and any(e.startswith(want_name) for e in environ):
                out.append(pid)
        return out

    def kill(self, pids: list[int]) -> None:
        """SIGKILL these processes of the app: each through a pidfd checked to be the app's, so a
        pid reused meanwhile is never hit."""
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                with open(f"/proc/{pid}/status", "rb") as f:
                    uid = next((int(line.split()[1]) for line in f if line.startswith(b"Uid:")), -1)
                if uid == self.cfg.app.uid:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)

    def pm2_save(self) -> None:
        self.pm2_cli("save", "--force")

    def delete_all_apps(self) -> None:
        self.pm2_cli("delete", f"{self.cfg.root}/config/ecosystem.config.cjs", report=False)  # none left is fine

    def start_apps(self, only: str) -> bool:
        from . import apps

        return apps.start(self, only or None)

    # ------------------------------------------------------------------ Edges: health, nginx, current
    def health(self, url: str) -> bool:
        return health_check(url)[0]

    def upstream(self, live_port: int, backup_port: int | None) -> bool:
        from . import nginx

        return nginx.switch(self, live_port, backup_port)

    def current(self) -> str | None:
        return current_id(self.root_fd)

    def set_current(self, rid: str | None) -> None:
        """`current` to releases/<rid> in one step (a new link renamed over the old one), or gone."""
        if rid is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink("current", dir_fd=self.root_fd)
        else:
            safefs.symlink_atomic(self.root_fd, "current", f"releases/{rid}")

    def error_log(self) -> None:
        """The end of the app's error log, read as the app (a link planted there never makes root
        print a file), masked."""
        path = f"{self.cfg.root}/shared/logs/error.log"
        with contextlib.suppress(OSError), self.dir("shared/logs") as logs:
            if not stat.S_ISREG(os.stat("error.log", dir_fd=logs, follow_symlinks=False).st_mode):
                return
        if not os.path.isfile(path):
            return
        say(f"last lines of {path}:")
        _, out = self.as_app(["tail", "-n", "30", "--", path])
        self.show(out)

    def log_recovery(self, rid: str, phase: str) -> None:
        self.log_line(f"{iso_now()} recover {rid} {invoking_user()} - {phase}")

    def log_line(self, line: str) -> None:
        with contextlib.suppress(OSError), self.dir(".deploy") as deploy:
            fd = os.open("releases.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=deploy)
            with os.fdopen(fd, "a") as f:
                f.write(line + "\n")

    # ------------------------------------------------------------------ data backups
    def backup(self, label: str) -> str:
        """Archive shared/data into ROOT/backups/data; the path.

        shared/data is the app's and changes while it is read (the agent appends to data/*.jsonl all
        the time). tar runs as the app user, so a link there is archived as a link and root never
        reads a file through it; root only writes the archive into backups/data (root's, 0700). GNU
        tar exits 1 when a file changed (or vanished) while it was read: the archive is complete and
        holds that file as it was read, so 1 is a warning here; anything worse fails the backup.
        Callers hold the deploy lock, so a .partial left by a killed run is removed first.
        """
        started = time.monotonic()
        with self.dir("backups") as backups:
            bfd = self.root_dir(backups, "data", 0o700)
        try:
            for name, _ in safefs.entries(bfd):
                if name.startswith(".data-") and name.endswith(".partial"):
                    os.unlink(name, dir_fd=bfd)
            ns = time.time_ns()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"
            name = f"data-{stamp}-{label}.tar.gz"
            tmp = f".{name}.partial"
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=bfd)
            try:
                tar = proc.popen(
                    self.cfg.app,
                    ["tar", "-cf", "-", "-C", f"{self.cfg.root}/shared", "data"],
                    self.app_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                gz = subprocess.Popen(["gzip", "-c"], stdin=tar.stdout, stdout=out, stderr=subprocess.DEVNULL, close_fds=True)
                assert tar.stdout is not None and tar.stderr is not None
                tar.stdout.close()
                errors = tar.stderr.read()
                tar_rc, gz_rc = tar.wait(), gz.wait()
            finally:
                os.close(out)
            if tar_rc > 1 or gz_rc != 0:
                self.show(errors, indent="  ")
                os.unlink(tmp, dir_fd=bfd)
                raise ToolError(f"backup of shared/data failed (tar exit {tar_rc}, gzip exit {gz_rc}); nothing was kept")
            if tar_rc == 1:
                say("warning: files in shared/data changed while being archived; the backup holds them as they were read:")
                self.show(b"\n".join(errors.split(b"\n")[:5]), indent="  ")
            os.rename(tmp, name, src_dir_fd=bfd, dst_dir_fd=bfd)
            size = os.stat(name, dir_fd=bfd).st_size
            say(f"backup {name}: {size} bytes in {int((time.monotonic() - started) * 1000)} ms")
            if self.cfg.data_backups_keep > 0:
                kept = sorted((n for n, st in safefs.entries(bfd) if n.startswith("data-") and n.endswith(".tar.gz")), reverse=True)
                for old in kept[self.cfg.data_backups_keep :]:
                    os.unlink(old, dir_fd=bfd)
            return f"{self.cfg.root}/backups/data/{name}"
        finally:
            os.close(bfd)


def flock(fd: int, wait: float | None) -> bool:
    """Take an exclusive flock; `wait` seconds at most (0: fail at once, None: no limit)."""
    if wait is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _where(root: str, parent: int, name: str, message: str) -> str:
    """Name the full path in a refusal."""
    try:
        base = os.readlink(f"/proc/self/fd/{parent}")
    except OSError:
        base = root
    return message.replace(name, f"{base}/{name}", 1)


def invoking_user() -> str:
    user = os.environ.get("SUDO_USER")
    if user and re.fullmatch(r"[A-Za-z0-9_.-]+", user):
        return user
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def health_check(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    """GET `url` on a new connection (like curl): (healthy by facts.health_ok, the body or why not).

    A plain HTTP/1.0 request on a socket: the answer is the app's, read as data (64 KiB at most,
    `timeout` for the whole exchange); http.client would cost the tool ~10 MB of memory (it brings
    ssl and email with it) for no more than this."""
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/[A-Za-z0-9/._-]*)", url)
    assert m, url
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", int(m[1])), timeout=timeout) as sock:
            sock.sendall(f"GET {m[2]} HTTP/1.0\r\nHost: 127.0.0.1:{m[1]}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while len(data) < 65536 + 8192:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as err:
        return False, str(err) or type(err).__name__
    head, sep, body = data.partition(b"\r\n\r\n")
    status = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    if not sep or status is None:
        return False, "no HTTP answer"
    body = body[:65536]
    return facts.health_ok(int(status[1]), body), body.decode("utf-8", "replace")


# ---------------------------------------------------------------------------- tarballs
# tar's letters for tarfile's member types (bytes of the header's type field)
TYPE_CHARS = {b"5": "d", b"0": "-", b"\0": "-", b"7": "C", b"2": "l", b"1": "h", b"3": "c", b"4": "b", b"6": "p", b"S": "S"}


def check_members(path: str, fileobj: IO[bytes], prefix: str | None, also: str = "") -> list[TarInfo]:
    """The members of a gzip tarball, refused when unsafe: absolute or `..` paths, member types
    other than directories, files and `also` (l: links, h: hard links), names outside `prefix`."""
    import tarfile  # only install and restore read tarballs: not loaded by the others

    try:
        with tarfile.open(fileobj=fileobj, mode="r:gz") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError, ValueError):
        raise ToolError(f"{path} is not a readable gzip tar archive") from None
    if not members:
        raise ToolError(f"{path} is empty")
    names = [m.name for m in members]
    if any(n.startswith("/") for n in names):
        raise ToolError(f"{path} has absolute member paths; refused")
    if any(".." in n.split("/") for n in names):
        raise ToolError(f"{path} has members with '..' in their path; refused")
    allowed = "d" + also + "-"
    types = sorted({TYPE_CHARS.get(m.type, "?") for m in members} - set(allowed))
    if types:
        raise ToolError(f"{path} has links, devices or other special members (types: {''.join(types)}); allowed member types: {allowed}")
    if prefix is not None:
        bad = [n for n in names if not re.match(prefix, n)][:3]
        if bad:
            raise ToolError(f"{path} has unexpected members: {' '.join(bad)}")
    return members
