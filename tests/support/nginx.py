"""A private nginx in a temp prefix, for testing rendered sites and nginx-site.sh without /etc/nginx.

    with PrivateNginx() as nginx:                       # started: nginx -p P -c P/nginx.conf
        ...COGNIVERN_NGINX_* = nginx.env ...            # point host scripts at it
        httpx.get(nginx.url("/health"))                 # a site rendered to listen on nginx.port

The prefix holds its own nginx.conf (pid, error_log, access_log and every temp path inside the
prefix), `sites-available/` and `sites-enabled/` (included as `sites-enabled/*.conf` in http{}),
and a status server on `status_port` used to know when nginx is up. `port` is a second free
loopback port reserved for the site under test (render it with nginxListen ["127.0.0.1:<port>"]).
nginx runs as a daemon (as the real one does), so host scripts may reload or start it themselves;
`stop()` reads the pid file, sends `-s quit` and waits for the master to exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from components.render import render_upstream, upstream_include
from components.settings import Settings
from tests.support.helpers import free_port, wait_for_port

NGINX = "/usr/sbin/nginx"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


class PrivateNginx:
    """nginx with its own prefix; nothing outside the prefix is read or written.

    Attributes: prefix, conf_path, sites_available, sites_enabled, pid_path, error_log,
    access_log, status_port, port (free, for the site under test), env (COGNIVERN_NGINX_*).
    """

    def __init__(self, *, port: int | None = None, autostart: bool = True) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="cognivern-nginx-"))
        self.prefix.chmod(0o755)
        self.conf_path = self.prefix / "nginx.conf"
        self.sites_available = self.prefix / "sites-available"
        self.sites_enabled = self.prefix / "sites-enabled"
        self.pid_path = self.prefix / "nginx.pid"
        self.error_log = self.prefix / "error.log"
        self.access_log = self.prefix / "access.log"
        self.status_port = free_port()
        self.port = port or free_port()
        self.autostart = autostart
        for d in (self.sites_available, self.sites_enabled, self.prefix / "tmp"):
            d.mkdir()
        p = self.prefix
        self.conf_path.write_text(
            f"""# PrivateNginx (tests/support/nginx.py)
worker_processes 1;
pid {self.pid_path};
error_log {self.error_log} warn;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    access_log {self.access_log};
    client_body_temp_path {p}/tmp/client_body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.status_port};
        location = /__private_nginx {{ return 204; }}
    }}
    include sites-enabled/*.conf;
}}
"""
        )

    @property
    def env(self) -> dict[str, str]:
        """The overrides that make nginx-site.sh / provision.sh act on this nginx."""
        return {
            "COGNIVERN_NGINX_CONF": str(self.conf_path),
            "COGNIVERN_NGINX_PREFIX": str(self.prefix),
            "COGNIVERN_NGINX_SITES_AVAILABLE": str(self.sites_available),
            "COGNIVERN_NGINX_SITES_ENABLED": str(self.sites_enabled),
        }

    def write_upstream(self, s: Settings, live_port: int | None = None) -> Path:
        """The upstream file a site rendered for `s` includes (the blue slot on s.port unless told),
        as nginx-site.sh creates it on a real host."""
        path = self.prefix / upstream_include(s.app_name)
        path.write_text(render_upstream(s, s.port if live_port is None else live_port))
        return path

    def argv(self, *args: str) -> list[str]:
        return [NGINX, "-p", str(self.prefix), "-c", str(self.conf_path), *args]

    def test_config(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on this prefix (works whether or not nginx runs)."""
        return subprocess.run(self.argv("-t"), capture_output=True, text=True)

    def url(self, path: str = "/", port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.port}{path}"

    # ------------------------------------------------------------------ lifecycle
    @property
    def master_pid(self) -> int | None:
        """The running master's pid (from the pid file), or None."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def worker_pids(self) -> set[int]:
        """Current worker processes (children of the master): they change on every reload."""
        master = self.master_pid
        if master is None:
            return set()
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
        return {int(x) for x in out.split()}

    def start(self) -> PrivateNginx:
        if self.master_pid is not None:
            return self
        proc = subprocess.run(self.argv(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nginx failed to start: {proc.stderr.strip()}")
        wait_for_port(self.status_port)
        return self

    def reload(self) -> None:
        subprocess.run(self.argv("-s", "reload"), check=True, capture_output=True)

    def stop(self, *, keep_prefix: bool = False) -> None:
        """Graceful `-s quit`, then SIGTERM/SIGKILL the master if it lingers; remove the prefix."""
        pid = self.master_pid
        if pid is not None:
            subprocess.run(self.argv("-s", "quit"), capture_output=True)
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and _alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + 5
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not _alive(pid):
                    break
        if not keep_prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> PrivateNginx:
        if self.autostart:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
