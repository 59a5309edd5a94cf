"""Processes of other accounts (the app, the build) and what the tool prints from them.

Every child of another account starts in a session of its own (no controlling terminal: TIOCSTI
into the operator's terminal is impossible, and so is any other use of it), with stdin from
/dev/null, no supplementary groups, a clean environment, `/` as its working directory and no
descriptor of the tool but the pipes it is given. What it prints reaches the operator only through
`clean`: secret values masked, control characters other than newline and tab removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any, NamedTuple


class Account(NamedTuple):
    name: str
    uid: int
    gid: int
    home: str


class HostEdges:
    """The edges of the activation machine that are this host itself (its clock, /proc): the same
    for the tool's Server and for anything else that drives the machine against a real daemon."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def cwd(self, pid: int) -> str | None:
        try:
            return os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None


def iso_now(clock: Callable[[], float] = time.time) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))


def popen(
    account: Account | None, argv: Sequence[str], env: Mapping[str, str], *, cwd: str = "/", **kwargs: Any
) -> subprocess.Popen[bytes]:
    """Start `argv` as `account` (None: root, still in a new session) with exactly `env`."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    if account is not None and account.uid != os.geteuid():
        kwargs.update(user=account.uid, group=account.gid, extra_groups=[])
    return subprocess.Popen(list(argv), env=dict(env), cwd=cwd, start_new_session=True, close_fds=True, umask=0o022, **kwargs)


def run(
    account: Account | None, argv: Sequence[str], env: Mapping[str, str], *, timeout: float | None = None, **kwargs: Any
) -> tuple[int, bytes]:
    """Run to the end; (exit status, stdout and stderr together)."""
    proc = popen(account, argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, out


def uid_pids(uid: int) -> list[int]:
    """Processes whose real uid is `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(name))
                        break
        except OSError:
            continue
    return pids


def end_all(account: Account, rounds: int = 50) -> None:
    """End every process of `account` (a dedicated account: the build): a child of that account
    sends SIGKILL to all of them at once (kill(-1), during which no process can fork), until none
    is left. Raises RuntimeError if some survive."""
    for _ in range(rounds):
        if not uid_pids(account.uid):
            return
        pid = os.fork()
        if pid == 0:  # the child: become the account, kill all of its processes, exit
            try:
                os.setgroups([])
                os.setgid(account.gid)
                os.setuid(account.uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.02)
    if uid_pids(account.uid):
        raise RuntimeError(f"processes of {account.name} are still running: {uid_pids(account.uid)}")


# ---------------------------------------------------------------------------- what reaches the operator
# Every C0 control but tab and newline, DEL and the C1 controls (an 8-bit CSI is 0x9b): without
# ESC or CSI no escape sequence is one any more, whatever text of it is left.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Masker:
    """Replaces every secret value (longest first, so one inside another goes whole) by ***;
    `withheld` says the values are unknown, and then nothing from the app is printed at all."""

    def __init__(self, values: Iterable[str] = (), withheld: str | None = None) -> None:
        self.values = sorted({v for v in values if v}, key=len, reverse=True)
        self.withheld = withheld

    def __call__(self, text: str) -> str:
        text = _CONTROLS.sub("", text)
        for value in self.values:
            text = text.replace(value, "***")
        return text


def decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def relay(stream: IO[bytes], masker: Masker, out: IO[str] | None = None, prefix: str = "") -> None:
    """Copy what a child prints to `out` (stderr by default), line by line, cleaned."""
    target = out if out is not None else sys.stderr
    if masker.withheld is not None:
        for _ in iter(lambda: stream.read(1 << 16), b""):
            pass
        target.write(masker.withheld + "\n")
        target.flush()
        return
    for line in iter(stream.readline, b""):
        target.write(prefix + masker(decode(line)).rstrip("\n") + "\n")
        target.flush()
