"""The facts the Pulumi program and the server-side tool share: one author for each.

The program imports this module (components/settings.py, components/render.py); provisioning
ships it to the server with the rest of the package, where `cognivern-release` imports it. The host
scripts that stay bash get the rules as generated text (`shell_prelude`), never a hand-written copy.
Standard library only: it runs on the server's python3 (3.11 on Debian 12).

Patterns are written once as bodies in the common subset of Python `re` and POSIX ERE (bash
`[[ =~ ]]`): character classes, groups, alternation and bounded repeats, no lookaround or escapes
other than `\\.`. Python matches them whole (`fullmatch`), bash anchors them with ^( )$.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

# ---------------------------------------------------------------------------- validation rules
RELEASE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
SHA256 = r"[0-9a-f]{64}"
USER = r"[a-z_][a-z0-9_-]{0,31}"
ENV_KEY = r"[A-Za-z_][A-Za-z0-9_]*"
# What site_name returns for every valid app name (nginx-site.sh and tls.sh take it as --name).
SITE_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
# An absolute, normalised path of conservative characters: no //, no . or .. component, no trailing /.
_PATH_PART = r"[A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+"
ABS_PATH = rf"(/({_PATH_PART}))+"
HEALTH_PATH = r"/[A-Za-z0-9/._-]*"
PM2_NAMES = r"([A-Za-z0-9][A-Za-z0-9._,-]*)?"  # AGENT_APPS: PM2 app names, comma-separated
UPSTREAM_NAME = r"[A-Za-z0-9_]+"


def whole(body: str) -> re.Pattern[str]:
    """A pattern that matches whole strings only (`\\Z`, not `$`: no trailing newline slips through)."""
    return re.compile(rf"^(?:{body})\Z")


RELEASE_ID_RE = whole(RELEASE_ID)
SHA256_RE = whole(SHA256)
USER_RE = whole(USER)
ENV_KEY_RE = whole(ENV_KEY)
SITE_NAME_RE = whole(SITE_NAME)
ABS_PATH_RE = whole(ABS_PATH)
HEALTH_PATH_RE = whole(HEALTH_PATH)
PM2_NAMES_RE = whole(PM2_NAMES)
UPSTREAM_NAME_RE = whole(UPSTREAM_NAME)


def abs_path(path: str) -> bool:
    """An absolute, normalised path of conservative characters (no //, ., .., trailing /; not /)."""
    return ABS_PATH_RE.match(path) is not None


# `root` may not be one of these trees or anything inside them (root chowns and prunes under it)...
SYSTEM_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
)
# ...nor one of these shared parents itself (a directory of its own inside them is fine).
SYSTEM_PARENTS = ("/opt", "/srv", "/tmp", "/var", "/var/lib", "/var/log", "/var/cache", "/var/tmp", "/var/www", "/mnt", "/media", "/snap")


def system_path(path: str) -> bool:
    """True for a path root would take over to its harm: a system tree, or one of the shared parents."""
    if path in SYSTEM_PARENTS:
        return True
    return any(path == tree or path.startswith(tree + "/") for tree in SYSTEM_TREES)


# ---------------------------------------------------------------------------- defaults
# Stack settings the tool also needs when cognivern.conf leaves them out (settings.KEYS uses these).
ROOT = "/opt/cognivern"
APP_USER = "cognivern"
APP_NAME = "cognivern-agent"
PORT = 3000
HEALTH_PATH_DEFAULT = "/health"
HEALTH_TIMEOUT = 25
KEEP_RELEASES = 5
MIN_KEEP_RELEASES = 2  # current and previous are never pruned; fewer would keep nothing to roll back to
DATA_BACKUPS_KEEP = 5
# Seconds a switched release is watched (health, PM2 restarts) with the previous slot still warm: long
# enough for a crash loop that starts ~10 s after boot (the measured case) and a few health
# polls after it; short enough that a 3-server rollout stays under 3 minutes of bake.
BAKE_SECONDS = 30
AGENT_NAME = "forecasting-agent"
NGINX_CONF = "/etc/nginx/nginx.conf"


def build_user(app_user: str) -> str:
    """The account that runs `pnpm install` (neither root nor the app): its own store, HOME and npmrc."""
    return f"{app_user[:25]}-build"


# ---------------------------------------------------------------------------- slots
# The app runs as two PM2 apps, <appName>-blue on `port` and <appName>-green on `port`+1.
SLOTS = ("blue", "green")


def slot_port(port: int, slot: str) -> int:
    return port if slot == SLOTS[0] else port + 1


def slot_app(app_name: str, slot: str) -> str:
    return f"{app_name}-{slot}"


def other_slot(slot: str) -> str:
    return SLOTS[1] if slot == SLOTS[0] else SLOTS[0]


# ---------------------------------------------------------------------------- the health rule
# Healthy: a 2xx answer whose JSON body has "status":"ok" (a slot's start, the bake, status, reload).
HEALTH_OK_RE = re.compile(rb'"status"\s*:\s*"ok"')


def health_ok(status: int, body: bytes) -> bool:
    return 200 <= status < 300 and HEALTH_OK_RE.search(body) is not None


# ---------------------------------------------------------------------------- nginx names and the upstream file
def site_name(app_name: str) -> str:
    """The nginx site's name: the app name with every character but A-Z a-z 0-9 _ - replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", app_name)


def nginx_identifier(app_name: str) -> str:
    """The prefix of the names the site defines: the site name without `-` (it would end an nginx variable)."""
    return site_name(app_name).replace("-", "_")


def upstream_name(app_name: str) -> str:
    return nginx_identifier(app_name) + "_app"


def upstream_include(app_name: str) -> str:
    """The upstream file, relative to nginx.conf's directory: beside the site, never included by itself."""
    return f"sites-available/{site_name(app_name)}.upstream"


def upstream_text(name: str, port: int, live_port: int) -> str:
    """The upstream file: the live slot, and the other slot (of the app's `port`) as `backup`.

    Written by nginx-site.sh when missing (the program renders it), then by the tool at every switch.
    The other slot is listed whether it runs or not: nginx tries a backup only when the live slot
    fails, and a worker of the configuration before a switch (a graceful reload lets it finish the
    requests of its keepalive connections) then reaches the slot just switched to. Without it, the
    first switch on a host (whose file listed one slot) answered 502 for as long as the old workers
    lived once the old slot stopped at once (bakeSeconds 0; measured by bench.change_bench).
    `max_fails=0` on both: with two servers nginx would otherwise take one failed attempt at the live
    slot (a worker's restart) as a reason to send everything to the backup for `fail_timeout`
    (10 s), and a stopped backup then answers 502 all that time (seen in test_blue_green's
    interrupted bake); a failed attempt is retried on the other slot, request by request.

    No `keepalive` to the slots: a graceful reload of the live slot (an `.env` change) ends the
    old worker, which closes its idle connections (Node's `server.close()` does since Node 19),
    and a request nginx had just written on one it kept was reset ("recv() failed (104: Connection
    reset by peer) while reading response header from upstream", or "upstream prematurely closed
    connection"); nginx retried it on a server not yet tried, the stopped backup, and the client got
    502 (test_boundaries under CPU load: 1-8 per reload; several kept connections go stale at once,
    so a retry on another kept one failed too). A connection per request costs a loopback connect.
    The live slot is listed twice so that a request reset anyway (accepted by the old worker just
    before it closed) is retried on a new connection to the live slot, not on the stopped backup.
    """
    other = next(slot_port(port, s) for s in SLOTS if slot_port(port, s) != live_port)
    live = f"    server 127.0.0.1:{live_port} max_fails=0;\n"
    return (
        "# Managed by cognivern-release: the live slot (twice: a reset request is retried there first), the other slot as backup.\n"
        f"upstream {name} {{\n{live}{live}    server 127.0.0.1:{other} backup max_fails=0;\n}}\n"
    )


# ---------------------------------------------------------------------------- KEY=value files
# shared/.env and config/cognivern.conf: one `KEY=value` a line, values quoted as POSIX sh words
# (shlex.quote). Read as data (parse_assignments), never sourced by a shell.


def format_assignments(values: Mapping[str, str], header: str) -> str:
    lines = [header] + [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def parse_assignments(text: str) -> dict[str, str]:
    """`KEY=value` lines (later ones win); comments, blank and malformed lines are skipped."""
    out: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, raw = line.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            continue
        try:
            words = shlex.split(raw, comments=False, posix=True)
        except ValueError:
            continue
        if len(words) <= 1:
            out[key] = words[0] if words else ""
    return out


# ---------------------------------------------------------------------------- state
# ROOT/config/state.json, written only by cognivern-release (root's, world-readable: the ecosystem
# file reads the slots from it as the app user). Schema 1:
#   slots     {"live": "blue"|"green", "blue": ID|null, "green": ID|null, "agent": ID|null}
#   previous  ID|null: the release `current` pointed at before the last switch
#   journal   null, or the activation under way: {id, from, prev, slot, from_slot, pid, phase}
#   releases  {ID: {installed_at, installed_epoch, sha256, source, served_healthy?, bad?: {marked_at, reason}}}
STATE_FILE = "config/state.json"
STATE_SCHEMA = 1
JOURNAL_PHASES = ("backup", "starting", "switched", "reverting", "finishing")


# ---------------------------------------------------------------------------- for bash
def _shell_array(name: str, items: Iterable[str]) -> str:
    return f"readonly {name}=({' '.join(shlex.quote(i) for i in items)})"


def shell_prelude() -> str:
    """The rules above as bash variables, put in front of every host script (components.remote).

    Generated, so the scripts' validators (lib.sh) never hold a copy that could drift.
    """
    lines = [
        "# Generated from components/release/cognivern_release/facts.py (the rules the program checks).",
        f"readonly COGNIVERN_ABS_PATH_RE={shlex.quote('^(' + ABS_PATH + ')$')}",
        f"readonly COGNIVERN_USER_RE={shlex.quote('^(' + USER + ')$')}",
        f"readonly COGNIVERN_SITE_NAME_RE={shlex.quote('^(' + SITE_NAME + ')$')}",
        _shell_array("COGNIVERN_SYSTEM_TREES", SYSTEM_TREES),
        _shell_array("COGNIVERN_SYSTEM_PARENTS", SYSTEM_PARENTS),
    ]
    return "\n".join(lines) + "\n"
