"""Render the files the host receives from the templates beside each component.

Templates use `{{ name }}` placeholders (nginx's own `$vars` stay untouched); every placeholder
must be supplied and every supplied value used, so a typo fails loudly at render time. A line that
holds nothing but one placeholder disappears (newline included) when that value is empty, so an
optional section leaves no trace in the output.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from components.settings import Settings

HERE = Path(__file__).resolve().parent
HOST_DIR = HERE / "host"
SERVER_DIR = HERE / "server"
RELEASE_DIR = HERE / "release"

_PLACEHOLDER = re.compile(r"\{\{ ([a-z_]+) \}\}")
_PLACEHOLDER_LINE = re.compile(r"^[ \t]*\{\{ ([a-z_]+) \}\}[ \t]*\n", re.MULTILINE)
AGENT_NAME = "forecasting-agent"
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
    """shared/.env: one KEY=value per line, values shell-quoted so `set -a; . .env` is exact."""
    lines = ["# Managed by cognivern-infra (pulumi up). Do not edit: changes are overwritten."]
    for key, value in {**stack_env, **secret_env}.items():
        lines.append(f"{key}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def render_ecosystem(s: Settings) -> str:
    """PM2 ecosystem: cluster mode so `pm2 reload` replaces workers without dropping requests."""
    logs = f"{s.root}/shared/logs"
    common = {
        "cwd": f"{s.root}/current",
        "env": {"NODE_ENV": "production"},
        "log_date_format": "YYYY-MM-DD HH:mm:ss",
        "merge_logs": True,
        "max_memory_restart": "1G",
        "kill_timeout": s.kill_timeout_ms,
    }
    apps: list[dict[str, object]] = [
        {
            "name": s.app_name,
            "script": "./dist/index.js",
            "instances": s.instances,
            "exec_mode": "cluster",
            "wait_ready": s.wait_ready,
            "listen_timeout": s.listen_timeout_ms,
            "error_file": f"{logs}/error.log",
            "out_file": f"{logs}/out.log",
            **common,
        }
    ]
    if s.agents_enabled:
        apps.append(
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
        {"apps": json.dumps(apps, indent=2), "env_file": json.dumps(f"{s.root}/shared/.env")},
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


# What site_name returns for every valid cognivern:appName; lib.sh's valid_site_name checks the
# same (tests/test_validators_agree.py feeds both the same values).
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


def site_name(app_name: str) -> str:
    """The nginx site's name (sites-available/NAME.conf, nginx-site.sh / tls.sh `--name`): the app
    name with every character but A-Z a-z 0-9 _ - replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", app_name)


def nginx_identifier(app_name: str) -> str:
    """The prefix of the names the site defines (upstream, map variable, TLS session cache): the
    site name without `-`, which would end an nginx variable name (`$a-b_x` is `$a` then `-b_x`)."""
    return site_name(app_name).replace("-", "_")


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
            "port": str(s.port),
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


def render_release_conf(s: Settings) -> str:
    """config/cognivern.conf: what the server-side release tool needs to know (no secrets)."""
    values = {
        "APP_USER": s.app_user,
        "APP_NAME": s.app_name,
        "PORT": str(s.port),
        "HEALTH_PATH": s.health_path,
        "HEALTH_TIMEOUT": str(s.health_timeout),
        "KEEP_RELEASES": str(s.keep_releases),
        "DATA_BACKUPS_KEEP": str(s.data_backups_keep),
        # names only: the tool masks these variables' values (from shared/.env) in what it prints
        "SECRET_KEYS": " ".join(sorted(s.secret_env)),
    }
    lines = ["# Managed by cognivern-infra (pulumi up): settings for cognivern-release."]
    lines += [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
