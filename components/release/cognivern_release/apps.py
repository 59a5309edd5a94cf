"""Start or reload the app's PM2 apps from the ecosystem file (what shared/run.sh did, in bash).

The environment comes from shared/.env parsed as data (root's copy; no shell sources it) and goes
to `pm2 startOrReload --update-env` in its environment, with COGNIVERN_ENV_KEYS naming the
variables: the ecosystem file names them in each app's `env`, which is what makes PM2 7 hand their
*current* values to the app (it otherwise keeps those of the app's first start). A full start (at
boot the resurrected dump does this; here `reload`) also drops PM2 apps that the ecosystem no
longer lists (the agent after agentsEnabled=false, a slot the state empties, the single app of a
host from before the blue/green slots) and saves PM2's list.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING

from . import pm2, safefs
from .server import ToolError, say

if TYPE_CHECKING:
    from .server import Server


def remove_log_links(srv: Server) -> None:
    """PM2 opens its log files by name: a link planted at one would make every worker fail to
    start. Removed through the directory's descriptor (an unlink never follows a link)."""
    removed = []
    with srv.dir("shared/logs") as logs:
        for name, st in safefs.entries(logs):
            if name.endswith(".log") and stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=logs)
                removed.append(f"{srv.cfg.root}/shared/logs/{name}")
    if removed:
        say(f"warning: removed links planted at the app's log files: {' '.join(removed)}")


def ensure_daemon(srv: Server) -> None:
    """PM2's daemon is the cluster primary. With Node's default round-robin it accepts connections
    and hands them to workers over IPC; during a reload it can hand one to a worker that is exiting,
    and that request hangs until the client gives up (measured: 5 stalls in 16 reloads under load;
    none in 46 with NODE_CLUSTER_SCHED_POLICY=none). A daemon without it is replaced once. The
    daemon is started here, before the app's environment is given to PM2: one spawned by
    startOrReload would inherit the app's variables, secrets included."""
    home = srv.cfg.pm2_home
    if pm2.round_robin_daemons(home):
        say("restarting the PM2 daemon once so that it uses NODE_CLUSTER_SCHED_POLICY=none")
        srv.daemon.reset()
        srv.pm2_cli("update")
        left = pm2.round_robin_daemons(home)
        if left:
            raise ToolError(
                f"PM2 daemon(s) {' '.join(map(str, left))} for {home} still run without NODE_CLUSTER_SCHED_POLICY=none after"
                " pm2 update; stop them (pm2 kill as the app user) and run again"
            )
    if not pm2.god_pids(home) or not os.path.exists(f"{home}/rpc.sock"):
        srv.daemon.reset()
        srv.pm2_cli("ping")


def start(srv: Server, only: str | None) -> bool:
    """`pm2 startOrReload` of the ecosystem (`only`: just those apps); False when PM2 failed."""
    root = srv.cfg.root
    if only is None and srv.current() is None:
        say(f"{root}/current does not exist yet; nothing to start")
        return True
    remove_log_links(srv)
    ensure_daemon(srv)
    env = srv.env_values(trusted=False)  # the app's own environment: whoever wrote the file
    if env is None:
        say(f"warning: {root}/shared/.env does not exist; the apps start without its variables")
        env = {}
    extra = {**env, "COGNIVERN_ENV_KEYS": " ".join(env)}
    ecosystem = f"{root}/config/ecosystem.config.cjs"
    argv = ["startOrReload", ecosystem, *(["--only", only] if only else []), "--update-env"]
    ok = srv.pm2_cli(*argv, extra=extra)
    srv.daemon.reset()
    if not ok or only:
        # one app started on purpose (a slot, the agent): the activation saves PM2's list once it settles
        return ok
    rc, out = srv.as_app(["node", "-e", "for (const a of require(process.argv[1]).apps) console.log(a.name)", ecosystem])
    if rc != 0:
        srv.show(out)
        return False
    wanted = set(out.decode().split())
    for name in sorted({str(p.get("name")) for p in srv.pm2_list() or []} - wanted):
        srv.delete_app(name)
    srv.pm2_save()
    return True


def stop(srv: Server) -> None:
    """Stop (not delete) the apps the ecosystem lists."""
    srv.pm2_cli("stop", f"{srv.cfg.root}/config/ecosystem.config.cjs")
