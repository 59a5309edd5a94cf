"""Filesystem steps that a hostile app cannot redirect: every one through a directory descriptor.

A name is looked up once, relative to an open directory, with O_NOFOLLOW; what was opened is what
is changed (fchown/fchmod on that descriptor), and nothing is looked up again by path after a check.
That is the race `chmod -R` in coreutils < 9.5 loses (it checks an entry without following links,
then changes it through a call that follows them). Every function raises OSError on a failure;
`RefusedError` says a link or a wrong type stood where a directory or file belongs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class RefusedError(Exception):
    """A symbolic link (or something that is not a directory) where a directory belongs."""


def open_dir(name: str, dir_fd: int | None = None) -> int:
    """Open a directory without following a link at `name` (its last component)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        # Linux answers ENOTDIR, not ELOOP, for a link with O_DIRECTORY|O_NOFOLLOW: look at what is there
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = err.errno == errno.ELOOP
        if link:
            raise RefusedError(f"{name} is a symbolic link where a directory belongs; refusing to work through it") from None
        raise RefusedError(f"{name} exists but is not a directory") from None


@contextlib.contextmanager
def opened_dir(name: str, dir_fd: int | None = None) -> Iterator[int]:
    fd = open_dir(name, dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_dir(parent: int, name: str, mode: int, uid: int, gid: int, *, fix: bool = True) -> int:
    """`name` in `parent` as a directory: made with owner and mode when missing; when it exists,
    its owner and mode are set through the opened descriptor (`fix`). Returns its descriptor."""
    try:
        os.mkdir(name, mode, dir_fd=parent)
        created = True
    except FileExistsError:
        created = False
    fd = open_dir(name, parent)
    try:
        st = os.fstat(fd)
        if created or (fix and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (uid, gid, mode)):
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(dir_fd: int, name: str, limit: int = 1 << 20) -> tuple[bytes, os.stat_result]:
    """A regular file's content (at most `limit` bytes) and status, never through a link."""
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedError(f"{name} is not a regular file")
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, min(1 << 16, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def write_atomic(dir_fd: int, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    """Write `name` whole or not at all: a new file beside it, then renamed over it."""
    tmp = f".{name}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def symlink_atomic(dir_fd: int, name: str, target: str) -> None:
    """Point link `name` at `target` in one step (a new link renamed over the old one)."""
    tmp = f".{name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    os.symlink(target, tmp, dir_fd=dir_fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def entries(dir_fd: int) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of each entry; an entry gone meanwhile is left out."""
    out = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            try:
                out.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return out


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove `name` (a tree, a file or a link) in `dir_fd`; links are removed, never followed."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    try:
        fd = open_dir(name, dir_fd)
    except RefusedError:  # swapped for a link meanwhile: the link goes
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    try:
        for child, _ in entries(fd):
            remove_tree(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def tree_size(dir_fd: int) -> int:
    """Apparent size in bytes of everything under `dir_fd`, links not followed (like `du -sb`)."""
    total = os.fstat(dir_fd).st_size
    for name, st in entries(dir_fd):
        if stat.S_ISDIR(st.st_mode):
            try:
                with opened_dir(name, dir_fd) as fd:
                    total += tree_size(fd)
            except (RefusedError, OSError):
                continue
        else:
            total += st.st_size
    return total


# ---------------------------------------------------------------------------- the seal
def sealed_mode(mode: int) -> int:
    """u+rwX,go+rX,go-w without the setuid, setgid and sticky bits: 0755 or 0644 (0755 for a directory)."""
    if stat.S_ISDIR(mode) or mode & 0o111:
        return 0o755
    return 0o644


def seal(dir_fd: int, path: str = "") -> None:
    """Make the tree under `dir_fd` root's and read-only to everyone else.

    Each entry is opened (O_NOFOLLOW) and changed through that descriptor, so a link put where a
    file was is never followed; links themselves only get their owner changed (lchown). Fifos,
    sockets and devices have no place in a release and are removed. A file with a second hard link
    is removed and refused: artifacts carry none and pnpm copies (--package-import-method=copy), so
    it was linked in from elsewhere, and changing its inode would change that file too (where
    fs.protected_hardlinks is 0, any file the build account can name). Call it only while nobody
    but root can write there (a build account's processes ended, the app never had access).
    """
    os.fchown(dir_fd, 0, 0)
    os.fchmod(dir_fd, 0o755)
    for name, st in entries(dir_fd):
        if stat.S_ISLNK(st.st_mode):
            os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)
        elif stat.S_ISDIR(st.st_mode):
            with opened_dir(name, dir_fd) as fd:
                seal(fd, f"{path}{name}/")
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
            try:
                now = os.fstat(fd)
                if stat.S_ISREG(now.st_mode) and now.st_nlink > 1:
                    os.unlink(name, dir_fd=dir_fd)
                    raise RefusedError(
                        f"{path}{name} is a hard link to a file outside the release ({now.st_nlink} links); removed and refused"
                    )
                if stat.S_ISREG(now.st_mode):
                    os.fchown(fd, 0, 0)
                    os.fchmod(fd, sealed_mode(now.st_mode))
            finally:
                os.close(fd)
        else:
            os.unlink(name, dir_fd=dir_fd)


def unsealed(dir_fd: int) -> str | None:
    """The first entry (relative name) not sealed: not root's, writable by others, or setuid/setgid."""
    for name, st in entries(dir_fd):
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_uid != 0 or st.st_mode & 0o7022:
            return name
        if stat.S_ISDIR(st.st_mode):
            with opened_dir(name, dir_fd) as fd:
                inner = unsealed(fd)
            if inner is not None:
                return f"{name}/{inner}"
    return None


def copy_tree(src_fd: int, dst_fd: int) -> None:
    """Copy the tree under `src_fd` into the empty directory `dst_fd`: new inodes, root's, sealed modes.

    For a release another account could write (installed by an older version): a copy shares no
    inode and no open descriptor with what that account may still hold.
    """
    for name, st in entries(src_fd):
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
            os.chown(name, 0, 0, dir_fd=dst_fd, follow_symlinks=False)
        elif stat.S_ISDIR(st.st_mode):
            with opened_dir(name, src_fd) as sub:
                os.mkdir(name, 0o700, dir_fd=dst_fd)
                with opened_dir(name, dst_fd) as new:
                    copy_tree(sub, new)
                    os.fchmod(new, 0o755)
        elif stat.S_ISREG(st.st_mode):
            rfd = os.open(name, FILE_FLAGS, dir_fd=src_fd)
            try:
                mode = os.fstat(rfd).st_mode
                wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
                try:
                    while os.sendfile(wfd, rfd, None, 1 << 24):
                        pass
                    os.fchmod(wfd, sealed_mode(mode))
                finally:
                    os.close(wfd)
            finally:
                os.close(rfd)
