"""The tool's settings: ROOT/config/cognivern.conf (KEY=value lines the program renders), read as data.

Keys the file leaves out take the program's defaults (facts). The COGNIVERN_NGINX_* overrides that
nginx-site.sh honours (test hosts: a private nginx prefix) win, so both always act on one nginx.
"""

from __future__ import annotations

import os
import posixpath
import pwd
from typing import NamedTuple

from . import facts
from .proc import Account


class ConfigError(Exception):
    pass


class Config(NamedTuple):
    root: str
    app: Account
    build: Account | None  # None: the build account does not exist (a host not provisioned since)
    build_user: str
    app_name: str
    port: int
    health_path: str
    health_timeout: int
    keep_releases: int
    data_backups_keep: int
    bake_seconds: int
    keep_previous_warm: bool
    agent_apps: tuple[str, ...]
    nginx_conf: str
    nginx_prefix: str
    nginx_upstream: str
    upstream_name: str
    pm2_home: str
    secret_keys: tuple[str, ...]

    @property
    def conf_path(self) -> str:
        return f"{self.root}/config/cognivern.conf"

    def slot_port(self, slot: str) -> int:
        return facts.slot_port(self.port, slot)

    def slot_app(self, slot: str) -> str:
        return facts.slot_app(self.app_name, slot)

    def slot_url(self, slot: str) -> str:
        return f"http://127.0.0.1:{self.slot_port(slot)}{self.health_path}"

    def nginx_args(self) -> list[str]:
        return ["-c", self.nginx_conf, *(["-p", self.nginx_prefix] if self.nginx_prefix else [])]


def account(name: str) -> Account | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def _number(conf: str, values: dict[str, str], key: str, default: int) -> int:
    raw = values.get(key, "") or str(default)
    if not raw.isascii() or not raw.isdigit():
        raise ConfigError(f"{conf}: {key} must be a whole number, got '{raw}'")
    return int(raw)


def load(root: str, environ: dict[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ
    conf = f"{root}/config/cognivern.conf"
    try:
        fd = os.open(conf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        text = ""
    else:
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            text = f.read()
    v = facts.parse_assignments(text)
    app_user = v.get("APP_USER") or facts.APP_USER
    app_name = v.get("APP_NAME") or facts.APP_NAME
    port = _number(conf, v, "PORT", facts.PORT)
    numbers = {
        key: _number(conf, v, key, default)
        for key, default in (
            ("HEALTH_TIMEOUT", facts.HEALTH_TIMEOUT),
            ("KEEP_RELEASES", facts.KEEP_RELEASES),
            ("DATA_BACKUPS_KEEP", facts.DATA_BACKUPS_KEEP),
            ("BAKE_SECONDS", facts.BAKE_SECONDS),
        )
    }
    health_path = v.get("HEALTH_PATH") or facts.HEALTH_PATH_DEFAULT
    if not facts.HEALTH_PATH_RE.match(health_path):
        raise ConfigError(f"{conf}: HEALTH_PATH must be a URL path, got '{health_path}'")
    app = account(app_user) if facts.USER_RE.match(app_user) else None
    if app is None:
        raise ConfigError(f"app user '{app_user}' does not exist (provisioning creates it)")
    build_user = v.get("BUILD_USER") or facts.build_user(app_user)
    build = account(build_user) if facts.USER_RE.match(build_user) else None
    warm = v.get("KEEP_PREVIOUS_WARM") or "false"
    if warm not in ("true", "false"):
        raise ConfigError(f"{conf}: KEEP_PREVIOUS_WARM must be true or false")
    agents = v.get("AGENT_APPS", "")
    if not facts.PM2_NAMES_RE.match(agents):
        raise ConfigError(f"{conf}: AGENT_APPS must be PM2 app names")
    if port >= 65535:
        raise ConfigError(f"{conf}: PORT must be at most 65534 (the green slot listens on PORT+1)")
    nginx_conf = env.get("COGNIVERN_NGINX_CONF") or v.get("NGINX_CONF") or facts.NGINX_CONF
    nginx_prefix = env.get("COGNIVERN_NGINX_PREFIX") or v.get("NGINX_PREFIX", "")
    upstream = v.get("NGINX_UPSTREAM", "")
    if env.get("COGNIVERN_NGINX_SITES_AVAILABLE") and upstream:
        upstream = posixpath.join(env["COGNIVERN_NGINX_SITES_AVAILABLE"], posixpath.basename(upstream))
    for key, path in (("NGINX_CONF", nginx_conf), ("NGINX_PREFIX", nginx_prefix), ("NGINX_UPSTREAM", upstream)):
        if path and not facts.abs_path(path):
            raise ConfigError(f"{conf}: {key} must be an absolute, normalised path")
    upstream_name = v.get("UPSTREAM_NAME") or facts.upstream_name(app_name)
    if not facts.UPSTREAM_NAME_RE.match(upstream_name):
        raise ConfigError(f"{conf}: UPSTREAM_NAME must be an nginx upstream name")
    secret_keys = tuple(v.get("SECRET_KEYS", "").split())
    if not all(facts.ENV_KEY_RE.match(k) for k in secret_keys):
        raise ConfigError("cognivern.conf: SECRET_KEYS holds an invalid name")
    return Config(
        root=root,
        app=app,
        build=build,
        build_user=build_user,
        app_name=app_name,
        port=port,
        health_path=health_path,
        health_timeout=numbers["HEALTH_TIMEOUT"],
        keep_releases=numbers["KEEP_RELEASES"],
        data_backups_keep=numbers["DATA_BACKUPS_KEEP"],
        bake_seconds=numbers["BAKE_SECONDS"],
        keep_previous_warm=warm == "true",
        agent_apps=tuple(a for a in agents.split(",") if a),
        nginx_conf=nginx_conf,
        nginx_prefix=nginx_prefix,
        nginx_upstream=upstream,
        upstream_name=upstream_name,
        pm2_home=v.get("PM2_HOME") or f"{app.home}/.pm2",
        secret_keys=secret_keys,
    )
