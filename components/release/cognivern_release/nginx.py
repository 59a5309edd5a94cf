"""Point nginx's upstream at a slot: write the file (facts.upstream_text), `nginx -t`, graceful reload.

A failing test or reload puts the previous file back and reloads nothing, so the old upstream keeps
serving. No upstream file configured: nothing to do (the slot's port is it).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import subprocess
from typing import TYPE_CHECKING

from . import facts, safefs
from .server import ToolError, say

if TYPE_CHECKING:
    from .server import Server


def _run(argv: list[str]) -> tuple[bool, str]:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def reload(srv: Server) -> tuple[bool, str]:
    if not srv.cfg.nginx_prefix and os.path.isdir("/run/systemd/system"):
        return _run(["systemctl", "reload", "nginx"])
    return _run(["nginx", *srv.cfg.nginx_args(), "-s", "reload"])


def switch(srv: Server, live_port: int, backup_port: int | None) -> bool:
    """`backup_port`: the slot switched away from while it runs (None: none runs). The file lists the
    other slot either way (facts.upstream_text); this only words the message."""
    path = srv.cfg.nginx_upstream
    if not path:
        return True
    directory, name = posixpath.split(path)
    with safefs.opened_dir(directory) as dfd:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise ToolError(f"{path} is a symbolic link; refusing to write through it")
        previous = safefs.read_file(dfd, name)[0] if st is not None and stat.S_ISREG(st.st_mode) else None
        safefs.write_atomic(dfd, name, facts.upstream_text(srv.cfg.upstream_name, srv.cfg.port, live_port).encode(), 0o644)
        ok, out = _run(["nginx", *srv.cfg.nginx_args(), "-t"])
        if ok:
            ok, out = reload(srv)
        if ok:
            say(f"nginx: upstream 127.0.0.1:{live_port}" + (f" (backup 127.0.0.1:{backup_port})" if backup_port else "") + ", reloaded")
            return True
        if previous is not None:
            safefs.write_atomic(dfd, name, previous, 0o644)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)
    for line in out.splitlines():
        say_raw(f"  nginx: {line}")
    say(f"error: nginx refused the new upstream (nginx -t or reload failed): {path} is restored and the old upstream is still serving")
    return False


def say_raw(line: str) -> None:
    import sys

    sys.stderr.write(line + "\n")
