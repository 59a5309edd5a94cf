"""The three holes of issue 23, reproduced: each test fails on the bash tool and passes on the Python one.

1. The seal race. The bash tool sealed a release with `chown -R` then `chmod -R` while the app
   owned node_modules: a directory the app created in the middle of chown's walk stayed the app's,
   and `chmod -R` (coreutils < 9.5) checks an entry without following links, then changes it through
   a call that does follow them. Made certain here with pause points: `chown` and `chmod` on the
   tool's PATH are the real ones under strace, stopped (SIGSTOP injected) right after the walk has
   listed the app's directory (chown) and right after it has checked the app's file (chmod); the app
   acts, the test lets them go on. The app swaps its own mode-04755 file for a link to a root
   executable, and the seal makes that executable setuid root. The Python tool never runs chown or
   chmod (the pause points are never reached), and the app can write nothing there to begin with:
   it tries all the time the install runs.
2. TIOCSTI. An app-user child that keeps the operator's terminal can push keystrokes into the root
   shell. `cognivern-release reload` runs in a real root bash on a pty, with code in shared/.env that
   pushes `id > pwned`: the bash tool's run.sh sourced .env as the app, in root's session. And the
   app-user child of `logs -f` (its `tail`) is checked to have no controlling terminal and a session
   of its own, whatever the kernel's dev.tty.legacy_tiocsti.
3. The old release planting code into the next one. The running app writes ~/.npmrc (a global
   pnpmfile: code pnpm runs), poisons cache/pnpm-store, and tries to write into the new release's
   node_modules while it is installed: the bash tool ran pnpm as the app, in the app's HOME, with the
   app's store. With a build account of its own nothing of that reaches the new release.
Run as root: venv/bin/pytest tests/test_release_safety.py
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.hardened_host import HardenedHost, hardened_host
from tests.support.release_host import build_release_tarball
from tests.support.target_host import SYSTEM_PATH

pytestmark = pytest.mark.needs_root("it provisions a host, runs the tool as root and acts as the app")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedHost]:
    assert shutil.which("strace"), "strace makes the seal race certain (apt install strace)"
    with hardened_host(tmp_path_factory.mktemp("safety")) as h:
        assert h.install("r1").returncode == 0
        h.ok("activate", "r1")
        yield h


def tool_env(host: HardenedHost) -> dict[str, str]:
    return {"PATH": f"{host.target.bin_dir}:{SYSTEM_PATH}", "LANG": "C.UTF-8"}


def start_install(host: HardenedHost, rid: str, tmp: Path) -> subprocess.Popen[str]:
    """`cognivern-release install` of the fixture app as `rid`, in the background (as HardenedHost.tool runs it)."""
    tarball, sha = build_release_tarball(tmp / "artifacts", rid)
    dest = host.root / "incoming" / tarball.name
    shutil.copy(tarball, dest)
    argv = [str(host.target.bin_dir / "cognivern-release"), "--root", str(host.root), "install", rid, str(dest), sha]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tool_env(host), cwd="/")


def as_app(host: HardenedHost, script: str, *args: str) -> bool:
    """`sh -c script` as the app user; whether it succeeded."""
    return host.as_app("sh", "-c", script, "sh", *args, check=False).returncode == 0


def hammer(until: Callable[[], bool], attempt: Callable[[], None]) -> list[int]:
    """Call `attempt` every 20 ms until `until()`; how many times it ran."""
    count = [0]
    while not until():
        attempt()
        count[0] += 1
        time.sleep(0.02)
    return count


# ---------------------------------------------------------------------------- 1. the seal race
WRAPPER = """#!/bin/bash
# Test wrapper (tests/test_release_safety.py): `{cmd} -R` on a release of this host runs the real {cmd}
# under strace, stopped (SIGSTOP) at a pause point the test waits for; anything else runs as it is.
case " $* " in
    *" -R "*" {releases}/"*) exec strace -f -qq -o /dev/null -P "$PAUSE_DIR" -e trace={syscall} \\
        -e inject={syscall}:signal=SIGSTOP:when={when} /bin/{cmd} "$@" ;;
esac
exec /bin/{cmd} "$@"
"""


def stopped(cmd: str, rid: str, host: HardenedHost) -> int | None:
    """The pid of a `cmd -R` on releases/`rid` stopped at its pause point (ptrace stop), if any."""
    want = f"{host.root}/releases/{rid}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            ours = argv[0] == f"/bin/{cmd}".encode() and b"-R" in argv and argv[-2] == want
            if ours and Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("t", "T"):
                return int(name)
    return None


def test_the_seal_gives_the_app_no_race_to_win(host: HardenedHost, tmp_path: Path) -> None:
    rid = "seal-race"
    release = host.root / "releases" / rid
    pnpm_dir = release / "node_modules" / ".pnpm"  # the app's own while the bash tool's pnpm ran
    evil, victim = pnpm_dir / "evil", pnpm_dir / "evil" / "tool"
    target_dir = tmp_path / "usr-bin"  # stands for /usr/bin: root's, and the file a root executable
    target_dir.mkdir()
    target = target_dir / "python3"
    shutil.copy("/usr/bin/true", target)
    target.chmod(0o755)
    wrappers = {"chown": ("fchownat", 1, pnpm_dir), "chmod": ("newfstatat", 2, evil)}
    for cmd, (syscall, when, pause) in wrappers.items():
        text = WRAPPER.format(cmd=cmd, syscall=syscall, when=when, releases=host.root / "releases").replace("$PAUSE_DIR", str(pause))
        (host.target.bin_dir / cmd).write_text(text)
        (host.target.bin_dir / cmd).chmod(0o755)
    acted: list[str] = []

    def attempt() -> None:
        # chown -R has listed node_modules/.pnpm: a directory made now is never visited, stays the app's
        pid = stopped("chown", rid, host)
        if pid is not None:
            as_app(host, 'mkdir -m 0755 "$1" && : > "$2" && chmod 04755 "$2"', str(evil), str(victim))
            acted.append("chown")
            os.kill(pid, signal.SIGCONT)
        # chmod -R has checked the app's file (a regular file, 04755): it becomes a link to the target
        pid = stopped("chmod", rid, host)
        if pid is not None:
            as_app(host, 'ln -s "$1" "$2.new" && mv -fT "$2.new" "$2"', str(target), str(victim))
            acted.append("chmod")
            os.kill(pid, signal.SIGCONT)
        # and at any moment: what the app can try directly (beside the scripted race, not in its way)
        if as_app(host, 'mkdir -p "$1" 2>/dev/null && : > "$1/f"', str(pnpm_dir / "direct")):
            acted.append("wrote")

    try:
        install = start_install(host, rid, tmp_path)
        hammer(lambda: install.poll() is not None, attempt)
        out = install.communicate()[0]
        attempt()  # once more, after the install: the sealed release
    finally:
        for cmd in wrappers:
            (host.target.bin_dir / cmd).unlink()
    mode = target.stat().st_mode
    target.chmod(0o755)  # whatever happened, no setuid-root copy of `true` stays behind
    assert install.returncode == 0, out
    assert not mode & stat.S_ISUID and target.stat().st_uid == 0, f"the seal made {target} setuid root ({oct(mode)}); app acted at {acted}"
    assert acted == [], "the app could write into the release at some point"
    assert [p for p in [release, *release.rglob("*")] if p.lstat().st_uid != 0] == []


# ---------------------------------------------------------------------------- 2. TIOCSTI
PAYLOAD = "PWN=$(python3 -c 'import fcntl, termios\nfor c in b\"id > {pwned}\\n\": fcntl.ioctl(0, termios.TIOCSTI, bytes([c]))')\n"


class Terminal:
    """A root bash on a pty, as an operator's shell: typed lines in, what it shows out."""

    def __init__(self, env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a session leader with the pty as its controlling terminal
            os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], {**env, "PS1": "operator# ", "TERM": "dumb"})  # noqa: S606
        self.output = ""

    def read(self, until: str, timeout: float) -> str:
        """What it showed, once the regex `until` matches it (or `timeout` passed)."""
        deadline = time.monotonic() + timeout
        while not re.search(until, self.output) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:
                    break
        return self.output

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_code_in_the_env_file_cannot_type_into_the_operators_root_shell(host: HardenedHost, tmp_path: Path) -> None:
    """`cognivern-release reload` typed into a root bash on a pty. shared/.env holds a line that, run
    by a shell as the app in root's session, pushes `id > pwned` into that terminal, which the root
    shell then runs. No shell may source .env, and no app child may hold the operator's terminal."""
    pwned = tmp_path / "pwned"
    env_file = host.root / "shared" / ".env"
    saved = env_file.read_bytes()
    env_file.write_text(saved.decode() + PAYLOAD.format(pwned=pwned))
    term = Terminal({**tool_env(host), "HOME": str(tmp_path)})
    try:
        term.read("operator# ", 10)
        term.type(f"cognivern-release --root {host.root} reload; echo reload-exit-$?")
        shown = term.read(r"reload-exit-\d", 120)
        term.read(r"reload-exit-\d+\r?\n.*operator# ", 10)
        time.sleep(1)  # an injected line would be read and run by bash now
        term.type("echo shell-done")
        shown = term.read(r"\nshell-done", 10)
    finally:
        term.close()
        env_file.write_bytes(saved)
    assert "reload-exit-0" in shown, shown
    assert not pwned.exists(), f"the app typed into root's shell: {pwned.read_text() if pwned.exists() else ''}"


def test_app_children_have_no_controlling_terminal_and_a_session_of_their_own(host: HardenedHost, tmp_path: Path) -> None:
    """`logs -f` run from a terminal: its child as the app (tail) is checked from /proc, so this holds
    whether or not the kernel still allows TIOCSTI (dev.tty.legacy_tiocsti)."""
    pid, fd = pty.fork()
    if pid == 0:
        argv = [str(host.target.bin_dir / "cognivern-release"), "--root", str(host.root), "logs", "-f", "-n", "1"]
        os.execve(argv[0], argv, tool_env(host))  # noqa: S606
    try:
        uid = int(host.as_app("id", "-u").stdout)

        def app_child() -> list[int]:
            found = []
            for name in os.listdir("/proc"):
                with contextlib.suppress(OSError):
                    if (
                        name.isdigit()
                        and Path(f"/proc/{name}/status").read_text().count(f"Uid:\t{uid}\t")
                        and b"tail" in Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")[0]
                    ):
                        found.append(int(name))
            return found

        deadline = time.monotonic() + 20
        while not app_child() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                select.select([fd], [], [], 0.1)[0] and os.read(fd, 65536)
        children = app_child()
        assert children, "logs -f runs tail as the app user"
        tool_session = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
        for child in children:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            session, tty_nr = int(fields[3]), int(fields[4])
            assert tty_nr == 0, f"the app's {child} has the operator's terminal as its controlling terminal"
            assert session not in (tool_session, pid), "the app's child shares the operator's session"
            assert os.path.realpath(f"/proc/{child}/fd/0") == "/dev/null"
    finally:
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.05)
        with contextlib.suppress(OSError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


# ---------------------------------------------------------------------------- 3. the old release plants into the next one
MARK = "PLANTED-BY-THE-OLD-RELEASE"
HOOK = """// the app's global pnpmfile: pnpm runs this code, as whoever runs pnpm
const fs = require('fs'), path = require('path');
fs.writeFileSync(process.env.HOOK_RAN || '{ran}', 'ran as ' + process.getuid());
process.on('exit', () => {{
  for (const dir of ['node_modules', 'node_modules/.pnpm']) {{
    try {{ fs.writeFileSync(path.join(process.cwd(), dir, 'planted.js'), '// {mark}\\n'); }} catch (e) {{}}
  }}
  try {{
    const ms = fs.realpathSync(path.join(process.cwd(), 'node_modules/ms/index.js'));
    fs.appendFileSync(ms, '\\n// {mark}\\n');
  }} catch (e) {{}}
}});
module.exports = {{ hooks: {{}} }};
"""


POISON = """
import os, sys
store, mark = sys.argv[1], sys.argv[2]
for dirpath, _, files in os.walk(store):
    for name in files:
        path = os.path.join(dirpath, name)
        if name.endswith("-index.json") or os.path.islink(path):
            continue
        with open(path, "rb") as f:
            if f.read(1) == b"{":  # a package.json: kept valid, so pnpm goes on to copy the code files
                continue
        st = os.stat(path)
        os.chmod(path, st.st_mode | 0o200)
        with open(path, "a") as f:
            f.write("\\n// " + mark + "\\n")
        os.chmod(path, st.st_mode)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
"""


def test_the_running_app_cannot_plant_code_into_the_next_release(host: HardenedHost, tmp_path: Path) -> None:
    rid = "planted"
    home = Path(f"/home/{host.user}")
    ran = home / "hook-ran"
    store = host.root / "cache" / "pnpm-store"
    host.as_app("sh", "-c", 'printf "%s" "$2" > "$1"', "sh", str(home / "hook.cjs"), HOOK.format(ran=ran, mark=MARK))
    host.as_app("sh", "-c", 'printf "global-pnpmfile=%s\\n" "$2" > "$1"', "sh", str(home / ".npmrc"), str(home / "hook.cjs"))
    # whatever the app's store holds, every file of it carries the mark (mtimes kept, so pnpm's check sees no change)
    poisoned = host.as_app("python3", "-c", POISON, str(store), MARK, check=False)
    assert poisoned.returncode == 0, poisoned.stderr
    release = host.root / "releases" / rid

    def attempt() -> None:  # the running app, all through the install: straight into the new node_modules
        as_app(
            host,
            'for d in "$1" "$1/.pnpm"; do echo "// $2" > "$d/planted-live.js"; done 2>/dev/null; true',
            str(release / "node_modules"),
            MARK,
        )

    try:
        install = start_install(host, rid, tmp_path)
        hammer(lambda: install.poll() is not None, attempt)
        out = install.communicate()[0]
    finally:
        for p in (home / ".npmrc", home / "hook.cjs"):
            p.unlink(missing_ok=True)
    assert install.returncode == 0, out
    planted = [
        str(p.relative_to(release))
        for p in release.rglob("*")
        if p.is_file() and not p.is_symlink() and MARK in p.read_text(errors="replace")
    ]
    assert planted == [], f"the old release planted code into the new one: {planted}"
    assert not ran.exists(), f"pnpm ran the app's code: {ran.read_text() if ran.exists() else ''}"
    assert re.search(r"^\s*\+ ms 2\.1\.3$", out, re.MULTILINE), "the dependency was installed"
