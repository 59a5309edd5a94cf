"""Small helpers every test host shares: ports, waiting with a deadline, test users' processes, PM2.

One copy of each (they were repeated in sshd.py, release_host.py, target_host.py and two test
modules). `DisposableHost` is the start/cleanup contract of TargetHost, NetnsHosts and ReleaseHost.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pwd
import random
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where test hosts put their ROOT: a directory of their own in /srv (root's, 0755 on Debian and
# Ubuntu), never in /tmp. The settings refuse a ROOT inside a sticky, world-writable directory and
# provisioning one below any directory that is not root's alone.
ROOT_BASE = Path("/srv")


def root_base(prefix: str) -> Path:
    """A fresh directory for a test host's ROOT (and its other files): root's, 0755, in ROOT_BASE.

    Each host removes its own in its cleanup; none is shared, so parallel workers never race on one.
    """
    if not ROOT_BASE.is_dir():
        raise RuntimeError(f"{ROOT_BASE} is missing: test hosts put their ROOT there (Debian's base-files creates it)")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT_BASE))
    base.chmod(0o755)  # mkdtemp's 0700 would keep the app user out of its releases
    return base


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every test's HTTP client. httpx builds a new one, loading the whole CA
    bundle, for each Client and each httpx.get (25 ms of CPU on an idle machine); the Load clients
    and the polling loops made hundreds per run, for loopback URLs that are mostly plain HTTP."""
    return httpx.create_ssl_context()


def http_client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(verify=tls_context(), **kwargs)


def http_get(url: str, **kwargs: Any) -> httpx.Response:
    """httpx.get with the shared TLS context (tls_context)."""
    return httpx.get(url, verify=tls_context(), **kwargs)


def http_post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, verify=tls_context(), **kwargs)


T = TypeVar("T")


def free_port() -> int:
    """A loopback TCP port that is free right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The slot pairs come from below the kernel's ephemeral range: a port from there (free_port, and the
# local end of every outgoing connection: load clients, nginx's upstream keep-alive, ssh) can be
# handed out again at any moment, and a green slot port (P+1) is idle for most of a module's life.
# Seen: a green slot crash-looping on EADDRINUSE while four workers ran. Between test processes, a
# pair is reserved by an flock held until the process exits.
PAIR_LOCKS = Path("/run/lock/cognivern-test-ports")
_held_pairs: list[int] = []  # lock file descriptors, kept open for the life of this process


def _pair_range() -> range:
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(max(10000, low - 12000), low - 1, 2) if low > 11002 else range(high + 1 + (high % 2), 65534, 2)


def free_port_pair() -> int:
    """A loopback port P such that P and P+1 are free (the blue and green slots), outside the
    ephemeral range and reserved against every other test process until this one exits."""
    PAIR_LOCKS.mkdir(parents=True, exist_ok=True)
    candidates = list(_pair_range())
    for port in random.sample(candidates, min(200, len(candidates))):
        if port_open(port) or port_open(port + 1):
            continue
        fd = os.open(PAIR_LOCKS / str(port), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_pairs.append(fd)
        return port
    raise RuntimeError("no free pair of loopback ports below the ephemeral range")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1", alive: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts TCP connections on host:port (fail early if `alive` exits)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"process exited with {alive.returncode} before listening on {host}:{port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.05)


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy (returned); connection errors count as
    "not yet". Fails after `timeout` seconds naming the last value or error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def user_pids(user: str) -> list[int]:
    """Processes running as `user` (a test-only account)."""
    out = subprocess.run(["ps", "-o", "pid=", "-u", user], capture_output=True, text=True, check=False).stdout
    return [int(x) for x in out.split()]


def end_user_processes(user: str, *, graceful: bool = True) -> None:
    """SIGTERM, then SIGKILL, every process of the test-only `user`, waiting up to 5 s after each
    (`graceful=False`: SIGKILL at once, for state that is thrown away anyway)."""
    for sig in (signal.SIGTERM, signal.SIGKILL) if graceful else (signal.SIGKILL,):
        pids = user_pids(user)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while user_pids(user) and time.monotonic() < deadline:
            time.sleep(0.1)


def run_pm2(
    user: str, home: Path, pm2_home: Path, *args: str, prefix: Sequence[str] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`pm2 ARGS` as `user` with its own HOME and PM2_HOME, in a clean environment, from `/`.

    From `/` because PM2 spawns its daemon in the caller's working directory: from one the user
    cannot enter (a clone under root's 0700 home) the spawn fails with EACCES and no daemon starts.
    `prefix` runs it inside something else (e.g. nsenter into a host's namespaces).
    """
    env = [f"HOME={home}", f"PM2_HOME={pm2_home}", f"PATH={SYSTEM_PATH}"]
    return subprocess.run(
        [*prefix, "runuser", "-u", user, "--", "env", "-i", *env, "pm2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )


class DisposableHost:
    """Start/cleanup contract of the test hosts: `with Host() as h:` or `h.start()` ... `h.cleanup()`.

    `start()` runs the subclass's `_start()`; if that fails, everything it started is cleaned up
    before the error propagates. `cleanup()` must be safe to call twice and after a partial start.
    """

    def _start(self) -> None:
        """Start the daemons (subclasses)."""

    def cleanup(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()


class UserCommandLines:
    """Every command line a `user`'s processes had while the block ran, from /proc.

        with UserCommandLines(app_user) as seen:
            ...activate a release...
        assert not [line for line in seen.lines if str(REPO) in line]

    Sampled every 50 ms, so a process that lives at least that long is seen (the tool's slot watcher
    lives for the whole health wait and bake).
    """

    def __init__(self, user: str) -> None:
        self.uid = pwd.getpwnam(user).pw_uid
        self.lines: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if proc.stat().st_uid != self.uid:
                    continue
                self.lines.add((proc / "cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace"))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
