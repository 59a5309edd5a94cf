"""cognivern-release's command line: the commands operators and the program run (usage below).

Each command imports the modules it needs itself: `activate`, which only starts its worker and
streams what it prints, stays a small process beside the worker that does the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from . import facts, proc, safefs
from .config import ConfigError
from .config import load as load_config
from .server import PROG, Server, ToolError, check_members, flock, health_check, invoking_user, say

USAGE = """\
Usage: cognivern-release [--root DIR] COMMAND [ARGS]

Installs and switches releases of the Cognivern backend under ROOT (--root, else
$COGNIVERN_ROOT, else /opt/cognivern). Settings come from ROOT/config/cognivern.conf
(APP_USER, APP_NAME, PORT, HEALTH_PATH, HEALTH_TIMEOUT, KEEP_RELEASES, DATA_BACKUPS_KEEP,
BAKE_SECONDS, KEEP_PREVIOUS_WARM, AGENT_APPS, NGINX_CONF, NGINX_PREFIX, NGINX_UPSTREAM,
UPSTREAM_NAME, SECRET_KEYS, BUILD_USER, optional PM2_HOME), read as data. Run as root; node
and pm2 run as APP_USER, pnpm as BUILD_USER, each in a session of its own (no terminal).

Commands:
  install ID SOURCE SHA256   Verify SOURCE (a tarball path or an https:// URL) against SHA256,
                             unpack it into releases/ID, install prod dependencies with pnpm
                             as BUILD_USER (its own store and HOME in ROOT/cache/build), link
                             .env, data, logs, and seal it (root's, read-only to the app).
                             Installing a complete release again does nothing.
  install ID - -             Only check that ID is installed (fails with the list of releases).
  activate [--force] ID      Back up shared/data, start ID in the idle slot (APP_NAME-blue on
                             PORT or APP_NAME-green on PORT+1; when that slot already runs ID
                             healthy, a warm rollback, nothing starts), wait until it is healthy,
                             switch nginx's upstream (the old slot as backup) and ROOT/current
                             to it, then bake BAKE_SECONDS (health, PM2 restarts). After the bake
                             the agent moves to ID and the old slot stops (kept running when
                             KEEP_PREVIOUS_WARM=true). A release that does not start healthy is
                             refused with nothing switched; one failing its bake is switched
                             back to the still-warm old slot. Either way ID is marked bad and
                             the command fails. --force activates a release marked bad.
                             The work runs detached from the caller (activate-worker, in a
                             session of its own, output in .deploy/runs/); activate streams it and
                             returns its status, and an SSH drop does not stop it. A worker that
                             is killed leaves its journal in the state: the next command that takes
                             the deploy lock settles it first (a slot still starting is stopped; an
                             interrupted bake goes back to the still-warm old slot; a revert or
                             finish is done again).
  deploy ID SOURCE SHA256    What `pulumi up` runs on a server for a release, in one command:
                             install (SOURCE `-`: ID must be installed), activate ID, prune
                             (keeping the last --keep given), then `list --json` on stdout.
                             Stops at the first step that fails, with its exit status.
  prune [--keep N]           Remove old releases, keeping the newest N (N >= 2) plus current and
                             previous; removes abandoned unfinished ones. N is remembered in the
                             state: a prune without --keep (and deploy's) keeps the last N given
                             (before any: KEEP_RELEASES, default 5).
  list [--json]              Releases newest first: id, install time, size, state
                             (current, previous, bad, unfinished, installed).
  status                     Current and previous release, what each slot runs and which is
                             live, the agent's release, PM2 processes, the live slot's health.
  backup                     Archive shared/data into ROOT/backups/data (read by the app user, so
                             while the app writes; a file changed while read is kept as read,
                             with a warning); prints the path.
  restore BACKUP             Stop the app, back up shared/data, replace it from BACKUP (a path
                             or a file name in ROOT/backups/data; links must stay inside data/),
                             start the app again (also when the restore fails) and check health.
  reload                     Start or reload the apps the ecosystem lists with shared/.env (after
                             .env or ecosystem changes: the live slot, the warm one if kept, the
                             agent) and check the live slot's health.
  logs [-f] [--err] [-n N]   The app's PM2 logs (shared/logs/out.log, error.log), read as the
                             app user, secrets masked.

Emergency rollback by hand:   cognivern-release list; cognivern-release activate <older-id>
State lives in ROOT/config/state.json (root's, world-readable; JSON: the release of each slot,
the live slot, the agent's, previous, release metadata and why a release is marked bad, the
journal of an activation under way) and ROOT/.deploy: lock (+ who holds it), releases.log (one
line per action), runs/ (the output of each activation).
Anything printed from the app has its secret values masked and control characters removed.
Progress goes to stderr; `list --json` and `backup` print their result on stdout.
Exit status: 0 success, 1 failure, 2 usage error, 3 another deploy holds the lock.
"""

READ_ONLY = ("list", "status", "logs")
COMMANDS = ("install", "activate", "activate-worker", "deploy", "prune", "backup", "restore", "reload", *READ_ONLY)
ACTIONS = {
    "install": "install",
    "prune": "prune",
    "backup": "backup",
    "restore": "restore",
    "reload": "reload",
    "activate-worker": "activate",
}


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so each step's clean-up runs."""


def usage_error(msg: str) -> ToolError:
    say(msg)
    say(f"see: {PROG} --help")
    return ToolError(None, code=2)


def valid_id(rid: str) -> str:
    if not facts.RELEASE_ID_RE.match(rid):
        raise usage_error(f"invalid release id '{rid}': 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return rid


class Action:
    """What releases.log records for this run (one line per action)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.rid = "-"
        self.sha = "-"
        self.result: str | None = None
        self.cleanups: list[Callable[[], None]] = []


# ---------------------------------------------------------------------------- reading the releases
def release_ids(srv: Server) -> list[str]:
    try:
        with srv.dir("releases") as rel:
            return [n for n, st in safefs.entries(rel) if stat.S_ISDIR(st.st_mode) and facts.RELEASE_ID_RE.match(n)]
    except (OSError, safefs.RefusedError):
        return []


def installed_epoch(srv: Server, rid: str, meta: dict[str, Any]) -> int:
    if isinstance(meta.get("installed_epoch"), int):
        return int(meta["installed_epoch"])
    with contextlib.suppress(OSError), srv.dir("releases") as rel:
        return int(os.stat(rid, dir_fd=rel, follow_symlinks=False).st_mtime)
    return 0


def complete_releases(srv: Server) -> list[str]:
    """Newest first."""
    from . import install as inst

    metas = srv.store.read()["releases"]
    rows = [(installed_epoch(srv, rid, metas.get(rid, {})), rid) for rid in release_ids(srv) if inst.complete(srv, rid)]
    return [rid for _, rid in sorted(rows, reverse=True)]


def complete_list_text(srv: Server) -> str:
    return ", ".join(complete_releases(srv)) or "none"


# ---------------------------------------------------------------------------- locks
def activation_span(srv: Server) -> float:
    """The longest an activation holds the deploy lock: its health wait, its bake, stopping a slot."""
    return float(srv.cfg.health_timeout + srv.cfg.bake_seconds + 120)


def lock_holder(fd: int) -> str:
    """The holder's line (`pid=... user=... action=... id=... since=...`), as it wrote it."""
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "(holder is just starting)"


def take_deploy_lock(srv: Server, act: Action, action: str, rid: str, wait: float) -> None:
    """The deploy lock (activate, restore, prune, reload, backup); then settle an interrupted activation.
    `wait`: seconds to wait for another holder (0: refuse at once, naming it)."""
    from . import activation

    with srv.dir(".deploy") as deploy:
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=deploy)
    if not flock(fd, 0):
        holder = lock_holder(fd)
        # The same activation asked for again: its deploy lost the connection (or `pulumi up` was
        # killed) while the detached worker went on. Waiting for that worker, then answering as
        # usual (already current, or the release's verdict), is what makes the re-run converge.
        if action == "activate" and f" action=activate id={rid} " in f" {holder} ":
            say(f"the activation of {rid} is already under way ({holder}); waiting for it to finish")
            wait = activation_span(srv)
        elif wait > 0:
            say(f"the deploy lock is held ({holder}); waiting up to {wait:.0f} s for it")
    if not flock(fd, wait):
        holder = lock_holder(fd)
        os.close(fd)
        act.result = "locked"
        say(f"error: another deploy is in progress: {holder}")
        say("wait for it to finish (or check that pid is still alive) and try again")
        raise ToolError(None, code=3)
    holder = f"pid={os.getpid()} user={invoking_user()} action={action} id={rid} since={proc.iso_now()}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    srv.deploy_lock_fd = fd  # held until the process ends
    with srv.store.update():
        pass  # the text state of an older version becomes state.json now: the ecosystem file reads only that
    activation.Machine(srv.cfg, srv.store, srv).recover()


# ---------------------------------------------------------------------------- commands
def cmd_install(srv: Server, act: Action, args: list[str]) -> None:
    from . import install as inst

    if len(args) != 3:
        raise usage_error("usage: install ID SOURCE SHA256 (or: install ID - -)")
    rid, source, sha = valid_id(args[0]), args[1], args[2]
    act.rid = rid
    if source == "-":
        if sha != "-":
            raise usage_error("install ID - - takes no checksum without a source")
        act.result = inst.check_only(srv, rid)
        return
    sha = sha.lower()
    if not facts.SHA256_RE.match(sha):
        raise usage_error(f"SHA256 must be 64 hex characters, got '{sha}'")
    act.sha = sha
    srv.ensure_layout()
    with srv.dir(".deploy/locks") as locks:
        fd = os.open(f"install-{rid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=locks)
    if not flock(fd, 0):
        act.result = "locked"
        raise ToolError(f"release {rid} is being installed by another process right now")
    try:
        act.result = inst.install(srv, rid, source, sha)
    except ToolError as err:
        act.result = act.result or err.result
        raise
    finally:
        os.close(fd)


def parse_activate(args: list[str]) -> tuple[str, bool]:
    rid, force = "", False
    for arg in args:
        if arg == "--force":
            force = True
        elif arg.startswith("-"):
            raise usage_error(f"activate: unknown option {arg}")
        elif rid:
            raise usage_error("usage: activate [--force] ID")
        else:
            rid = arg
    if not rid:
        raise usage_error("usage: activate [--force] ID")
    return valid_id(rid), force


def cmd_activate(srv: Server, act: Action, args: list[str]) -> int:
    """Start the worker detached (a session of its own, output in .deploy/runs/), stream its
    output, return its status. Stopping this command on purpose (SIGTERM, Ctrl-C) stops the
    activation the same way; a hang-up or a dead pipe (the SSH session gone) does not reach the
    worker: it finishes on its own."""
    rid, _ = parse_activate(args)
    srv.ensure_layout()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
    with srv.dir(".deploy/runs") as runs:
        log = os.open(f"{stamp}-{rid}.log", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=runs)
        reader = os.open(f"{stamp}-{rid}.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=runs)
    argv = [sys.executable, "-I", sys.argv[0], "--root", srv.cfg.root, "activate-worker", *args]
    worker = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    os.close(log)

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    printing = True
    while True:
        done = worker.poll() is not None
        chunk = os.read(reader, 1 << 16)
        while chunk:
            if printing:
                try:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                except (BrokenPipeError, OSError):
                    printing = False
            chunk = os.read(reader, 1 << 16)
        if done:
            break
        time.sleep(0.1)
    os.close(reader)
    with srv.dir(".deploy/runs") as runs:
        logs = sorted((n for n, _ in safefs.entries(runs) if n.endswith(".log")), reverse=True)
        for old in logs[50:]:
            os.unlink(old, dir_fd=runs)
    rc = worker.returncode if worker.returncode >= 0 else 128 - worker.returncode
    if rc >= 128:
        say(f"error: the activation worker (pid {worker.pid}) was killed; the next deploy or reload finishes or reverts it")
    return rc


def cmd_deploy(srv: Server, act: Action, args: list[str]) -> int:
    """install, activate, prune, `list --json`: a release's whole deploy in one SSH command (one
    session instead of three sequential ones). Each step is the command of that name, with its own
    line in releases.log and its own clean-ups; the first that fails ends the deploy with its status."""
    if len(args) != 3:
        raise usage_error("usage: deploy ID SOURCE SHA256 (or: deploy ID - -)")
    rid = valid_id(args[0])
    for cmd, argv in (("install", list(args)), ("activate", [rid]), ("prune", []), ("list", ["--json"])):
        rc = execute(Server(srv.cfg, srv.root_fd), cmd, argv)
        if rc:
            return rc
    return 0


def cmd_activate_worker(srv: Server, act: Action, args: list[str]) -> None:
    from . import activation

    rid, force = parse_activate(args)
    act.rid = rid
    act.sha = srv.store.read()["releases"].get(rid, {}).get("sha256", "-")
    srv.ensure_layout()
    take_deploy_lock(srv, act, "activate", rid, 0)
    activation_checks(srv, act, rid, force)
    try:
        act.result = activation.Machine(srv.cfg, srv.store, srv).activate(rid, force, os.getpid())
    except activation.ActivationError as err:
        act.result = err.result
        raise ToolError(err.message) from None


def activation_checks(srv: Server, act: Action, rid: str, force: bool) -> None:
    """Refuse a missing, unfinished or bad release; seal one an older version left writable."""
    from . import install as inst

    if not inst.exists(srv, rid):
        act.result = "missing"
        raise ToolError(f"release {rid} is not installed; installed releases: {complete_list_text(srv)}")
    if not inst.complete(srv, rid):
        act.result = "unfinished"
        raise ToolError(f"release {rid} is unfinished (install it again)")
    bad = srv.store.read()["releases"].get(rid, {}).get("bad")
    if bad and not force:
        act.result = "refused-bad"
        raise ToolError(
            f"release {rid} is marked bad ({bad['reason']}); deploy a fixed build under a new id, or use activate --force {rid}"
        )
    if not inst.sealed(srv, rid):
        inst.reseal(srv, rid)


def cmd_prune(srv: Server, act: Action, args: list[str]) -> None:
    """`--keep N` is remembered in the state: a prune without it keeps the last N given (before any,
    KEEP_RELEASES), so deploy's prune follows the stack's keepReleases without naming it."""
    from . import install as inst

    keep: str | None = None
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--keep":
            if not rest:
                raise usage_error("prune: --keep needs a number")
            keep = rest.pop(0)
        elif arg.startswith("--keep="):
            keep = arg.removeprefix("--keep=")
        else:
            raise usage_error("usage: prune [--keep N]")
    if keep is not None and (not (keep.isascii() and keep.isdigit()) or int(keep) < facts.MIN_KEEP_RELEASES):
        raise usage_error(f"prune: --keep must be a whole number >= {facts.MIN_KEEP_RELEASES}, got '{keep}'")
    srv.ensure_layout()
    # Housekeeping after whatever holds the lock: the deploy of a killed `pulumi up` goes on on the
    # server, and the re-run's deploy reaches its prune while that one prunes.
    take_deploy_lock(srv, act, "prune", "-", activation_span(srv))
    if keep is None:
        remembered = srv.store.read()["keep_releases"]
        keep = str(remembered if remembered is not None else srv.cfg.keep_releases)
    else:
        with srv.store.update() as st:
            if st["keep_releases"] != int(keep):
                say(f"keeping {keep} releases from now on (prune --keep {keep})")
            st["keep_releases"] = int(keep)
    cur, prev = srv.current(), srv.store.read()["previous"]
    removed = 0
    for n, rid in enumerate(complete_releases(srv), start=1):
        if n <= int(keep) or rid in (cur, prev):
            continue
        say(f"removing release {rid}")
        _remove_release(srv, rid)
        removed += 1
    for rid in release_ids(srv):
        if inst.complete(srv, rid):
            continue
        with srv.dir(".deploy/locks") as locks:
            fd = os.open(f"install-{rid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=locks)
        try:
            if flock(fd, 0):
                if inst.exists(srv, rid) and not inst.complete(srv, rid):
                    say(f"removing abandoned unfinished release {rid}")
                    _remove_release(srv, rid)
                    removed += 1
            else:
                say(f"keeping {rid}: it is being installed right now")
        finally:
            os.close(fd)
    act.result = f"removed={removed}"
    say(f"prune: removed {removed} release(s); kept the newest {keep} plus current ({cur or 'none'}) and previous ({prev or 'none'})")


def _remove_release(srv: Server, rid: str) -> None:
    with srv.dir("releases") as rel:
        safefs.remove_tree(rel, rid)
    with srv.store.update() as st:
        st["releases"].pop(rid, None)
    with srv.dir(".deploy/locks") as locks, contextlib.suppress(FileNotFoundError):
        os.unlink(f"install-{rid}.lock", dir_fd=locks)
    with contextlib.suppress(OSError), srv.dir("incoming") as incoming:
        os.unlink(f"cognivern-{rid}.tar.gz", dir_fd=incoming)


def cmd_list(srv: Server, act: Action, args: list[str]) -> None:
    from . import install as inst

    if args not in ([], ["--json"]):
        raise usage_error("usage: list [--json]")
    state = srv.store.read()
    cur, prev = srv.current(), state["previous"]
    rows = []
    for rid in release_ids(srv):
        meta = state["releases"].get(rid, {})
        if not inst.complete(srv, rid):
            kind = "unfinished"
        elif rid == cur:
            kind = "current"
        elif rid == prev:
            kind = "previous"
        elif meta.get("bad"):
            kind = "bad"
        else:
            kind = "installed"
        try:
            with srv.dir(f"releases/{rid}") as fd:
                size = safefs.tree_size(fd)
        except (OSError, safefs.RefusedError):
            size = 0
        rows.append((installed_epoch(srv, rid, meta), rid, size, kind))
    rows.sort(reverse=True)
    if prev not in release_ids(srv):
        prev = None

    def iso(epoch: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))

    if args == ["--json"]:
        listing = {
            "current": cur,
            "previous": prev,
            "releases": [{"id": rid, "installed_at": iso(e), "size_bytes": size, "state": kind} for e, rid, size, kind in rows],
        }
        print(json.dumps(listing))
    else:
        print(f"{'ID':<40} {'INSTALLED_AT':<20} {'SIZE':>12}  STATE")
        for e, rid, size, kind in rows:
            print(f"{rid:<40} {iso(e):<20} {size:>12}  {kind}")


def cmd_status(srv: Server, act: Action, args: list[str]) -> None:
    from . import activation

    if args:
        raise usage_error("usage: status")
    state = srv.store.read()
    cur, slots, cfg = srv.current(), state["slots"], srv.cfg
    print(f"root:     {cfg.root}\ncurrent:  {cur or 'none'}\nprevious: {state['previous'] or 'none'}")
    for slot in facts.SLOTS:
        live = " (live: nginx serves it)" if slot == slots["live"] else ""
        print(f"{slot + ':':<9} {slots[slot] or '(stopped)'} on 127.0.0.1:{cfg.slot_port(slot)}{live}")
    print(f"agent:    {slots['agent'] or 'none'}")
    print(f"pm2 (PM2_HOME {cfg.pm2_home}):")
    plist = srv.pm2_list()
    from . import pm2

    print("\n".join(pm2.status_lines(plist)) if plist is not None else "  (pm2 not answering)")
    url = cfg.slot_url(slots["live"])
    answered, body = health_check(url, timeout=3)
    masker = srv.masker()
    shown = masker.withheld or masker(body)
    if answered or body.lstrip().startswith(("{", "<")):
        print(f"health:   {url} -> {shown[:300]}")
    else:
        print(f"health:   {url} -> no answer ({shown[:200]})")
    machine = activation.Machine(cfg, srv.store, srv)
    if cur and machine.served_by(slots["live"], cur):
        print(f"workers:  all on {cur}")


def cmd_backup(srv: Server, act: Action, args: list[str]) -> None:
    if args:
        raise usage_error("usage: backup")
    srv.ensure_layout()
    take_deploy_lock(srv, act, "backup", "-", srv.cfg.health_timeout * 4)
    path = srv.backup("manual")
    act.result = f"ok:{posixpath.basename(path)}"
    say("backed up shared/data")
    print(path)


def cmd_restore(srv: Server, act: Action, args: list[str]) -> None:
    from . import (
        activation,
        apps,
    )

    root = srv.cfg.root
    if len(args) != 1:
        raise usage_error(f"usage: restore BACKUP (a path, or a file name in {root}/backups/data)")
    backup = args[0] if "/" in args[0] else f"{root}/backups/data/{args[0]}"
    if not os.path.isfile(backup):
        raise ToolError(f"backup {backup} does not exist")
    act.rid = re.sub(r"[^A-Za-z0-9._:-]", "_", posixpath.basename(backup))
    srv.ensure_layout()
    take_deploy_lock(srv, act, "restore", posixpath.basename(backup), 0)
    with open(backup, "rb") as f:
        check_members(backup, f, r"^(\./)?data(/|$)", also="lh")
    # The app stops first, so the safety backup is the data as it was left, not a moving target;
    # from here on a failure starts it again.
    cur = srv.current()
    if cur:
        say("stopping the app")
        apps.stop(srv)
        act.cleanups.append(lambda: _start_again(srv))
    safety = srv.backup("before-restore")
    say(f"current shared/data saved to {safety}")
    with srv.dir("shared") as shared:
        stage = posixpath.basename(tempfile.mkdtemp(prefix=".restore.", dir=f"{root}/shared"))
        try:
            with safefs.opened_dir(stage, shared) as sfd:
                os.fchmod(sfd, 0o755)
                srv.app_dir(sfd, "data", f"{root}/shared/{stage}/data", srv.cfg.app)
                with open(backup, "rb") as f:
                    child = proc.popen(
                        srv.cfg.app,
                        ["tar", "-xzf", "-", "-C", f"{root}/shared/{stage}", "--no-same-owner", "--no-same-permissions"],
                        srv.app_env(),
                        stdin=f,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                    )
                    out, _ = child.communicate()
                if child.returncode != 0:
                    srv.show(out, indent="  ")
                    raise ToolError(f"could not unpack {backup}; shared/data is unchanged")
                with safefs.opened_dir("data", sfd) as dfd:
                    bad = leaving_links(dfd, f"{root}/shared/data")
                if bad:
                    raise ToolError(f"the backup holds links that leave data/ (refused, shared/data is unchanged): {'; '.join(bad)}")
                os.rename("data", "old-data", src_dir_fd=shared, dst_dir_fd=sfd)
                os.rename("data", "data", src_dir_fd=sfd, dst_dir_fd=shared)
        finally:
            safefs.remove_tree(shared, stage)
    say(f"restored shared/data from {backup}")
    if cur:
        if srv.start_apps(""):
            act.cleanups.clear()
        if not activation.Machine(srv.cfg, srv.store, srv).wait_healthy(cur):
            srv.error_log()
            raise ToolError(f"the app is not healthy after the restore; the data from before is in {safety}")
        say(f"app is healthy on {cur}")
    act.result = "restored"


def _start_again(srv: Server) -> None:
    say("starting the app again")
    if not srv.start_apps(""):
        say(f"warning: the app did not start again; check: {PROG} status")


def leaving_links(data_fd: int, live_data: str, rel: str = "") -> list[str]:
    """Links in a restored data/ must stay inside data/ (as the app's own links do). Only names are
    compared: nothing is followed. `live_data`: where data/ will be (an absolute target into it is fine)."""
    bad = []
    for name, st in safefs.entries(data_fd):
        path = f"{rel}{name}"
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=data_fd)
            if target == live_data or target.startswith(live_data + "/"):
                resolved = "/data" + target[len(live_data) :]
            elif target.startswith("/"):
                resolved = "/"
            else:
                resolved = posixpath.normpath(posixpath.join("/data", posixpath.dirname(path), target))
            if resolved != "/data" and not resolved.startswith("/data/"):
                bad.append(f"{path} -> {target}")
        elif stat.S_ISDIR(st.st_mode):
            with safefs.opened_dir(name, data_fd) as sub:
                bad += leaving_links(sub, live_data, f"{path}/")
    return bad


def cmd_reload(srv: Server, act: Action, args: list[str]) -> None:
    from . import activation

    if args:
        raise usage_error("usage: reload")
    srv.ensure_layout()
    take_deploy_lock(srv, act, "reload", "-", srv.cfg.health_timeout * 4)
    cur = srv.current()
    if not cur:
        act.result = "no-current"
        say("no current release; nothing to reload")
        return
    act.rid = cur
    if not srv.start_apps(""):
        raise ToolError("PM2 could not start the apps (pm2 startOrReload failed)")
    if not activation.Machine(srv.cfg, srv.store, srv).wait_healthy(cur):
        srv.error_log()
        raise ToolError("the app is not healthy after the reload")
    act.result = "reloaded"
    say(f"reloaded; {cur} is healthy")


def cmd_logs(srv: Server, act: Action, args: list[str]) -> int:
    """Read as the app user (a link the app planted in shared/logs never makes root read a file),
    masked like every log tail the tool prints, control characters removed."""
    root = srv.cfg.root
    follow, n, files = False, "100", [f"{root}/shared/logs/out.log", f"{root}/shared/logs/error.log"]
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("-f", "--follow"):
            follow = True
        elif arg == "--err":
            files = [f"{root}/shared/logs/error.log"]
        elif arg == "-n":
            if not rest or not re.fullmatch(r"[0-9]{1,6}", rest[0]):
                raise usage_error("logs: -n needs a number of lines")
            n = rest.pop(0)
        else:
            raise usage_error("usage: logs [-f] [--err] [-n N]")
    with srv.dir("shared") as shared:
        srv.app_dir(shared, "logs", f"{root}/shared/logs", srv.cfg.app)
    argv = ["tail", "-n", n, *(["-F"] if follow else []), "--", *files]
    child = proc.popen(srv.cfg.app, argv, srv.app_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    try:
        proc.relay(child.stdout, srv.masker(), sys.stdout)
    except KeyboardInterrupt:
        child.terminate()
    err = child.stderr.read()
    rc = child.wait()
    srv.show(err)
    return rc


# ---------------------------------------------------------------------------- main
def parse(argv: list[str]) -> tuple[str, str, list[str]]:
    root = os.environ.get("COGNIVERN_ROOT") or facts.ROOT
    args = list(argv)
    while args:
        arg = args[0]
        if arg == "--root":
            if len(args) < 2:
                raise usage_error("--root needs a directory")
            root = args[1]
            args = args[2:]
        elif arg.startswith("--root="):
            root, args = arg.removeprefix("--root="), args[1:]
        elif arg in ("-h", "--help", "help"):
            raise HelpRequestedError
        elif arg.startswith("-"):
            raise usage_error(f"unknown option {arg}")
        else:
            break
    if not args:
        sys.stderr.write(USAGE)
        raise ToolError(None, code=2)
    if not root.startswith("/"):
        raise usage_error("--root must be an absolute path")
    root = root.rstrip("/") or "/"
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        raise usage_error(f"unknown command '{cmd}'")
    if any(a in ("-h", "--help") for a in rest):
        raise HelpRequestedError
    return root, cmd, rest


class HelpRequestedError(Exception):
    pass


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def opened_root(root: str) -> Iterator[int]:
    try:
        fd = safefs.open_dir(root)
    except (OSError, safefs.RefusedError):
        raise ToolError(f"{root} is not a directory") from None
    try:
        yield fd
    finally:
        os.close(fd)


def run(argv: list[str]) -> int:
    try:
        root, cmd, args = parse(argv)
        cfg = load_config(root)
        signal.signal(signal.SIGTERM, _terminate)
        with opened_root(root) as root_fd:
            return execute(Server(cfg, root_fd), cmd, args)
    except HelpRequestedError:
        sys.stdout.write(USAGE)
        return 0
    except ConfigError as err:
        say(f"error: {err}")
        return 1
    except ToolError as err:
        if err.message:
            say(f"error: {err.message}")
        return err.code
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143


def execute(srv: Server, cmd: str, args: list[str]) -> int:
    """Run one command; whatever it ends with, its clean-ups run and releases.log gets its line."""
    act = Action(name=ACTIONS.get(cmd))
    rc = 0
    try:
        command = globals()["cmd_" + cmd.replace("-", "_")]
        rc = command(srv, act, args) or 0
    except ToolError as err:
        if err.message:
            say(f"error: {err.message}")
        act.result = act.result or err.result
        rc = err.code
    except safefs.RefusedError as err:
        say(f"error: {err}")
        rc = 1
    except KeyboardInterrupt:
        rc = 130
    except Terminated:
        rc = 143
    finally:
        for cleanup in reversed(act.cleanups if rc else []):
            with contextlib.suppress(Exception, ToolError):
                cleanup()
        if act.name:
            result = (act.result or "ok") if rc == 0 else f"{act.result or 'failed'}(exit={rc})"
            srv.log_line(f"{proc.iso_now()} {act.name} {act.rid} {invoking_user()} {act.sha} {result}")
        srv.daemon.close()
    return rc


def main(argv: list[str] | None = None) -> int:
    os.umask(0o022)
    return run(sys.argv[1:] if argv is None else argv)
