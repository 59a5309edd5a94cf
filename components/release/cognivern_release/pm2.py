"""Asking the app's PM2 daemon, over its RPC socket, in this process.

PM2's CLI and daemon talk axon RPC over $PM2_HOME/rpc.sock: each message is an amp frame (a byte
with version 1 and the argument count, then each argument as a 4-byte big-endian length and its
bytes, `j:` + JSON or `s:` + text). A call is [j:{"type":"call","method":M,"args":[...]}, s:ID];
the answer is [j:{"args":[result]} or j:{"error":...}, s:ID] (pm2-axon, pm2-axon-rpc, amp-message
in PM2 7.0.4). `pm2 jlist` sends getMonitorData, `pm2 delete NAME` deleteProcessId per process.
This replaces the Node helper (cognivern-pm2.cjs) and its node start per question
(bench/pm2_calls.py: ~3 ms of CPU here against ~0.1 s).

The socket is the app's: it is opened as a path (O_PATH, O_NOFOLLOW, in a PM2_HOME opened the same
way) and used only when it is a socket owned by the app user, so a link planted there never makes
root connect elsewhere. Whatever the daemon answers is the app's: parsed as data, bounded in size.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import time
from typing import Any

from .proc import Account

MAX_FRAME = 64 << 20


class Pm2Error(Exception):
    """No usable answer (no daemon, a busy one, or one that answers nonsense)."""


class NoDaemonError(Pm2Error):
    """Nothing listens on the socket: no daemon, so no app runs."""


def _frame(args: list[bytes]) -> bytes:
    out = bytearray([1 << 4 | len(args)])
    for arg in args:
        out += struct.pack(">I", len(arg)) + arg
    return bytes(out)


class Rpc:
    """One connection to the daemon of `home` (the app's PM2_HOME); calls time out after `timeout` s."""

    def __init__(self, home: str, owner: Account, timeout: float = 3.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.ids = 0
        try:
            path_fd = _socket_fd(home, owner)
            try:
                self.sock.connect(f"/proc/self/fd/{path_fd}")
            finally:
                os.close(path_fd)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as err:
            self.sock.close()
            raise NoDaemonError(str(err)) from None
        except OSError as err:
            self.sock.close()
            raise Pm2Error(str(err)) from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        self.ids += 1
        msg_id = f"cognivern-release:{os.getpid()}:{self.ids}"
        request = json.dumps({"type": "call", "method": method, "args": list(args)})
        self.sock.settimeout(timeout or self.timeout)
        try:
            self.sock.sendall(_frame([b"j:" + request.encode(), b"s:" + msg_id.encode()]))
            while True:
                parts = self._read_frame()
                if parts and parts[-1] == b"s:" + msg_id.encode():
                    break
        except (OSError, ValueError) as err:
            raise Pm2Error(f"PM2 gave no readable answer ({err})") from None
        if not parts[0].startswith(b"j:"):
            raise Pm2Error("PM2 gave no readable answer")
        try:
            answer = json.loads(parts[0][2:])
        except ValueError:
            raise Pm2Error("PM2 gave no readable answer") from None
        if not isinstance(answer, dict) or "error" in answer or not isinstance(answer.get("args"), list):
            raise Pm2Error(f"PM2 answered an error: {str(answer)[:200]}")
        return answer["args"][0] if answer["args"] else None

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ValueError("the connection closed")
            self.buf += chunk

    def _read_frame(self) -> list[bytes]:
        self._need(1)
        argc, off, parts = self.buf[0] & 0xF, 1, []
        for _ in range(argc):
            self._need(off + 4)
            (size,) = struct.unpack(">I", self.buf[off : off + 4])
            if size > MAX_FRAME:
                raise ValueError("an answer too large")
            off += 4
            self._need(off + size)
            parts.append(self.buf[off : off + size])
            off += size
        self.buf = self.buf[off:]
        return parts


def _socket_fd(home: str, owner: Account) -> int:
    """An O_PATH descriptor of `home`/rpc.sock, checked: a socket of `owner`, reached through no link."""
    home_fd = os.open(home, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open("rpc.sock", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=home_fd)
    finally:
        os.close(home_fd)
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != owner.uid:
        os.close(fd)
        raise FileNotFoundError(f"{home}/rpc.sock is not a socket of {owner.name}")
    return fd


def processes(rpc: Rpc) -> list[dict[str, Any]]:
    """PM2's process list (what `pm2 jlist` prints); Pm2Error when it is not one."""
    answer = rpc.call("getMonitorData", {})
    if not isinstance(answer, list) or not all(isinstance(p, dict) for p in answer):
        raise Pm2Error("PM2 gave no readable answer")
    return answer


def env_of(p: dict[str, Any]) -> dict[str, Any]:
    env = p.get("pm2_env")
    return env if isinstance(env, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def restarts_of(plist: list[dict[str, Any]], name: str) -> tuple[int, int, int]:
    """(restarts summed, processes errored or stopped, processes) of app `name`."""
    mine = [p for p in plist if p.get("name") == name]
    return (
        sum(_int(env_of(p).get("restart_time")) for p in mine),
        sum(1 for p in mine if env_of(p).get("status") in ("errored", "stopped")),
        len(mine),
    )


def online_pids(plist: list[dict[str, Any]], name: str) -> list[int]:
    return [_int(p.get("pid")) for p in plist if p.get("name") == name and env_of(p).get("status") == "online" and _int(p.get("pid"))]


def status_lines(plist: list[dict[str, Any]]) -> list[str]:
    if not plist:
        return ["  (no processes)"]
    return [
        f"  {p.get('name')} #{p.get('pm_id')} pid={p.get('pid')} {env_of(p).get('status')}"
        f" restarts={env_of(p).get('restart_time')} mode={env_of(p).get('exec_mode')}"
        for p in plist
    ]


class Daemon:
    """The app's PM2 daemon as the tool sees it: queries and deletes over RPC, one connection kept."""

    def __init__(self, home: str, owner: Account) -> None:
        self.home = home
        self.owner = owner
        self._rpc: Rpc | None = None

    def _connection(self, timeout: float = 3.0) -> Rpc:
        if self._rpc is None:
            self._rpc = Rpc(self.home, self.owner, timeout)
        return self._rpc

    def reset(self) -> None:
        if self._rpc is not None:
            self._rpc.close()
            self._rpc = None

    def list(self) -> list[dict[str, Any]] | None:
        """The process list; [] with no daemon; None when no readable answer came within 3 s."""
        for _ in range(2):  # a connection kept from before may be to a daemon replaced since: once more
            fresh = self._rpc is None
            try:
                return processes(self._connection())
            except NoDaemonError:
                self.reset()
                return []
            except Pm2Error:
                self.reset()
                if fresh:
                    return None
        return None

    def delete(self, name: str, timeout: float = 60.0) -> int | None:
        """Stop and forget app `name` (what `pm2 delete NAME` sends); how many processes it had, 0
        with no daemon, None when PM2 did not do it (the caller then uses PM2's CLI)."""
        try:
            rpc = self._connection()
            ids = [p.get("pm_id") for p in processes(rpc) if p.get("name") == name]
            for pm_id in ids:
                rpc.call("deleteProcessId", pm_id, timeout=timeout)
            return len(ids)
        except NoDaemonError:
            self.reset()
            return 0
        except Pm2Error:
            self.reset()
            return None

    def close(self) -> None:
        self.reset()


def wait_for(check: Any, seconds: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def god_pids(pm2_home: str) -> list[int]:
    """The God daemon(s) of this PM2_HOME: processes titled "PM2 vX: God Daemon" with PM2_HOME in
    their environment, plus the one pm2.pid names (PM2 writes that once and removes it on exit, so
    it goes stale after a SIGKILL)."""
    want = f"PM2_HOME={pm2_home}".encode()
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if not _is_god(f.read()):
                    continue
            with open(f"/proc/{name}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    found.add(int(name))
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(f"{pm2_home}/pm2.pid", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            pid = int(f.read(32).strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if _is_god(f.read()) and os.access(f"/proc/{pid}/environ", os.R_OK):
                found.add(pid)
    return sorted(found)


def _is_god(cmdline: bytes) -> bool:
    return cmdline.startswith(b"PM2 v") and b": God Daemon" in cmdline.split(b"\0")[0]


def round_robin_daemons(pm2_home: str) -> list[int]:
    """Daemons started without NODE_CLUSTER_SCHED_POLICY=none (see apps.start)."""
    out = []
    for pid in god_pids(pm2_home):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
            if b"NODE_CLUSTER_SCHED_POLICY=none" not in f.read().split(b"\0"):
                out.append(pid)
    return out
