"""Render the files the host receives from the templates beside each component.

Templates use `{{ name }}` placeholders (nginx's own `$vars` stay untouched); every placeholder
must be supplied and every supplied value used, so a typo fails loudly at render time. A line that
holds nothing but one placeholder disappears (newline included) when that value is empty, so an
optional section leaves no trace in the output.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from components.release.cognivern_release import facts
from components.release.cognivern_release.facts import AGENT_NAME as AGENT_NAME
from components.release.cognivern_release.facts import SLOTS, nginx_identifier, upstream_name
from components.release.cognivern_release.facts import site_name as site_name
from components.release.cognivern_release.facts import upstream_include as upstream_include
from components.settings import Settings

HERE = Path(__file__).resolve().parent
HOST_DIR = HERE / "host"
SERVER_DIR = HERE / "server"
RELEASE_DIR = HERE / "release"

_PLACEHOLDER = re.compile(r"\{\{ ([a-z_]+) \}\}")
_PLACEHOLDER_LINE = re.compile(r"^[ \t]*\{\{ ([a-z_]+) \}\}[ \t]*\n", re.MULTILINE)
AGENT_SCRIPT = "./dist/services/AutomatedForecastingService.js"


def render_template(path: Path, values: Mapping[str, str]) -> str:
    text = path.read_text()
    wanted = set(_PLACEHOLDER.findall(text))
    missing, unused = wanted - set(values), set(values) - wanted
    if missing or unused:
        raise ValueError(f"{path.name}: missing {sorted(missing)}, unused {sorted(unused)}")
    text = _PLACEHOLDER_LINE.sub(lambda m: "" if values[m.group(1)] == "" else m.group(0), text)
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def render_env(stack_env: Mapping[str, str], secret_env: Mapping[str, str]) -> str:
    """shared/.env: KEY=value lines (facts.format_assignments), read as data by the release tool."""
    header = "# Managed by cognivern-infra (pulumi up). Do not edit: changes are overwritten."
    return facts.format_assignments({**stack_env, **secret_env}, header)


def slot_apps(s: Settings) -> list[str]:
    """The PM2 names of the two slots (blue on `port`, green on `port`+1)."""
    return [facts.slot_app(s.app_name, slot) for slot in SLOTS]


ENV_PRELOAD = HOST_DIR / "env-preload.cjs"


def env_preload_path(root: str) -> str:
    """Where env-preload.cjs is installed (root's, readable by the app): every app process loads it."""
    return f"{root}/config/env-preload.cjs"


def render_ecosystem(s: Settings) -> str:
    """PM2 ecosystem: two cluster-mode slots (blue/green) and the agent, placed by the tool's state."""
    logs = f"{s.root}/shared/logs"
    common = {
        "env": {"NODE_ENV": "production"},
        "log_date_format": "YYYY-MM-DD HH:mm:ss",
        "merge_logs": True,
        "max_memory_restart": "1G",
        "kill_timeout": s.kill_timeout_ms,
        "node_args": ["--require", env_preload_path(s.root)],
    }
    app = {
        "script": "./dist/index.js",
        "instances": s.instances,
        "exec_mode": "cluster",
        "wait_ready": s.wait_ready,
        "listen_timeout": s.listen_timeout_ms,
        "error_file": f"{logs}/error.log",
        "out_file": f"{logs}/out.log",
        **common,
    }
    agents: list[dict[str, object]] = []
    if s.agents_enabled:
        agents.append(
            {
                "name": AGENT_NAME,
                "script": AGENT_SCRIPT,
                "instances": 1,
                "exec_mode": "fork",
                "error_file": f"{logs}/{AGENT_NAME}-error.log",
                "out_file": f"{logs}/{AGENT_NAME}-out.log",
                **common,
            }
        )
    return render_template(
        HOST_DIR / "ecosystem.config.cjs",
        {
            "app": json.dumps(app, indent=2),
            "agents": json.dumps(agents, indent=2),
            "state_file": json.dumps(f"{s.root}/{facts.STATE_FILE}"),
            "releases": json.dumps(f"{s.root}/releases"),
            "current": json.dumps(f"{s.root}/current"),
            "slots": json.dumps(
                [{"slot": slot, "name": facts.slot_app(s.app_name, slot), "port": facts.slot_port(s.port, slot)} for slot in SLOTS]
            ),
            "release_id": json.dumps(f"^(?:{facts.RELEASE_ID})$"),
        },
    )


# Single-server TLS (tls.sh): where certbot keeps certificates and answers http-01 challenges on the
# server, and where the HTTPS site listens. Tests render with their own (temporary) paths.
LETSENCRYPT_DIR = "/etc/letsencrypt"
ACME_WEBROOT = "/var/www/letsencrypt"
HTTPS_LISTEN = ("443", "[::]:443")
HSTS_MAX_AGE = 31536000  # one year (at least six months is expected of HSTS)

_ACME_CHALLENGE = """
    # ACME http-01 challenges (certbot --webroot, run by tls.sh): always answered here over plain HTTP.
    # Everything else redirects to HTTPS once tls.sh has installed the certificate and the HTTPS site:
    # it then creates snippets/{name}.https-redirect.conf (`return 301 https://$host$request_uri;`);
    # until then the include below matches nothing (the [.] glob) and the site keeps proxying.
    location ^~ /.well-known/acme-challenge/ {{
        root {webroot};
        default_type text/plain;
        try_files $uri =404;
    }}"""


def https_redirect_snippet(name: str) -> str:
    """The include (relative to nginx.conf's directory) that tls.sh fills once HTTPS serves."""
    return f"snippets/{name}.https-redirect.conf"


# cognivern:framePolicy -> (X-Frame-Options, CSP frame-ancestors); "any" sends neither.
FRAME_HEADERS = {"same-origin": ("SAMEORIGIN", "'self'"), "deny": ("DENY", "'none'")}
REFERRER_POLICY = "strict-origin-when-cross-origin"


def security_headers(s: Settings, indent: str) -> str:
    """Headers on every proxied answer: no MIME sniffing, no full URLs leaked as referrers, and the
    frame policy. nginx drops inherited add_header lines in a block that has its own, so the caller
    puts these in the same block as any other add_header."""
    headers = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", REFERRER_POLICY)]
    if s.frame_policy in FRAME_HEADERS:
        frame_options, ancestors = FRAME_HEADERS[s.frame_policy]
        headers += [("X-Frame-Options", frame_options), ("Content-Security-Policy", f"frame-ancestors {ancestors}")]
    return "\n".join(f'{indent}add_header {name} "{value}" always;' for name, value in headers)


def behind_balancer(s: Settings) -> bool:
    """Several servers (ours behind the Hetzner balancer, or `hosts` behind the operator's)."""
    return s.node_count > 1 or bool(s.hosts)


def forwarded_for(s: Settings) -> str:
    """Facing the world, X-Forwarded-For is the peer's address alone: appending would pass on
    whatever the client claimed. Behind a balancer, keep its header and append the balancer."""
    return "$proxy_add_x_forwarded_for" if behind_balancer(s) else "$remote_addr"


def render_upstream(s: Settings, live_port: int) -> str:
    """The upstream file (facts.upstream_text): nginx-site.sh creates it with the blue slot live."""
    return facts.upstream_text(upstream_name(s.app_name), s.port, live_port)


def render_nginx_site(s: Settings, *, domain: str | None = None, acme_webroot: str = ACME_WEBROOT, hsts: bool = False) -> str:
    """The HTTP site. Without a domain: exactly as before TLS existed. With one (TLS mode): plus the
    ACME challenge location and, in every other location, the include that tls.sh turns into a 301.
    `hsts`: behind a balancer that terminates TLS (and redirects HTTP), the app's answers carry HSTS."""
    site = nginx_identifier(s.app_name)
    default = " default_server" if s.server_name == "_" else ""
    listen = "\n".join(f"    listen {item}{default};" for item in s.nginx_listen)
    acme, redirect = "", ""
    if domain is not None:
        name = site_name(s.app_name)
        acme = _ACME_CHALLENGE.format(name=name, webroot=acme_webroot)
        redirect = f"        include {https_redirect_snippet(name).removesuffix('.conf')}[.]conf;"
    return render_template(
        HOST_DIR / "nginx-site.conf",
        {
            "site_name": site,
            "upstream_include": upstream_include(s.app_name),
            "server_name": s.server_name,
            "listen": listen,
            "acme_challenge": acme,
            "https_redirect": redirect,
            "health_path": s.health_path,
            "hsts": f'        add_header Strict-Transport-Security "max-age={HSTS_MAX_AGE}" always;' if hsts else "",
            "security_headers": security_headers(s, " " * 8),
            "forwarded_for": forwarded_for(s),
        },
    )


def render_nginx_tls_site(
    s: Settings,
    domain: str,
    *,
    https_listen: Sequence[str] = HTTPS_LISTEN,
    letsencrypt_dir: str = LETSENCRYPT_DIR,
    http2: bool = True,
    hsts_include_subdomains: bool = False,
) -> str:
    """The HTTPS server block tls.sh installs (stdin) once `letsencrypt_dir/live/<domain>/` exists."""
    site = nginx_identifier(s.app_name)
    params = " ssl http2" if http2 else " ssl"
    listen = "\n".join(f"    listen {item}{params};" for item in https_listen)
    hsts = f"max-age={HSTS_MAX_AGE}" + ("; includeSubDomains" if hsts_include_subdomains else "")
    return render_template(
        HOST_DIR / "nginx-tls.conf",
        {
            "site_name": site,
            "domain": domain,
            "listen": listen,
            "cert_dir": f"{letsencrypt_dir}/live/{domain}",
            "hsts": hsts,
            "health_path": s.health_path,
            "security_headers": security_headers(s, " " * 4),
            "forwarded_for": forwarded_for(s),
        },
    )


@dataclass(frozen=True)
class NginxTarget:
    """The nginx that serves this ROOT: the system's, or a test's private prefix (nginx -p)."""

    conf: str = facts.NGINX_CONF
    prefix: str = ""

    def __post_init__(self) -> None:
        for path in (self.conf, *([self.prefix] if self.prefix else [])):
            if not facts.abs_path(path):  # the tool refuses anything else in cognivern.conf
                raise ValueError(f"nginx path {path!r} must be absolute and normalised")


SYSTEM_NGINX = NginxTarget()


def render_release_conf(s: Settings, nginx: NginxTarget = SYSTEM_NGINX) -> str:
    """config/cognivern.conf: what the server-side release tool needs to know (no secrets)."""
    values = {
        "APP_USER": s.app_user,
        # runs pnpm install (neither root nor the app: its own store, HOME and npmrc)
        "BUILD_USER": facts.build_user(s.app_user),
        "APP_NAME": s.app_name,
        "PORT": str(s.port),
        "HEALTH_PATH": s.health_path,
        "HEALTH_TIMEOUT": str(s.health_timeout),
        "DATA_BACKUPS_KEEP": str(s.data_backups_keep),
        "BAKE_SECONDS": str(s.bake_seconds),
        "KEEP_PREVIOUS_WARM": "true" if s.keep_previous_warm else "false",
        # the apps that move to a release only after its bake (never run from two releases)
        "AGENT_APPS": AGENT_NAME if s.agents_enabled else "",
        # the upstream file the tool rewrites at each switch, and how it tests and reloads that nginx
        "NGINX_CONF": nginx.conf,
        "NGINX_PREFIX": nginx.prefix,
        "NGINX_UPSTREAM": posixpath.join(posixpath.dirname(nginx.conf), upstream_include(s.app_name)),
        "UPSTREAM_NAME": upstream_name(s.app_name),
        # names only: the tool masks these variables' values (from shared/.env) in what it prints
        "SECRET_KEYS": " ".join(sorted(s.secret_env)),
    }
    return facts.format_assignments(values, "# Managed by cognivern-infra (pulumi up): settings for cognivern-release.")
