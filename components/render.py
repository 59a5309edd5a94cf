"""Render the files the host receives from the templates beside each component.

Templates use `{{ name }}` placeholders (nginx's own `$vars` stay untouched); every placeholder
must be supplied and every supplied value used, so a typo fails loudly at render time.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

from components.settings import Settings

HERE = Path(__file__).resolve().parent
HOST_DIR = HERE / "host"
SERVER_DIR = HERE / "server"
RELEASE_DIR = HERE / "release"

_PLACEHOLDER = re.compile(r"\{\{ ([a-z_]+) \}\}")
AGENT_NAME = "forecasting-agent"
AGENT_SCRIPT = "./dist/services/AutomatedForecastingService.js"


def render_template(path: Path, values: Mapping[str, str]) -> str:
    text = path.read_text()
    wanted = set(_PLACEHOLDER.findall(text))
    missing, unused = wanted - set(values), set(values) - wanted
    if missing or unused:
        raise ValueError(f"{path.name}: missing {sorted(missing)}, unused {sorted(unused)}")
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


def render_nginx_site(s: Settings) -> str:
    site = re.sub(r"[^A-Za-z0-9_]", "_", s.app_name)
    default = " default_server" if s.server_name == "_" else ""
    listen = "\n".join(f"    listen {item}{default};" for item in s.nginx_listen)
    return render_template(
        HOST_DIR / "nginx-site.conf",
        {"site_name": site, "port": str(s.port), "server_name": s.server_name, "listen": listen},
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
    }
    lines = ["# Managed by cognivern-infra (pulumi up): settings for cognivern-release."]
    lines += [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
