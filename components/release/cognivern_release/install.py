"""Install a release: verify the artifact, unpack it into releases/ID (root's), install production
dependencies with pnpm as the build account, seal it.

The app (hostile by assumption, and running meanwhile) can write nothing the install reads or
writes: the release directory is root's from the start; only node_modules belongs, while pnpm runs,
to the build account (neither root nor the app: packages run install scripts), whose store, HOME
and npmrc are its own (ROOT/cache/build: the npmrc root's, the rest the build account's alone).
When pnpm is done, every process of the build account is ended, and only then is the tree sealed
(safefs.seal: root's, read-only to everyone else, no setuid bit, never following a link).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from typing import IO, TYPE_CHECKING

from . import proc, safefs
from .server import ToolError, check_members, say

if TYPE_CHECKING:
    from tarfile import TarInfo

    from .server import Server

UNFINISHED = ".cognivern-unfinished"
# Root's proxy settings reach pnpm (it reads both spellings): a server that reaches npm's registry
# only through a proxy sets them in /etc/environment, which SSH sessions (the deploy's) get from PAM.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
NPMRC = """\
# Managed by cognivern-release: the build account's npm/pnpm settings (root's; the build cannot change them).
update-notifier=false
fund=false
"""


def complete(srv: Server, rid: str) -> bool:
    """releases/ID is there and not marked unfinished."""
    try:
        with srv.dir(f"releases/{rid}") as fd:
            try:
                os.stat(UNFINISHED, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return True
    except (OSError, safefs.RefusedError):
        return False
    return False


def exists(srv: Server, rid: str) -> bool:
    with srv.dir("releases") as rel:
        try:
            return stat.S_ISDIR(os.stat(rid, dir_fd=rel, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False


def fetch(srv: Server, source: str, rid: str) -> tuple[str, IO[bytes]]:
    """(path for messages, an open file) of the artifact: a path, or an https:// URL downloaded
    into .deploy/tmp."""
    if source.startswith("https://"):
        path = f"{srv.cfg.root}/.deploy/tmp/download-{rid}.{os.getpid()}.tar.gz"
        say(f"downloading {source}")
        result = subprocess.run(
            ["curl", "-fsSL", "--proto", "=https", "--retry", "3", "--max-time", "600", "-o", path, source],
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if result.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise ToolError(f"download of {source} failed")
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it
        os.unlink(path)
        return path, f
    if "://" in source:
        raise ToolError(f"SOURCE URLs must be https://, got '{source}'", code=2)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise ToolError(f"{source} does not exist (upload it to {srv.cfg.root}/incoming first)") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ToolError(f"{source} does not exist (upload it to {srv.cfg.root}/incoming first)")
    return source, f


def verify(path: str, f: IO[bytes], sha: str) -> list[TarInfo]:
    """The checksum, safe members, nothing the server owns at the top level."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    if h.hexdigest() != sha:
        raise ToolError(f"checksum mismatch for {path}: expected {sha}, got {h.hexdigest()}; nothing was unpacked", result="bad-checksum")
    f.seek(0)
    members = check_members(path, f, None)
    top = sorted({re.sub(r"^\./", "", m.name).split("/")[0] for m in members} & {".env", "data", "logs", "node_modules"})
    if top:
        raise ToolError(f"{path} contains {' '.join(top)} at its top level; artifacts carry no secrets, data, logs or node_modules")
    f.seek(0)
    return members


def unpack(srv: Server, f: IO[bytes], rid: str, rel_fd: int) -> None:
    """Into releases/ID (root's, made here), marked unfinished; one wrapping directory tolerated."""
    say(f"installing release {rid}")
    import tarfile  # loaded only by install

    with tarfile.open(fileobj=f, mode="r:gz") as tar:
        for member in tar:
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if not parts:
                continue
            parent = rel_fd
            opened: list[int] = []
            try:
                for part in parts[:-1]:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=parent)
                    parent = safefs.open_dir(part, parent)
                    opened.append(parent)
                if member.isdir():
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(parts[-1], 0o755, dir_fd=parent)
                elif member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    mode = 0o755 if member.mode & 0o111 else 0o644
                    fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
                    with os.fdopen(fd, "wb") as out:
                        for chunk in iter(lambda s=src: s.read(1 << 20), b""):  # type: ignore[misc]
                            out.write(chunk)
                        os.fchmod(fd, mode)
                    mtime = int(member.mtime)
                    os.utime(parts[-1], (mtime, mtime), dir_fd=parent, follow_symlinks=False)
            finally:
                for fd in reversed(opened):
                    os.close(fd)
    names = {n for n, _ in safefs.entries(rel_fd)} - {UNFINISHED}
    if "package.json" not in names and len(names) == 1:
        (top,) = names
        with contextlib.suppress(OSError, safefs.RefusedError), safefs.opened_dir(top, rel_fd) as inner:
            if "package.json" in {n for n, _ in safefs.entries(inner)}:
                for n, _ in safefs.entries(inner):
                    os.rename(n, n, src_dir_fd=inner, dst_dir_fd=rel_fd)
                os.rmdir(top, dir_fd=rel_fd)
    names = {n for n, _ in safefs.entries(rel_fd)}
    for required, why in (("package.json", ""), ("pnpm-lock.yaml", " (needed for --frozen-lockfile)")):
        if required not in names:
            raise ToolError(f"release {rid} has no {required}{why}")
    try:
        with safefs.opened_dir("dist", rel_fd) as dist:
            os.stat("index.js", dir_fd=dist, follow_symlinks=False)
    except (OSError, safefs.RefusedError):
        raise ToolError(f"release {rid} has no dist/index.js") from None


def build_dirs(srv: Server) -> tuple[proc.Account, dict[str, str]]:
    """The build account and its environment; its directories made (ROOT/cache/build: root's, with
    the npmrc; work/ the build account's alone, 0700)."""
    build = srv.cfg.build
    if build is None or build.uid in (0, srv.cfg.app.uid):
        raise ToolError(
            f"the build account '{srv.cfg.build_user}' does not exist (provisioning creates it: run pulumi up, or provision.sh)"
        )
    base = f"{srv.cfg.root}/cache/build"
    with srv.dir("cache") as cache:
        bfd = srv.root_dir(cache, "build", 0o755)
        try:
            safefs.write_atomic(bfd, "npmrc", NPMRC.encode(), 0o644) if _differs(bfd, "npmrc", NPMRC) else None
            wfd = safefs.ensure_dir(bfd, "work", 0o700, build.uid, build.gid)
            try:  # its temp files there too, not in /tmp, where any account can put names first
                os.close(safefs.ensure_dir(wfd, "tmp", 0o700, build.uid, build.gid, fix=False))
            finally:
                os.close(wfd)
        finally:
            os.close(bfd)
    return build, build_env(base, build.name, os.environ)


def build_env(base: str, name: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The build's whole environment: its own dirs, and of the caller's only PATH and the proxy
    (PROXY_VARIABLES), which a server reaching the registry through one sets in /etc/environment."""
    work = f"{base}/work"
    env = {
        "HOME": work,
        "USER": name,
        "LOGNAME": name,
        "PATH": environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "CI": "true",
        "NPM_CONFIG_USERCONFIG": f"{base}/npmrc",
        "XDG_CONFIG_HOME": f"{work}/config",
        "XDG_CACHE_HOME": f"{work}/cache",
        "XDG_DATA_HOME": f"{work}/data",
        "XDG_STATE_HOME": f"{work}/state",
        "TMPDIR": f"{work}/tmp",
    }
    return env | {key: environ[key] for key in PROXY_VARIABLES if key in environ}


def _differs(dir_fd: int, name: str, text: str) -> bool:
    try:
        data, st = safefs.read_file(dir_fd, name)
    except (OSError, safefs.RefusedError):
        return True
    return data != text.encode() or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o644


@contextlib.contextmanager
def build_lock(build: proc.Account) -> Iterator[None]:
    """An flock on /run/cognivern-release/build-<account>.lock: the builds of one account never
    overlap, also across ROOTs of one machine, because the end of one ends every process the
    account has. /run is root's, and so is the directory (0700): nobody else can hold the lock."""
    name = f"build-{build.name}.lock"
    with safefs.opened_dir("/run") as run:
        locks = safefs.ensure_dir(run, "cognivern-release", 0o700, 0, 0)
    try:
        while True:  # the holder removes the file when done: a lock on a removed file is no lock
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=locks)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(name, dir_fd=locks, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            os.unlink(name, dir_fd=locks)  # nothing left behind; whoever waits opens it again
            os.close(fd)
    finally:
        os.close(locks)


def dependencies(srv: Server, rid: str, rel_fd: int) -> None:
    build, env = build_dirs(srv)
    store = f"{srv.cfg.root}/cache/build/work/store"
    say(f"installing production dependencies (pnpm as {build.name}, store {store})")
    safefs.remove_tree(rel_fd, "node_modules")
    os.close(safefs.ensure_dir(rel_fd, "node_modules", 0o755, build.uid, build.gid))
    argv = [
        "pnpm",
        "install",
        "--prod",
        "--frozen-lockfile",
        "--prefer-offline",
        "--package-import-method=copy",
        "--store-dir",
        store,
        "--reporter=append-only",
    ]
    with build_lock(build):  # one build at a time for this account, whatever ROOT: all its processes end with it
        proc.end_all(build)  # anything a build killed with its tool (SIGKILL) left behind
        child = proc.popen(build, argv, env, cwd=f"{srv.cfg.root}/releases/{rid}", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert child.stdout is not None
            proc.relay(child.stdout, srv.masker())
            rc = child.wait()
        finally:
            proc.end_all(build)  # its install scripts may have left something running: nothing may outlive the build
    if rc != 0:
        raise ToolError(f"pnpm install failed for release {rid} (left unfinished; install it again to retry)")


def finish(srv: Server, rid: str, sha: str, source: str, rel_fd: int) -> None:
    """Links to shared/, sealed, recorded, complete."""
    for name, target in ((".env", "../../shared/.env"), ("data", "../../shared/data"), ("logs", "../../shared/logs")):
        safefs.symlink_atomic(rel_fd, name, target)
    if os.geteuid() == 0:
        safefs.seal(rel_fd)
    with srv.dir("shared") as shared:
        try:
            os.stat(".env", dir_fd=shared, follow_symlinks=False)
        except FileNotFoundError:
            say(f"warning: {srv.cfg.root}/shared/.env does not exist yet; the app will start without it")
    now = time.time()
    with srv.store.update() as st:
        st["releases"][rid] = {
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "installed_epoch": int(now),
            "sha256": sha,
            "source": source,
        }
    os.unlink(UNFINISHED, dir_fd=rel_fd)


def install(srv: Server, rid: str, source: str, sha: str) -> str:
    """The whole install (layout ensured, the install lock held); the action's result."""
    if complete(srv, rid):
        had = srv.store.read()["releases"].get(rid, {}).get("sha256")
        if had and had != sha:
            raise ToolError(
                f"release {rid} is already installed from a different artifact (sha256 {had}); build it under a new id", result="conflict"
            )
        say(f"release {rid} is already installed; nothing to do")
        return "noop"
    with srv.dir("releases") as releases:
        if exists(srv, rid):
            say(f"release {rid} was half installed; removing it and installing again")
            safefs.remove_tree(releases, rid)
        path, f = fetch(srv, source, rid)
        with f:
            verify(path, f, sha)
            os.mkdir(rid, 0o755, dir_fd=releases)
            with safefs.opened_dir(rid, releases) as rel_fd:
                os.close(os.open(UNFINISHED, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=rel_fd))
                unpack(srv, f, rid, rel_fd)
                dependencies(srv, rid, rel_fd)
                finish(srv, rid, sha, source, rel_fd)
    with srv.store.update() as st:
        st["releases"][rid].pop("bad", None)
    say(f"release {rid} installed")
    return "installed"


def reseal(srv: Server, rid: str) -> None:
    """A release with files another account could change (installed by an older version, when the
    app ran pnpm): copied into a new tree (root's, sealed) that replaces it, so no inode or open
    descriptor the app may still hold is part of the release any more."""
    say(f"release {rid} has files the app could change (installed by an older version); making it root's")
    tmp, old = f".seal-{rid}.{os.getpid()}", f".old-{rid}.{os.getpid()}"
    with srv.dir("releases") as releases:
        safefs.remove_tree(releases, tmp)
        os.mkdir(tmp, 0o700, dir_fd=releases)
        with safefs.opened_dir(tmp, releases) as new, safefs.opened_dir(rid, releases) as src:
            safefs.copy_tree(src, new)
            os.fchmod(new, 0o755)
        os.rename(rid, old, src_dir_fd=releases, dst_dir_fd=releases)
        os.rename(tmp, rid, src_dir_fd=releases, dst_dir_fd=releases)
        safefs.remove_tree(releases, old)


def sealed(srv: Server, rid: str) -> bool:
    if os.geteuid() != 0:
        return True
    with srv.dir(f"releases/{rid}") as fd:
        st = os.fstat(fd)
        return st.st_uid == 0 and not st.st_mode & 0o7022 and safefs.unsealed(fd) is None


def check_only(srv: Server, rid: str) -> str:
    """`install ID - -`: succeed when ID is complete here, else fail with the list."""
    if complete(srv, rid):
        say(f"release {rid} is installed")
        return "present"
    why = "is only half installed" if exists(srv, rid) else "is not installed"
    from .cli import complete_list_text

    raise ToolError(
        f"release {rid} {why} on this server. Complete releases here: {complete_list_text(srv)}.\n"
        "Build an artifact with scripts/build-artifact, then set cognivern:release to its id and provide it\n"
        "(cognivern:artifact = the tarball path, or cognivern:artifactUrl + cognivern:artifactSha256) and run pulumi up;\n"
        "or set cognivern:release to one of the releases listed above."
    )
