"""A private OpenSSH server on a loopback port, for running the program's commands over real SSH.

    with LocalSshd(set_env={"COGNIVERN_BIN_DIR": "/tmp/x/bin"}) as sshd:
        result = sshd.run(script_command(PROVISION, [...]))

Everything lives in one temp dir: host key, client key, `authorized_keys`, `known_hosts`, the
server config and the `sshd_config.d/` drop-in directory that the config includes at its top
(like Debian's and Ubuntu's), so a host script pointed at `config_path` (COGNIVERN_SSHD_CONFIG)
writes its drop-in where this sshd reads it. `set_env` becomes a server-side `SetEnv` line, so
commands run exactly as the program sends them and still see the test overrides ("{config}",
"{pidfile}" and "{dir}" in a value stand for this daemon's own paths). The client
checks the host key strictly against the `known_hosts` written here (no TOFU).

The system sshd and /etc/ssh are never touched. /run/sshd (sshd's privilege separation
directory, required to start) is created if missing and left in place: other tests' daemons may
be using it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.support.helpers import free_port, wait_for_port

SSHD = "/usr/sbin/sshd"
__all__ = ["SSHD", "LocalSshd", "free_port", "wait_for_port"]  # free_port, wait_for_port: moved to helpers
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_VALUE = re.compile(r"^[A-Za-z0-9_./:,@+=-]*$")
# ssh's own failures (exit 255) that mean "try again": the daemon re-executing after SIGHUP.
_TRANSIENT = ("Connection refused", "kex_exchange_identification")


def _to_bytes(data: bytes | str | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


class LocalSshd:
    """A throwaway sshd (`/usr/sbin/sshd -D -e -f <tmp>/sshd_config`) on 127.0.0.1.

    Attributes once constructed (the daemon starts on `start()` / `with`):
      dir               temp directory holding everything below (removed on stop)
      port              loopback port
      config_path       the server config (point COGNIVERN_SSHD_CONFIG here)
      dropin_dir        `<dir>/sshd_config.d`, included at the top of the config
      pidfile           `PidFile` of the daemon (point COGNIVERN_SSHD_PIDFILE here)
      host_key          public host key line ("ssh-ed25519 AAAA...")
      private_key_path  client private key (ed25519, no passphrase); `private_key` is its text
      public_key        client public key line (in `authorized_keys`)
      known_hosts_path  known_hosts with `[127.0.0.1]:port <host_key>`
      log_path          the daemon's stderr (`-e`): read it when a connection fails
      user              login user for `run()` (default root)
      set_env           the server-side SetEnv variables (placeholders resolved)
      reexec_delay      seconds the daemon takes to come back after a SIGHUP (default 0): it runs
                        through a wrapper (`<dir>/sshd`) that sleeps before re-executing sshd, so
                        the window in which a reload refuses connections is wide, not a race
    """

    def __init__(
        self,
        *,
        set_env: Mapping[str, str] | None = None,
        user: str = "root",
        port: int | None = None,
        extra_config: Sequence[str] = (),
        reexec_delay: float = 0,
    ) -> None:
        self.user = user
        self.reexec_delay = reexec_delay
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cognivern-sshd-"))
        self.dir.chmod(0o755)  # sshd reads authorized_keys as the login user
        self.config_path = self.dir / "sshd_config"
        self.dropin_dir = self.dir / "sshd_config.d"
        self.pidfile = self.dir / "sshd.pid"
        own = {"config": str(self.config_path), "pidfile": str(self.pidfile), "dir": str(self.dir)}
        env = {name: value.format(**own) for name, value in (set_env or {}).items()}
        for name, value in env.items():
            if not _ENV_NAME.match(name) or not _ENV_VALUE.match(value):
                shutil.rmtree(self.dir, ignore_errors=True)
                raise ValueError(f"SetEnv {name}={value!r}: names [A-Za-z0-9_], values without spaces or quotes")
        self.set_env = env
        self.log_path = self.dir / "sshd.log"
        self.known_hosts_path = self.dir / "known_hosts"
        self.private_key_path = self.dir / "id_ed25519"
        host_key_path = self.dir / "ssh_host_ed25519_key"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object | None = None

        self.dropin_dir.mkdir()
        for path, comment in ((host_key_path, "cognivern-test-host"), (self.private_key_path, "cognivern-test-client")):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
        self.host_key = " ".join(host_key_path.with_suffix(".pub").read_text().split()[:2])
        self.public_key = self.private_key_path.with_suffix(".pub").read_text().strip()
        self.private_key = self.private_key_path.read_text()
        (self.dir / "authorized_keys").write_text(self.public_key + "\n")
        (self.dir / "authorized_keys").chmod(0o644)
        self.known_hosts_path.write_text(f"[127.0.0.1]:{self.port} {self.host_key}\n")

        lines = [
            "# LocalSshd (tests/support/sshd.py): drop-ins first, as on Debian/Ubuntu (first value wins).",
            f"Include {self.dropin_dir}/*.conf",
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key_path}",
            f"PidFile {self.pidfile}",
            f"AuthorizedKeysFile {self.dir}/authorized_keys",
            "StrictModes no",
            "UsePAM no",
            "UseDNS no",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "LogLevel VERBOSE",
            "Subsystem sftp /usr/lib/openssh/sftp-server",
        ]
        if env:
            lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()))
        lines += list(extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalSshd:
        if self._proc is not None:
            return self
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        check = subprocess.run([SSHD, "-t", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t: {check.stderr.strip()}")
        log = self.log_path.open("ab")
        self._log = log
        self._proc = subprocess.Popen(self.daemon_argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, host=self.listen_address, alive=self._proc)
        except Exception:
            self.stop()
            raise
        return self

    @property
    def listen_address(self) -> str:
        return "127.0.0.1"

    def daemon_argv(self) -> list[str]:
        """The daemon in the foreground (-D) logging to stderr (-e); the Popen pid is the sshd's."""
        return [self._binary(), "-D", "-e", "-f", str(self.config_path)]

    def _binary(self) -> str:
        """sshd, or with `reexec_delay` a wrapper it re-executes on SIGHUP (sshd execs its argv[0])."""
        if not self.reexec_delay:
            return SSHD
        wrapper, started = self.dir / "sshd", self.dir / "sshd.started"
        wrapper.write_text(
            "#!/bin/bash\n# sshd, slow to come back after a SIGHUP (not for -R, a connection's re-exec)\n"
            f'if [ -e {started} ] && [[ " $* " != *" -R "* ]]; then sleep {self.reexec_delay}; fi\n'
            f'touch {started}\nexec -a "$0" {SSHD} "$@"\n'
        )
        wrapper.chmod(0o755)
        return str(wrapper)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def reload(self) -> None:
        """SIGHUP: sshd re-executes itself (same pid) with the current config."""
        if self._proc is None:
            raise RuntimeError("sshd is not running")
        self._proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        wait_for_port(self.port, alive=self._proc)

    def stop(self, *, keep_dir: bool = False) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and remove the temp dir."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            self._proc = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalSshd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ client
    def ssh_argv(self, command: str | None = None, *, user: str | None = None, options: Sequence[str] = ()) -> list[str]:
        """The OpenSSH client argv for `command` (a string run by the login shell, as pulumi-command does)."""
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(self.private_key_path),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts_path}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "KexAlgorithms=curve25519-sha256",  # OpenSSH's default sntrup761x25519: 0.1 s of CPU a connection, 0.015 s
            *options,
            f"{user or self.user}@127.0.0.1",
        ]
        if command is not None:
            argv += ["--", command]
        return argv

    def run(
        self,
        command: str,
        stdin: bytes | str | None = None,
        *,
        timeout: float = 600,
        check: bool = False,
        user: str | None = None,
        retries: int = 20,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` over SSH with `stdin` as its input; stdout/stderr decoded as UTF-8 text.

        Retries only ssh's own connection failures (exit 255 with a connect/kex error on stderr,
        e.g. while the daemon re-executes after a reload), never a command that ran.
        """
        data = _to_bytes(stdin) if stdin is not None else b""
        for attempt in range(retries + 1):
            proc = subprocess.run(self.ssh_argv(command, user=user), input=data, capture_output=True, timeout=timeout)
            err = proc.stderr.decode(errors="replace")
            if proc.returncode == 255 and attempt < retries and any(t in err for t in _TRANSIENT):
                time.sleep(0.1 * (attempt + 1))
                continue
            break
        result = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"), err)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
        return result

    def popen(self, command: str, *, user: str | None = None) -> subprocess.Popen[bytes]:
        """Start `command` over SSH with pipes for stdin/stdout/stderr (for slow or streamed input)."""
        return subprocess.Popen(self.ssh_argv(command, user=user), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def auth_methods(self, user: str | None = None) -> set[str]:
        """The authentication methods the server currently offers (parsed from 'Permission denied (...)')."""
        argv = self.ssh_argv("true", user=user, options=["-o", "PreferredAuthentications=none", "-o", "NumberOfPasswordPrompts=0"])
        argv[argv.index("LogLevel=ERROR")] = "LogLevel=INFO"
        for _ in range(20):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={**os.environ, "SSH_AUTH_SOCK": ""})
            found = re.search(r"Permission denied \(([^)]*)\)", proc.stderr)
            if found:
                return set(found.group(1).split(","))
            time.sleep(0.1)
        raise RuntimeError(f"could not read the offered auth methods: {proc.stderr.strip()}")

    def effective_config(self) -> dict[str, str]:
        """`sshd -T -f config`: the effective server settings (lowercase keyword -> value)."""
        out = subprocess.run([SSHD, "-T", "-f", str(self.config_path)], capture_output=True, text=True, check=True).stdout
        settings: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            settings.setdefault(key, value)
        return settings
