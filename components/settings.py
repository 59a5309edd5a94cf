"""Stack settings: read once, validated before any resource registers.

Components receive a `Settings` (plain, typed values) and never read config themselves, so a
bad value fails `pulumi preview` with one clear message instead of half a deployment.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from components.release.cognivern_release import facts
from components.release.cognivern_release.facts import (
    BAKE_SECONDS,
    ENV_KEY_RE,
    HEALTH_PATH_RE,
    RELEASE_ID_RE,
    SHA256_RE,
    USER_RE,
    abs_path,
    system_path,
)

NAMESPACE = "cognivern"

APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z"
)
SERVER_NAME_RE = re.compile(r"^(_|\*?[A-Za-z0-9.-]{1,253})\Z")
LISTEN_RE = re.compile(r"^((\d{1,3}(\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):)?\d{1,5}\Z")
SERVER_TYPE_RE = re.compile(r"^[a-z]{2,4}\d{1,3}\Z")
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}\Z)({_LABEL}\.)+{_LABEL}\Z")
EMAIL_RE = re.compile(rf"^(?=.{{1,254}}\Z)[A-Za-z0-9._%+-]+@({_LABEL}\.)+{_LABEL}\Z")
ACME_SERVER_RE = re.compile(r"^https://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~/%+-]*)?\Z")
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
HOST_KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+( [^\x00-\x1f\x7f]*)?\Z")
PUBLIC_KEY_RE = HOST_KEY_RE
ROOT_CHARS_RE = re.compile(r"^[A-Za-z0-9/._-]+\Z")
ARTIFACT_URL_RE = re.compile(r"^https://[A-Za-z0-9.-]+(:\d+)?/[A-Za-z0-9._~/%+-]*\Z")

LOCATIONS = ("fsn1", "nbg1", "hel1", "ash", "hil", "sin")
# Hetzner network zones: a private network's subnet must be in the zone of the servers' location.
NETWORK_ZONES = {
    "fsn1": "eu-central",
    "nbg1": "eu-central",
    "hel1": "eu-central",
    "ash": "us-east",
    "hil": "us-west",
    "sin": "ap-southeast",
}
LOAD_BALANCER_TYPE_RE = re.compile(r"^lb\d{2}\Z")
MAX_SERVERS = 10
DEPRECATED_SERVER_TYPES = frozenset(
    {"cx11", "cx21", "cx31", "cx41", "cx51", "cx22", "cx32", "cx42", "cx52"} | {"cpx11", "cpx21", "cpx31", "cpx41", "cpx51"}
)
# Sticky, world-writable directories: every local user may create names in them and the system's
# temp cleanup (systemd-tmpfiles) deletes what has not changed for a while, so another user could
# create ROOT first and the cleanup could delete releases and data. `root` may not be in one.
# These are the ones every Debian/Ubuntu server has; provision.sh refuses any other such directory
# on the server (a ROOT with an ancestor that is not root's or that others can write).
SHARED_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/shm", "/run/lock", "/var/lock", "/var/crash", "/dev/mqueue")
# Accounts of the base system and of common services: the app (hostile by assumption) must never
# become one of them. provision.sh also refuses any existing account it did not create for the app.
SYSTEM_ACCOUNTS = frozenset(
    {"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data", "backup"}
    | {"list", "irc", "gnats", "nobody", "nogroup", "messagebus", "syslog", "sshd", "uuidd", "tcpdump", "tss", "polkitd"}
    | {"landscape", "pollinate", "lxd", "dnsmasq", "ntp", "postfix", "nginx", "postgres", "mysql", "redis", "ubuntu", "debian"}
    | {"admin", "adm", "sudo", "staff", "shadow", "docker", "fwupd-refresh", "usbmux", "systemd-coredump"}
)
SYSTEM_ACCOUNT_PREFIXES = ("systemd-", "_")
# Node majors the server may get. pnpm comes from npm (pinned, components/host/versions.env), not
# corepack, so Node 25+ (no corepack) works too; the bound keeps out typos such as 222 and majors
# NodeSource does not publish yet.
NODE_MAJORS = (18, 26)
# Where the server's Node.js comes from (cognivern:nodeSource): NodeSource's repository (any major
# of NODE_MAJORS; Hetzner servers reach it) or the distribution's own nodejs and npm packages (one
# major per release; for hosts that cannot reach NodeSource, or operators who prefer the
# distribution's security updates).
NODE_SOURCES = ("nodesource", "distribution")
# The major of each image's own nodejs package (checked 2026-12 in the archives' package lists):
# Debian 12 (bookworm) 18.20.4, Debian 13 (trixie) 20.19.2 (both installed by the pristine-host
# tests), Ubuntu 24.04 (noble, universe) 18.19.1, Ubuntu 22.04 (jammy, universe) 12.22.9. Only a
# created server's image is known before the server exists: provision.sh checks any host's own
# package (apt-cache policy) and refuses a nodeMajor it cannot give.
DISTRIBUTION_NODE_MAJORS = {"debian-12": 18, "debian-13": 20, "ubuntu-22.04": 12, "ubuntu-24.04": 18}
# Keys the program writes into shared/.env itself; `env`/`secretEnv` may not override them.
RESERVED_ENV_KEYS = frozenset({"PORT", "HOST", "AGENTS_ENABLED"})
# The app binds to loopback (nginx is its only client), when it honours HOST.
APP_HOST = "127.0.0.1"
# cognivern:framePolicy -> who may frame the app's pages (nginx X-Frame-Options + CSP frame-ancestors).
FRAME_POLICIES = ("same-origin", "deny", "any")
SECRET_KEYS = ("sshPrivateKey", "secretEnv")


class ConfigError(Exception):
    """A stack setting is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Settings:
    """Every stack setting, validated. Secret values stay wrapped until a component needs them."""

    release: str
    host: str | None
    ssh_user: str
    ssh_port: int
    ssh_private_key: str | None = field(repr=False)
    ssh_public_key: str | None
    host_key: str | None
    ssh_allowed_cidrs: tuple[str, ...]
    server_type: str
    location: str
    image: str
    backups: bool
    protect: bool
    root: str
    app_user: str
    app_name: str
    port: int
    instances: int
    node_major: int
    env: Mapping[str, str]
    secret_env: Mapping[str, str] = field(repr=False)
    agents_enabled: bool
    keep_releases: int
    data_backups_keep: int
    health_path: str
    health_timeout: int
    wait_ready: bool
    listen_timeout_ms: int
    kill_timeout_ms: int
    server_name: str
    nginx_listen: tuple[str, ...]
    artifact: str | None
    artifact_url: str | None
    artifact_sha256: str | None
    hosts: tuple[str, ...] = ()
    host_keys: Mapping[str, str] = field(default_factory=dict)
    servers: int = 1
    load_balancer_type: str = "lb11"
    domain: str | None = None
    acme_email: str | None = None
    acme_server: str = LETS_ENCRYPT
    require_host_key: bool = False
    metadata_filter: bool = False
    frame_policy: str = "same-origin"
    bake_seconds: int = BAKE_SECONDS
    keep_previous_warm: bool = False
    node_source: str = "nodesource"
    warnings: tuple[str, ...] = ()
    stack: str = "STACK"

    @property
    def config_command(self) -> str:
        """`pulumi config` on the backend, stack and passphrase `make deploy` uses (README: one entry point)."""
        return config_command(self.stack)

    @property
    def creates_server(self) -> bool:
        return self.host is None and not self.hosts

    @property
    def filters_metadata(self) -> bool:
        """Only root may reach the metadata service, from before PM2 at every boot: always on servers the
        program creates (their user data holds the host key), on `host`/`hosts` when `metadataFilter` asks."""
        return self.creates_server or self.metadata_filter

    @property
    def node_count(self) -> int:
        """How many servers the stack deploys to: `servers` created ones, or the existing `host`/`hosts`."""
        if self.hosts:
            return len(self.hosts)
        return self.servers if self.creates_server else 1

    @property
    def indexed(self) -> bool:
        """Per-server names carry an index (`-1`, `-2`, ...): several servers, or a `hosts` list.

        A one-server stack keeps the names (and URNs) it has always had.
        """
        return self.node_count > 1 or bool(self.hosts)

    @property
    def certbot_tls(self) -> bool:
        """One server with a domain: certbot on the server terminates TLS (several: the balancer does)."""
        return self.domain is not None and self.node_count == 1

    @property
    def balancer_tls(self) -> bool:
        return self.domain is not None and self.creates_server and self.servers > 1

    @property
    def named_server(self) -> str | None:
        """nginx's server_name when the stack names one; None for `_` (any name, the default server)."""
        return None if self.server_name == "_" else self.server_name

    @property
    def network_zone(self) -> str:
        return NETWORK_ZONES[self.location]

    def host_key_for(self, address: str) -> str | None:
        """The pin for one host: its `hostKeys` entry, else `hostKey` (None: not checked)."""
        return self.host_keys.get(address, self.host_key)

    @property
    def stack_env(self) -> dict[str, str]:
        """The non-secret part of shared/.env: program-owned keys first, then `env`."""
        return {"PORT": str(self.port), "HOST": APP_HOST, "AGENTS_ENABLED": "true" if self.agents_enabled else "false", **self.env}

    def created_server_pin(self, address: str) -> str | None:
        """The operator's pin for a created server (one created before the program generated host
        keys ignores the new user data): its `hostKeys` entry, else `hostKey` on a one-server
        stack. None: the key the program generated for it."""
        return self.host_keys.get(address, self.host_key if self.servers == 1 else None)

    @property
    def unpinned_hosts(self) -> tuple[str, ...]:
        """Existing servers whose host key is not pinned (created servers are pinned to a generated key)."""
        if self.hosts:
            return tuple(h for h in self.hosts if self.host_key_for(h) is None)
        return (self.host,) if self.host is not None and self.host_key is None else ()


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"{NAMESPACE}:{key}: {message}")


class _RuleError(Exception):
    """A rule refused a value; `parse_settings` prefixes the key it was checking."""


class _Reader:
    """Typed access to raw config strings (as Pulumi stores them) with key-naming errors."""

    def __init__(self, get: Callable[[str], str | None]) -> None:
        self._get = get

    def raw(self, key: str) -> str | None:
        value = self._get(key)
        return None if value is None or value == "" else value

    def string(self, key: str) -> str | None:
        value = self.raw(key)
        if value is not None and ("\n" in value or "\r" in value or "\0" in value):
            raise _fail(key, "must be a single line (no newline or NUL characters)")
        return value

    def integer(self, key: str, lo: int, hi: int) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        try:
            number = int(value, 10)
        except ValueError:
            raise _fail(key, f"must be a whole number from {lo} to {hi}, got {value!r}") from None
        if not lo <= number <= hi:
            raise _fail(key, f"must be a whole number from {lo} to {hi}, got {number}")
        return number

    def boolean(self, key: str) -> bool | None:
        value = self.raw(key)
        if value is None:
            return None
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise _fail(key, f"must be true or false, got {value!r}")

    def json_value(self, key: str, kind: type, what: str) -> Any:
        value = self.raw(key)
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise _fail(key, f"must be {what} (set it as YAML in the stack file or with --path)") from None
        if not isinstance(parsed, kind):
            raise _fail(key, f"must be {what}, got {type(parsed).__name__}")
        return parsed


@dataclass(frozen=True)
class Read:
    """How a key's raw string is read; `kind` is its Pulumi.yaml type (tests check the declarations)."""

    kind: str
    read: Callable[[_Reader, str], Any]


def _string() -> Read:
    return Read("string", _Reader.string)


def _secret_text() -> Read:
    """A multi-line string (a PEM key): read as it is, never through the single-line check."""
    return Read("string", _Reader.raw)


def _integer(lo: int, hi: int) -> Read:
    return Read("integer", lambda r, key: r.integer(key, lo, hi))


def _boolean() -> Read:
    return Read("boolean", _Reader.boolean)


def _array(what: str) -> Read:
    return Read("array", lambda r, key: r.json_value(key, list, what))


def _object(what: str) -> Read:
    return Read("object", lambda r, key: r.json_value(key, dict, what))


# A rule is a whole-string pattern (refused with "<value> is not allowed: <message>") or a check
# `(value, message) -> normalised value` that raises _RuleError.
Rule = re.Pattern[str] | Callable[[Any, str], Any]


def _apply(rule: Rule, value: Any, message: str) -> Any:
    if isinstance(rule, re.Pattern):
        if not rule.fullmatch(value):
            raise _RuleError(f"{value!r} is not allowed: {message}")
        return value
    return rule(value, message)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any, str], Any]:
    def check(value: str, message: str) -> str:
        if value not in choices:
            raise _RuleError(f"{value!r} {message}")
        return value

    return check


def _private_key(value: str, message: str) -> str:
    if "PRIVATE KEY-----" not in value:
        raise _RuleError(message)
    return value


def _env_map(raw: dict[str, Any], _message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not ENV_KEY_RE.fullmatch(name):
            raise _RuleError(f"{name!r} is not a valid environment variable name (letters, digits, _; not starting with a digit)")
        if name in RESERVED_ENV_KEYS:
            raise _RuleError(f"{name} is set by the program (from cognivern:port / cognivern:agentsEnabled); remove it here")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        elif not isinstance(value, str):
            raise _RuleError(f"{name} must be a string, number or boolean")
        if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
            raise _RuleError(f"{name} must be a single line of printable characters (no newline, NUL or other control characters)")
        out[name] = value
    return out


def _cidrs(raw: Any, _message: str) -> tuple[str, ...]:
    if not raw:
        raise _RuleError("must list at least one CIDR, or SSH (and every deploy) is locked out")
    out = []
    for item in raw:
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise _RuleError(f"{item!r} is not an IPv4 or IPv6 CIDR such as 203.0.113.7/32") from None
    return tuple(out)


def _host(value: str, _message: str = "") -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    return str(_apply(HOSTNAME_RE, value, "an IPv4/IPv6 address or a DNS name (letters, digits, '-', '.')"))


def _hosts(raw: Any, _message: str) -> tuple[str, ...]:
    """`hosts`: existing servers' addresses, each validated like `host`, no duplicates; [] is unset."""
    if len(raw) > MAX_SERVERS:
        raise _RuleError(f"lists {len(raw)} addresses; at most {MAX_SERVERS}")
    out: list[str] = []
    for item in raw:
        if not isinstance(item, str) or not item or any(c in item for c in "\n\r\0"):
            raise _RuleError(f"{item!r} is not an address (a string: IPv4/IPv6 address or DNS name)")
        address = _host(item)
        if address in out:
            raise _RuleError(f"{address} is listed twice")
        out.append(address)
    return tuple(out)


def _host_keys(raw: Any, message: str) -> dict[str, str]:
    """`hostKeys`: a pin per address (address -> 'ssh-ed25519 AAAA...'); which addresses may be
    pinned depends on host/hosts (`_cross_key_rules`)."""
    out: dict[str, str] = {}
    for address, key in raw.items():
        if not isinstance(key, str):
            raise _RuleError(f"{address}: must be a host key line {message}")
        out[_host(str(address))] = _apply(HOST_KEY_RE, key, f"the server's public host key line: {message}")
    return out


def _listen(raw: Any, message: str) -> tuple[str, ...]:
    listen = tuple(str(x) for x in raw)
    if not listen:
        raise _RuleError("must list at least one address")
    for item in listen:
        _apply(LISTEN_RE, item, message)
        if not 1 <= int(item.rsplit(":", 1)[-1]) <= 65535:
            raise _RuleError(f"{item!r}: port must be 1-65535")
    return listen


def _root(value: str, _message: str) -> str:
    if not abs_path(value):  # the rule (facts.abs_path); the two messages say which part of it failed
        if not (value.startswith("/") and posixpath.normpath(value) == value and value != "/" and "//" not in value):
            raise _RuleError(f"{value!r} must be an absolute, normalised path such as /opt/cognivern (no trailing '/', '..' or '//')")
        raise _RuleError(f"{value!r} may contain only letters, digits, '/', '.', '_' and '-'")
    temp = shared_temp_dir(value)
    if temp is not None:
        raise _RuleError(
            f"{value!r} is {temp} or inside it, which every local user can write (sticky, world-writable): another user could create it"
            " first, and temp cleanup deletes old files there; use a directory of its own such as /opt/cognivern"
        )
    if system_path(value):
        raise _RuleError(
            f"{value!r} is a system directory (or inside one); use a directory of its own such as /opt/cognivern or /srv/cognivern"
        )
    return value


def _app_user(value: str, message: str) -> str:
    _apply(USER_RE, value, message)
    if value == "root":
        raise _RuleError("must not be root: PM2 and the app run as an unprivileged user")
    if value in SYSTEM_ACCOUNTS or value.startswith(SYSTEM_ACCOUNT_PREFIXES):
        raise _RuleError(f"{value!r} is a system account; the app needs an account of its own such as cognivern")
    return value


@dataclass(frozen=True)
class Key:
    """One stack setting: how it is read, its default, its rule and what the rule allows.

    `doc` is the README's "meaning" column and `shown` its "default" column when the default
    alone does not say it (tools/config_table.py writes the README table from KEYS).
    """

    name: str
    reader: Read
    default: Any = None
    rule: Rule | None = None
    message: str = ""
    doc: str = ""
    shown: str | None = None

    @property
    def field(self) -> str:
        """The `Settings` attribute: the key in snake_case (sshPort -> ssh_port)."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


USER_NAME = "a Linux user name (lowercase letters, digits, _ and -)"
HOST_KEY_LINE = "'ssh-ed25519 AAAA...'"

# Every stack setting, in README order. Adding a key: one row here, its field in `Settings`, its
# declaration in Pulumi.yaml (tests compare type and default), then `python -m tools.config_table --write`.
KEYS: tuple[Key, ...] = (
    Key(
        "release",
        _string(),
        None,
        RELEASE_ID_RE,
        "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
        "release id to run, `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`",
        shown="(required)",
    ),
    Key("host", _string(), None, _host, doc="an existing server's address: no Hetzner resource is created"),
    Key(
        "hosts",
        _array("a list of addresses such as ['203.0.113.7', '203.0.113.8']"),
        (),
        _hosts,
        shown="unset",
        doc="several existing servers' addresses (instead of `host`), validated like `host`: each is prepared and released, activations"
        " one at a time; no Hetzner resource, no balancer (see *Several servers*)",
    ),
    Key(
        "hostKeys",
        _object(f"an object of address: {HOST_KEY_LINE}"),
        {},
        _host_keys,
        HOST_KEY_LINE,
        "host key pin per address (`address: ssh-ed25519 AAAA...`) of `hosts`, or of created servers that predate generated host keys"
        " (see *Host keys*); hosts not listed use `hostKey`",
    ),
    Key(
        "servers",
        _integer(1, MAX_SERVERS),
        1,
        doc="servers the program creates, 1–10; above 1: placement group, private network and a Hetzner load balancer"
        " (see *Several servers*)",
    ),
    Key(
        "loadBalancerType",
        _string(),
        "lb11",
        LOAD_BALANCER_TYPE_RE,
        "a Hetzner load balancer type: lb11, lb21, lb31",
        "Hetzner load balancer type, used when `servers` is above 1",
    ),
    Key(
        "sshUser",
        _string(),
        "root",
        USER_RE,
        USER_NAME,
        "SSH user; a non-root user needs passwordless sudo (commands run through `sudo -n`)",
    ),
    Key("sshPort", _integer(1, 65535), 22, doc="SSH port"),
    Key(
        "sshPrivateKey",
        _secret_text(),
        None,
        _private_key,
        "must be a PEM/OpenSSH private key (-----BEGIN ... PRIVATE KEY-----)",
        "**secret**: private key for the connection",
        shown="unset (ssh-agent)",
    ),
    Key(
        "sshPublicKey",
        _string(),
        None,
        PUBLIC_KEY_RE,
        "an OpenSSH public key line: 'ssh-ed25519 AAAA... comment'",
        "public key installed on a created server (required unless `host` is set)",
    ),
    Key(
        "hostKey",
        _string(),
        None,
        HOST_KEY_RE,
        f"the server's public host key line: {HOST_KEY_LINE}",
        "pin of the server's host key (every host's, with `hosts`, unless `hostKeys` names it). Unset: a created server is pinned to"
        " the key the program generated for it; an existing `host` is not checked and every preview warns (see *Host keys*)",
    ),
    Key("requireHostKey", _boolean(), False, doc="refuse (instead of warning about) a `host`/`hosts` address without a pin"),
    Key(
        "metadataFilter",
        _boolean(),
        False,
        doc="give `host`/`hosts` the metadata filter that servers the program creates always get: only root may reach"
        " `169.254.169.254`, loaded before PM2 at every boot (PM2 does not start without it). For existing servers whose"
        " cloud serves user data or credentials there (a Hetzner server created elsewhere, a cloud's instance metadata)"
        " (see *Host keys*)",
        shown="`false` (created servers: always)",
    ),
    Key(
        "sshAllowedCidrs",
        _array("a list of CIDRs"),
        ("0.0.0.0/0", "::/0"),
        _cidrs,
        doc="who may reach SSH through the firewall (open to the world: every preview warns with the command to narrow it)",
    ),
    Key(
        "serverType",
        _string(),
        "cx23",
        SERVER_TYPE_RE,
        "a Hetzner server type such as cx23, cpx22 or cax11",
        "Hetzner server type (deprecated types such as `cx22`, `cpx11` warn)",
    ),
    Key(
        "location",
        _string(),
        "fsn1",
        _one_of(LOCATIONS),
        f"is not a Hetzner location; allowed: {', '.join(LOCATIONS)}",
        ", ".join(f"`{loc}`" for loc in LOCATIONS),
    ),
    Key(
        "image",
        _string(),
        "ubuntu-24.04",
        IMAGE_RE,
        "a Hetzner image name such as ubuntu-24.04 or debian-12",
        "server image (only used at creation)",
    ),
    Key("backups", _boolean(), False, doc="Hetzner automatic server backups"),
    Key("protect", _boolean(), True, doc="Hetzner delete/rebuild protection and Pulumi `protect`"),
    Key(
        "root",
        _string(),
        facts.ROOT,
        _root,
        doc="app root on the server (absolute, normalised; not a system directory such as `/etc`, `/usr`, `/home/...`, `/var/lib`,"
        " nor inside one every user can write such as `/tmp`, `/var/tmp`, `/dev/shm`; provisioning refuses it below any directory"
        " that is not root's alone)",
    ),
    Key(
        "appUser",
        _string(),
        facts.APP_USER,
        _app_user,
        f"{USER_NAME}, not root",
        "unprivileged account that runs PM2 and the app (not root, not `sshUser`, not a system account; see *Who owns what*)",
    ),
    Key(
        "appName",
        _string(),
        facts.APP_NAME,
        APP_NAME_RE,
        "1-64 characters from A-Z a-z 0-9 . _ -",
        "PM2 app name prefix: the app runs as `<appName>-blue` and `<appName>-green` (see *Blue/green activation*)",
    ),
    Key(
        "port",
        _integer(1, 65534),  # the green slot listens on port+1
        facts.PORT,
        doc="app port on 127.0.0.1 (1–65534): the blue slot listens on it, the green slot on `port`+1; written as `PORT` into"
        " `shared/.env` (with `HOST=127.0.0.1`, so an app that honours HOST binds to loopback only), each slot's own `PORT` overrides it",
    ),
    Key("instances", _integer(1, 64), 1, doc="PM2 cluster instances"),
    Key("nodeMajor", _integer(*NODE_MAJORS), 22, doc="Node.js major version, 18-26 (skipped when already installed)"),
    Key(
        "nodeSource",
        _string(),
        "nodesource",
        _one_of(NODE_SOURCES),
        f"is not a Node.js source; allowed: {', '.join(NODE_SOURCES)}",
        "where Node.js comes from: `nodesource` (NodeSource's repository, any `nodeMajor`) or `distribution` (the OS's own"
        " `nodejs` and `npm` packages: one major per release, e.g. 18 on Debian 12 and Ubuntu 24.04, 20 on Debian 13; a"
        " `nodeMajor` it cannot give is refused, for a created server's `image` at preview, on any host by provisioning)",
    ),
    Key("env", _object("an object of NAME: value"), {}, _env_map, doc="plain variables for `shared/.env`"),
    Key("secretEnv", _object("an object of NAME: value"), {}, _env_map, doc="**secret** variables for `shared/.env`"),
    Key(
        "agentsEnabled",
        _boolean(),
        False,
        doc="run `dist/services/AutomatedForecastingService.js` as PM2 app `forecasting-agent`, and set `AGENTS_ENABLED`",
    ),
    Key(
        "keepReleases",
        _integer(facts.MIN_KEEP_RELEASES, 100),
        facts.KEEP_RELEASES,
        doc="releases kept on the server (≥ 2; current and previous are never pruned)",
    ),
    Key(
        "dataBackupsKeep",
        _integer(0, 100),
        facts.DATA_BACKUPS_KEEP,
        doc="`shared/data` backups kept (one before every activation that starts a release; a warm switch starts nothing"
        " and takes none; 0 disables)",
    ),
    Key(
        "healthPath",
        _string(),
        facts.HEALTH_PATH_DEFAULT,
        HEALTH_PATH_RE,
        "a URL path such as /health",
        'must answer `{"status":"ok",...}`',
    ),
    Key(
        "healthTimeout",
        _integer(1, 600),
        facts.HEALTH_TIMEOUT,
        doc="seconds a new release has to become healthy in its slot before it is refused",
    ),
    Key(
        "bakeSeconds",
        _integer(0, 3600),
        BAKE_SECONDS,
        doc="seconds (0–3600) a switched release is watched (health, PM2 restarts) with the previous slot still running as nginx "
        "`backup`; a failure switches back and fails the deploy",
    ),
    Key(
        "keepPreviousWarm",
        _boolean(),
        False,
        doc="keep the previous release running in the other slot after the bake: a rollback to it is a switch (no start), "
        "at the cost of two copies in memory",
    ),
    Key("waitReady", _boolean(), False, doc="PM2 `wait_ready` (set `true` when the app calls `process.send('ready')`)"),
    Key("listenTimeoutMs", _integer(1000, 300000), 10000, doc="PM2 `listen_timeout`"),
    Key("killTimeoutMs", _integer(500, 300000), 8000, doc="PM2 `kill_timeout`"),
    Key(
        "serverName",
        _string(),
        "_",
        SERVER_NAME_RE,
        "'_' (any) or a host name such as api.example.com",
        "nginx `server_name` (`_`: default server)",
    ),
    Key(
        "nginxListen",
        _array("a list such as ['80', '[::]:80']"),
        ("80", "[::]:80"),
        _listen,
        "PORT, IPv4:PORT or [IPv6]:PORT",
        "nginx `listen` addresses",
    ),
    Key(
        "framePolicy",
        _string(),
        "same-origin",
        _one_of(FRAME_POLICIES),
        f"is not allowed: {', '.join(FRAME_POLICIES)}",
        "who may frame the app's pages: `same-origin`, `deny`, or `any` (no frame headers)",
    ),
    Key(
        "artifact",
        _string(),
        None,
        doc="local release tarball (with `<file>.sha256` beside it)",
        shown="`.artifacts/cognivern-<release>.tar.gz`",
    ),
    Key(
        "artifactUrl",
        _string(),
        None,
        ARTIFACT_URL_RE,
        "an https:// URL without query string or shell characters",
        "let the server fetch the tarball over https instead (with `artifactSha256`)",
    ),
    Key("artifactSha256", _string(), None, SHA256_RE, "64 lowercase hex characters", "sha256 of the tarball at `artifactUrl`"),
    Key(
        "domain",
        _string(),
        None,
        DOMAIN_RE,
        "a lowercase DNS name such as api.example.com (no wildcard, IP address or trailing dot)",
        "serve `https://<domain>/`: one server gets a Let's Encrypt certificate (certbot on the server), several get a Hetzner managed"
        " certificate on the load balancer",
    ),
    Key(
        "acmeEmail",
        _string(),
        None,
        EMAIL_RE,
        "an e-mail address such as ops@example.com",
        "Let's Encrypt account e-mail (required with `domain` on one server)",
    ),
    Key(
        "acmeServer",
        _string(),
        LETS_ENCRYPT,
        ACME_SERVER_RE,
        "an https:// ACME directory URL (Let's Encrypt staging: https://acme-staging-v02.api.letsencrypt.org/directory)",
        "ACME directory; try `https://acme-staging-v02.api.letsencrypt.org/directory` first",
        shown="Let's Encrypt production",
    ),
)
KEYS_BY_NAME = {key.name: key for key in KEYS}


def _holds_secret(raw: str | None) -> bool:
    """Whether a secret key's raw value carries anything to protect.

    The CLI merges Pulumi.yaml defaults into the stack config as plain values before the program
    runs (pulumi/pulumi pkg/workspace/config.go, mergeConfig): a stack that never sets secretEnv
    hands the program the plain string `{}` (its `default: {}`). An empty object holds no secret,
    so it is not refused; any non-empty plain value still is.
    """
    if raw is None:
        return False
    try:
        return bool(json.loads(raw) != {})
    except json.JSONDecodeError:
        return True


def shared_temp_dir(path: str) -> str | None:
    """The sticky, world-writable directory `path` is in (or is), if any (SHARED_TEMP_DIRS)."""
    return next((d for d in SHARED_TEMP_DIRS if path == d or path.startswith(d + "/")), None)


def config_command(stack: str) -> str:
    """The `pulumi config` every message suggests: a bare `pulumi` would miss the local backend and
    passphrase that `make deploy` uses (scripts/pulumi-local sets them)."""
    return f"scripts/pulumi-local {stack} config"


def _read_key(r: _Reader, key: Key) -> Any:
    """One key: read, default when unset, then its rule (defaults pass the rules too)."""
    value = key.reader.read(r, key.name)
    if value is None or (key.name == "hosts" and not value):
        value = key.default  # `hosts: []` is unset, like every empty value
    if value is None or key.rule is None:
        return value
    try:
        return _apply(key.rule, value, key.message)
    except _RuleError as err:
        raise _fail(key.name, str(err)) from None


def _cross_key_rules(v: dict[str, Any], config: str) -> None:
    """Rules that involve several keys, once each key is valid on its own (`v`: key -> value)."""
    host, hosts = v["host"], v["hosts"]
    if v["release"] is None:
        raise _fail("release", f"is required: the release id to run, e.g. {config} set cognivern:release 20261128120000-abc1234")
    if host is not None and hosts:
        raise _fail("hosts", "set either cognivern:host (one existing server) or cognivern:hosts (several), not both")
    if v["servers"] != 1 and (host is not None or hosts):
        raise _fail(
            "servers", "only counts servers the program creates; with cognivern:host/cognivern:hosts the listed addresses are the servers"
        )
    if host is None and not hosts and v["sshPublicKey"] is None:
        raise _fail(
            "sshPublicKey", "is required when the program creates the server (cognivern:host/hosts are not set): an OpenSSH public key line"
        )
    if v["hostKeys"] and host is not None:
        raise _fail("hostKeys", "pins keys of cognivern:hosts or of created servers; with cognivern:host use cognivern:hostKey")
    for address in v["hostKeys"]:
        if hosts and address not in hosts:
            raise _fail("hostKeys", f"{address} is not one of cognivern:hosts ({', '.join(hosts)})")
    both = sorted(set(v["env"]) & set(v["secretEnv"]))
    if both:
        raise _fail("secretEnv", f"{', '.join(both)} also set in cognivern:env; set each variable in one of them")
    if v["artifactUrl"] is not None and v["artifactSha256"] is None:
        raise _fail("artifactSha256", "is required with cognivern:artifactUrl (64 lowercase hex characters)")
    if v["artifact"] is not None and v["artifactUrl"] is not None:
        raise _fail("artifact", "set either cognivern:artifact (a local file) or cognivern:artifactUrl, not both")
    if v["domain"] is not None and hosts:
        raise _fail("domain", "with cognivern:hosts (several existing servers) terminate TLS on your own balancer; leave domain unset")
    if v["domain"] is not None and v["servers"] == 1 and v["acmeEmail"] is None:
        raise _fail("acmeEmail", "is required with cognivern:domain on one server (Let's Encrypt account e-mail)")
    if v["appUser"] == v["sshUser"]:
        raise _fail("appUser", f"must differ from cognivern:sshUser ({v['sshUser']}): the deploy login has sudo, the app must not")
    _distribution_node_rule(v, host is None and not hosts)


def _distribution_node_rule(v: dict[str, Any], creates_server: bool) -> None:
    """With nodeSource distribution, a created server's image decides the Node major (existing
    hosts: provision.sh checks the host's own package)."""
    if v["nodeSource"] != "distribution" or not creates_server or v["image"] not in DISTRIBUTION_NODE_MAJORS:
        return
    gives = DISTRIBUTION_NODE_MAJORS[v["image"]]
    if gives < NODE_MAJORS[0]:
        raise _fail(
            "nodeSource",
            f"is distribution, but image {v['image']} packages Node {gives}, older than the {NODE_MAJORS[0]} this program"
            " supports; set cognivern:nodeSource to nodesource or choose a newer cognivern:image",
        )
    if v["nodeMajor"] != gives:
        raise _fail(
            "nodeMajor",
            f"is {v['nodeMajor']}, but cognivern:nodeSource distribution on image {v['image']} gives Node {gives} (its nodejs"
            f" package); set cognivern:nodeMajor to {gives}, or cognivern:nodeSource to nodesource",
        )


def _require_pins(settings: Settings) -> None:
    if settings.require_host_key and settings.unpinned_hosts:
        raise _fail(
            "requireHostKey",
            f"is true but no host key is pinned for {', '.join(settings.unpinned_hosts)}: set "
            + ("cognivern:hostKeys" if settings.hosts else "cognivern:hostKey")
            + " (ssh-keyscan -t ed25519 ADDRESS, then check its fingerprint on the server's console)",
        )


def _warnings(v: dict[str, Any]) -> tuple[str, ...]:
    """Allowed but probably unintended: said on every preview, never fatal."""
    warnings: list[str] = []
    if v["serverType"] in DEPRECATED_SERVER_TYPES:
        warnings.append(
            f"{NAMESPACE}:serverType {v['serverType']} is deprecated by Hetzner; prefer cx23/cx33/cx43/cx53, cpx12/cpx22 or cax11-cax41"
        )
    if v["domain"] is None and (v["acmeEmail"] is not None or v["acmeServer"] != LETS_ENCRYPT):
        warnings.append(f"{NAMESPACE}:acmeEmail/acmeServer have no effect without {NAMESPACE}:domain")
    return tuple(warnings)


def parse_settings(get: Callable[[str], str | None], is_secret: Callable[[str], bool] = lambda _k: True, stack: str = "STACK") -> Settings:
    """Build `Settings` from raw config strings (`get("release")` -> value or None).

    Kept free of Pulumi so the same rules run in unit tables and in the program; `stack` only
    names the stack in the commands that messages suggest. Order: secrets stored encrypted, each
    key alone (KEYS), the rules across keys, then the warnings.
    """
    r = _Reader(get)
    config = config_command(stack)
    for name in SECRET_KEYS:
        if _holds_secret(r.raw(name)) and not is_secret(name):
            raise _fail(name, f"must be stored encrypted: {config} set --secret {NAMESPACE}:{name} ...")
    values = {key.name: _read_key(r, key) for key in KEYS}
    _cross_key_rules(values, config)
    settings = Settings(**{KEYS_BY_NAME[n].field: value for n, value in values.items()}, warnings=_warnings(values), stack=stack)
    _require_pins(settings)
    return settings
