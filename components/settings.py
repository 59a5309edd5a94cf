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

NAMESPACE = "cognivern"

RELEASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")
APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z"
)
SERVER_NAME_RE = re.compile(r"^(_|\*?[A-Za-z0-9.-]{1,253})\Z")
LISTEN_RE = re.compile(r"^((\d{1,3}(\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):)?\d{1,5}\Z")
SERVER_TYPE_RE = re.compile(r"^[a-z]{2,4}\d{1,3}\Z")
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}\Z)({_LABEL}\.)+{_LABEL}\Z")
EMAIL_RE = re.compile(rf"^(?=.{{1,254}}\Z)[A-Za-z0-9._%+-]+@({_LABEL}\.)+{_LABEL}\Z")
ACME_SERVER_RE = re.compile(r"^https://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~/%+-]*)?\Z")
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
HOST_KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+( [^\x00-\x1f\x7f]*)?\Z")
PUBLIC_KEY_RE = HOST_KEY_RE
ROOT_CHARS_RE = re.compile(r"^[A-Za-z0-9/._-]+\Z")
HEALTH_PATH_RE = re.compile(r"^/[A-Za-z0-9/._-]*\Z")
ARTIFACT_URL_RE = re.compile(r"^https://[A-Za-z0-9.-]+(:\d+)?/[A-Za-z0-9._~/%+-]*\Z")

# Seconds a switched release is watched (health, PM2 restarts) with the previous slot still warm: long
# enough for a crash loop that starts ~10 s after boot (the measured case) and a few health
# polls after it; short enough that a 3-server rollout stays under 3 minutes of bake.
BAKE_SECONDS = 30
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
SYSTEM_PARENTS = frozenset(
    {"/opt", "/srv", "/tmp", "/var", "/var/lib", "/var/log", "/var/cache", "/var/tmp", "/var/www", "/mnt", "/media", "/snap"}
)
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
    frame_policy: str = "same-origin"
    bake_seconds: int = BAKE_SECONDS
    keep_previous_warm: bool = False
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


class _Reader:
    """Typed access to raw config strings (as Pulumi stores them) with key-naming errors."""

    def __init__(self, get: Callable[[str], str | None]) -> None:
        self._get = get

    def raw(self, key: str) -> str | None:
        value = self._get(key)
        return None if value is None or value == "" else value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        if value is None:
            return default
        if "\n" in value or "\r" in value or "\0" in value:
            raise _fail(key, "must be a single line (no newline or NUL characters)")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        try:
            number = int(value, 10)
        except ValueError:
            raise _fail(key, f"must be a whole number from {lo} to {hi}, got {value!r}") from None
        if not lo <= number <= hi:
            raise _fail(key, f"must be a whole number from {lo} to {hi}, got {number}")
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
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


def _pattern(key: str, value: str, regex: re.Pattern[str], allowed: str) -> str:
    if not regex.fullmatch(value):
        raise _fail(key, f"{value!r} is not allowed: {allowed}")
    return value


def _env_map(key: str, raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not ENV_KEY_RE.fullmatch(name):
            raise _fail(key, f"{name!r} is not a valid environment variable name (letters, digits, _; not starting with a digit)")
        if name in RESERVED_ENV_KEYS:
            raise _fail(key, f"{name} is set by the program (from cognivern:port / cognivern:agentsEnabled); remove it here")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        elif not isinstance(value, str):
            raise _fail(key, f"{name} must be a string, number or boolean")
        if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
            raise _fail(key, f"{name} must be a single line of printable characters (no newline, NUL or other control characters)")
        out[name] = value
    return out


def _cidrs(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ("0.0.0.0/0", "::/0")
    if not raw:
        raise _fail("sshAllowedCidrs", "must list at least one CIDR, or SSH (and every deploy) is locked out")
    out = []
    for item in raw:
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise _fail("sshAllowedCidrs", f"{item!r} is not an IPv4 or IPv6 CIDR such as 203.0.113.7/32") from None
    return tuple(out)


def _host(value: str | None, key: str = "host") -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    return _pattern(key, value, HOSTNAME_RE, "an IPv4/IPv6 address or a DNS name (letters, digits, '-', '.')")


def _hosts(raw: Any) -> tuple[str, ...]:
    """`hosts`: existing servers' addresses, each validated like `host`, no duplicates; [] is unset."""
    if not raw:
        return ()
    if len(raw) > MAX_SERVERS:
        raise _fail("hosts", f"lists {len(raw)} addresses; at most {MAX_SERVERS}")
    out: list[str] = []
    for item in raw:
        if not isinstance(item, str) or not item or any(c in item for c in "\n\r\0"):
            raise _fail("hosts", f"{item!r} is not an address (a string: IPv4/IPv6 address or DNS name)")
        address = _host(item, "hosts")
        assert address is not None
        if address in out:
            raise _fail("hosts", f"{address} is listed twice")
        out.append(address)
    return tuple(out)


def _host_keys(raw: Any, hosts: tuple[str, ...], host: str | None = None) -> dict[str, str]:
    """`hostKeys`: a pin per address of `hosts`, or of created servers that predate the generated
    host keys (their addresses are only known once they exist) (address -> 'ssh-ed25519 AAAA...')."""
    if not raw:
        return {}
    if host is not None:
        raise _fail("hostKeys", "pins keys of cognivern:hosts or of created servers; with cognivern:host use cognivern:hostKey")
    out: dict[str, str] = {}
    for address, key in raw.items():
        normalised = _host(str(address), "hostKeys")
        if hosts and normalised not in hosts:
            raise _fail("hostKeys", f"{address} is not one of cognivern:hosts ({', '.join(hosts)})")
        if not isinstance(key, str):
            raise _fail("hostKeys", f"{address}: must be a host key line 'ssh-ed25519 AAAA...'")
        out[str(normalised)] = _pattern("hostKeys", key, HOST_KEY_RE, "the server's public host key line: 'ssh-ed25519 AAAA...'")
    return out


def _root(value: str) -> str:
    if not value.startswith("/") or posixpath.normpath(value) != value or value == "/" or "//" in value:
        raise _fail("root", f"{value!r} must be an absolute, normalised path such as /opt/cognivern (no trailing '/', '..' or '//')")
    if not ROOT_CHARS_RE.fullmatch(value):
        raise _fail("root", f"{value!r} may contain only letters, digits, '/', '.', '_' and '-'")
    if system_path(value):
        raise _fail(
            "root", f"{value!r} is a system directory (or inside one); use a directory of its own such as /opt/cognivern or /srv/cognivern"
        )
    return value


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


def system_path(path: str) -> bool:
    """True for a path root would take over to its harm: a system tree, or one of the shared parents.

    provision.sh refuses the same list (tests feed both the same table).
    """
    if path in SYSTEM_PARENTS:
        return True
    return any(path == tree or path.startswith(tree + "/") for tree in SYSTEM_TREES)


def config_command(stack: str) -> str:
    """The `pulumi config` every message suggests: a bare `pulumi` would miss the local backend and
    passphrase that `make deploy` uses (scripts/pulumi-local sets them)."""
    return f"scripts/pulumi-local {stack} config"


def parse_settings(get: Callable[[str], str | None], is_secret: Callable[[str], bool] = lambda _k: True, stack: str = "STACK") -> Settings:
    """Build `Settings` from raw config strings (`get("release")` -> value or None).

    Kept free of Pulumi so the same rules run in unit tables and in the program; `stack` only
    names the stack in the commands that messages suggest.
    """
    r = _Reader(get)
    config = config_command(stack)
    for key in SECRET_KEYS:
        if _holds_secret(r.raw(key)) and not is_secret(key):
            raise _fail(key, f"must be stored encrypted: {config} set --secret {NAMESPACE}:{key} ...")

    release = r.string("release")
    if release is None:
        raise _fail("release", f"is required: the release id to run, e.g. {config} set cognivern:release 20261128120000-abc1234")
    _pattern("release", release, RELEASE_ID_RE, "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")

    host = _host(r.string("host"))
    hosts = _hosts(r.json_value("hosts", list, "a list of addresses such as ['203.0.113.7', '203.0.113.8']"))
    if host is not None and hosts:
        raise _fail("hosts", "set either cognivern:host (one existing server) or cognivern:hosts (several), not both")
    servers = r.integer("servers", 1, 1, MAX_SERVERS)
    if servers != 1 and (host is not None or hosts):
        raise _fail(
            "servers",
            "only counts servers the program creates; with cognivern:host/cognivern:hosts the listed addresses are the servers",
        )
    load_balancer_type = _pattern(
        "loadBalancerType",
        r.string("loadBalancerType", "lb11") or "lb11",
        LOAD_BALANCER_TYPE_RE,
        "a Hetzner load balancer type: lb11, lb21, lb31",
    )
    ssh_public_key = r.string("sshPublicKey")
    if host is None and not hosts and ssh_public_key is None:
        raise _fail(
            "sshPublicKey",
            "is required when the program creates the server (cognivern:host/hosts are not set): an OpenSSH public key line",
        )
    if ssh_public_key is not None:
        _pattern("sshPublicKey", ssh_public_key, PUBLIC_KEY_RE, "an OpenSSH public key line: 'ssh-ed25519 AAAA... comment'")
    host_key = r.string("hostKey")
    if host_key is not None:
        _pattern("hostKey", host_key, HOST_KEY_RE, "the server's public host key line: 'ssh-ed25519 AAAA...'")
    host_keys = _host_keys(r.json_value("hostKeys", dict, "an object of address: 'ssh-ed25519 AAAA...'"), hosts, host)

    private_key = r.raw("sshPrivateKey")
    if private_key is not None and "PRIVATE KEY-----" not in private_key:
        raise _fail("sshPrivateKey", "must be a PEM/OpenSSH private key (-----BEGIN ... PRIVATE KEY-----)")

    server_type = _pattern(
        "serverType", r.string("serverType", "cx23") or "cx23", SERVER_TYPE_RE, "a Hetzner server type such as cx23, cpx22 or cax11"
    )
    warnings: list[str] = []
    if server_type in DEPRECATED_SERVER_TYPES:
        warnings.append(
            f"{NAMESPACE}:serverType {server_type} is deprecated by Hetzner; prefer cx23/cx33/cx43/cx53, cpx12/cpx22 or cax11-cax41"
        )
    location = r.string("location", "fsn1") or "fsn1"
    if location not in LOCATIONS:
        raise _fail("location", f"{location!r} is not a Hetzner location; allowed: {', '.join(LOCATIONS)}")

    env = _env_map("env", r.json_value("env", dict, "an object of NAME: value"))
    secret_env = _env_map("secretEnv", r.json_value("secretEnv", dict, "an object of NAME: value"))
    both = sorted(set(env) & set(secret_env))
    if both:
        raise _fail("secretEnv", f"{', '.join(both)} also set in cognivern:env; set each variable in one of them")

    listen_raw = r.json_value("nginxListen", list, "a list such as ['80', '[::]:80']")
    listen = tuple(str(x) for x in (listen_raw if listen_raw is not None else ["80", "[::]:80"]))
    if not listen:
        raise _fail("nginxListen", "must list at least one address")
    for item in listen:
        _pattern("nginxListen", item, LISTEN_RE, "PORT, IPv4:PORT or [IPv6]:PORT")
        if not 1 <= int(item.rsplit(":", 1)[-1]) <= 65535:
            raise _fail("nginxListen", f"{item!r}: port must be 1-65535")

    health_path = r.string("healthPath", "/health") or "/health"
    _pattern("healthPath", health_path, HEALTH_PATH_RE, "a URL path such as /health")

    artifact_url = r.string("artifactUrl")
    artifact_sha256 = r.string("artifactSha256")
    if artifact_url is not None:
        _pattern(
            "artifactUrl",
            artifact_url,
            ARTIFACT_URL_RE,
            "an https:// URL without query string or shell characters",
        )
        if artifact_sha256 is None:
            raise _fail("artifactSha256", "is required with cognivern:artifactUrl (64 lowercase hex characters)")
    if artifact_sha256 is not None:
        _pattern("artifactSha256", artifact_sha256, SHA256_RE, "64 lowercase hex characters")
    artifact = r.string("artifact")
    if artifact is not None and artifact_url is not None:
        raise _fail("artifact", "set either cognivern:artifact (a local file) or cognivern:artifactUrl, not both")

    domain = r.string("domain")
    acme_email = r.string("acmeEmail")
    acme_server = r.string("acmeServer", LETS_ENCRYPT) or LETS_ENCRYPT
    _pattern(
        "acmeServer",
        acme_server,
        ACME_SERVER_RE,
        "an https:// ACME directory URL (Let's Encrypt staging: https://acme-staging-v02.api.letsencrypt.org/directory)",
    )
    if domain is not None:
        _pattern("domain", domain, DOMAIN_RE, "a lowercase DNS name such as api.example.com (no wildcard, IP address or trailing dot)")
        if hosts:
            raise _fail("domain", "with cognivern:hosts (several existing servers) terminate TLS on your own balancer; leave domain unset")
        if servers == 1 and acme_email is None:
            raise _fail("acmeEmail", "is required with cognivern:domain on one server (Let's Encrypt account e-mail)")
    elif acme_email is not None or acme_server != LETS_ENCRYPT:
        warnings.append(f"{NAMESPACE}:acmeEmail/acmeServer have no effect without {NAMESPACE}:domain")
    if acme_email is not None:
        _pattern("acmeEmail", acme_email, EMAIL_RE, "an e-mail address such as ops@example.com")

    require_host_key = r.boolean("requireHostKey", False)
    frame_policy = r.string("framePolicy", "same-origin") or "same-origin"
    if frame_policy not in FRAME_POLICIES:
        raise _fail("framePolicy", f"{frame_policy!r} is not allowed: {', '.join(FRAME_POLICIES)}")

    app_user = _pattern(
        "appUser",
        r.string("appUser", "cognivern") or "cognivern",
        USER_RE,
        "a Linux user name (lowercase letters, digits, _ and -), not root",
    )
    if app_user == "root":
        raise _fail("appUser", "must not be root: PM2 and the app run as an unprivileged user")
    if app_user in SYSTEM_ACCOUNTS or app_user.startswith(SYSTEM_ACCOUNT_PREFIXES):
        raise _fail("appUser", f"{app_user!r} is a system account; the app needs an account of its own such as cognivern")
    ssh_user = _pattern("sshUser", r.string("sshUser", "root") or "root", USER_RE, "a Linux user name (lowercase letters, digits, _ and -)")
    if app_user == ssh_user:
        raise _fail("appUser", f"must differ from cognivern:sshUser ({ssh_user}): the deploy login has sudo, the app must not")

    settings = Settings(
        release=release,
        host=host,
        ssh_user=ssh_user,
        ssh_port=r.integer("sshPort", 22, 1, 65535),
        ssh_private_key=private_key,
        ssh_public_key=ssh_public_key,
        host_key=host_key,
        ssh_allowed_cidrs=_cidrs(r.json_value("sshAllowedCidrs", list, "a list of CIDRs")),
        server_type=server_type,
        location=location,
        image=_pattern(
            "image", r.string("image", "ubuntu-24.04") or "ubuntu-24.04", IMAGE_RE, "a Hetzner image name such as ubuntu-24.04 or debian-12"
        ),
        backups=r.boolean("backups", False),
        protect=r.boolean("protect", True),
        root=_root(r.string("root", "/opt/cognivern") or "/opt/cognivern"),
        app_user=app_user,
        app_name=_pattern(
            "appName", r.string("appName", "cognivern-agent") or "cognivern-agent", APP_NAME_RE, "1-64 characters from A-Z a-z 0-9 . _ -"
        ),
        port=r.integer("port", 3000, 1, 65534),  # the green slot listens on port+1
        instances=r.integer("instances", 1, 1, 64),
        node_major=r.integer("nodeMajor", 22, *NODE_MAJORS),
        env=env,
        secret_env=secret_env,
        agents_enabled=r.boolean("agentsEnabled", False),
        keep_releases=r.integer("keepReleases", 5, 2, 100),
        data_backups_keep=r.integer("dataBackupsKeep", 5, 0, 100),
        health_path=health_path,
        health_timeout=r.integer("healthTimeout", 25, 1, 600),
        bake_seconds=r.integer("bakeSeconds", BAKE_SECONDS, 0, 3600),
        keep_previous_warm=r.boolean("keepPreviousWarm", False),
        wait_ready=r.boolean("waitReady", False),
        listen_timeout_ms=r.integer("listenTimeoutMs", 10000, 1000, 300000),
        kill_timeout_ms=r.integer("killTimeoutMs", 8000, 500, 300000),
        server_name=_pattern(
            "serverName", r.string("serverName", "_") or "_", SERVER_NAME_RE, "'_' (any) or a host name such as api.example.com"
        ),
        nginx_listen=listen,
        artifact=artifact,
        artifact_url=artifact_url,
        artifact_sha256=artifact_sha256,
        hosts=hosts,
        host_keys=host_keys,
        servers=servers,
        load_balancer_type=load_balancer_type,
        domain=domain,
        acme_email=acme_email,
        acme_server=acme_server,
        require_host_key=require_host_key,
        frame_policy=frame_policy,
        stack=stack,
        warnings=tuple(warnings),
    )
    if settings.require_host_key and settings.unpinned_hosts:
        raise _fail(
            "requireHostKey",
            f"is true but no host key is pinned for {', '.join(settings.unpinned_hosts)}: set "
            + ("cognivern:hostKeys" if hosts else "cognivern:hostKey")
            + " (ssh-keyscan -t ed25519 ADDRESS, then check its fingerprint on the server's console)",
        )
    return settings
