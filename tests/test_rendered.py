"""What the program renders is accepted by the tools that will read it: nginx, node, shellcheck.

nginx -t runs inside a PrivateNginx prefix (never /etc/nginx); the ecosystem file is checked by
node itself; every shell script in the repository passes `shellcheck -S style`.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from components.render import (
    AGENT_NAME,
    ENV_PRELOAD,
    env_preload_path,
    https_redirect_snippet,
    render_ecosystem,
    render_nginx_site,
    render_nginx_tls_site,
    site_name,
)
from components.settings import Settings, parse_settings
from tests.support.helpers import free_port_pair
from tests.support.nginx import PrivateNginx

REPO = Path(__file__).resolve().parents[1]
BASE = {"release": "r1", "host": "192.0.2.10"}


def settings(**values: object) -> Settings:
    """Settings from raw values; a `root` is set after validation: the tests render into tmp_path,
    which the settings refuse as a ROOT (it is under the sticky /tmp), and rendering does not care."""
    root = values.pop("root", None)
    raw = {**BASE, **values}
    cfg = {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    parsed = parse_settings(cfg.get)
    return parsed if root is None else dataclasses.replace(parsed, root=str(root))


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"serverName": "api.example.com", "nginxListen": ["127.0.0.1:8080", "[::1]:8080"]},
        {"appName": "cognivern.agent-2", "port": "4000"},
    ],
    ids=["defaults", "named-server", "dotted-app-name"],
)
def test_nginx_site_passes_nginx_t(nginx: PrivateNginx, values: dict[str, object]) -> None:
    s = settings(**values)
    text = render_nginx_site(s)
    (nginx.sites_enabled / "site.conf").write_text(text)
    nginx.write_upstream(s)
    result = nginx.test_config()
    assert result.returncode == 0, result.stderr
    assert "server_tokens off;" in text
    assert (" default_server;" in text) == (s.server_name == "_")


def test_nginx_t_catches_a_broken_site(nginx: PrivateNginx) -> None:
    broken = render_nginx_site(settings()).replace("client_max_body_size 10m;", "client_max_body_size;")
    (nginx.sites_enabled / "site.conf").write_text(broken)
    nginx.write_upstream(settings())
    assert nginx.test_config().returncode != 0


@pytest.fixture
def letsencrypt(tmp_path: Path) -> Path:
    """A certbot-like config dir with a self-signed certificate for every domain the TLS tests use."""
    for domain in ("api.example.com", "app.example.org"):
        live = tmp_path / "letsencrypt" / "live" / domain
        live.mkdir(parents=True)
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"),
                *("-subj", f"/CN={domain}", "-addext", f"subjectAltName=DNS:{domain}"),
                *("-keyout", str(live / "privkey.pem"), "-out", str(live / "fullchain.pem")),
            ],
            check=True,
            capture_output=True,
        )
    return tmp_path / "letsencrypt"


@pytest.mark.parametrize(
    ("values", "domain", "tls_options"),
    [
        ({}, "api.example.com", {}),
        ({"serverName": "api.example.com", "nginxListen": ["127.0.0.1:8080", "[::1]:8080"]}, "api.example.com", {"http2": False}),
        ({"appName": "cognivern.agent-2", "port": "4000"}, "app.example.org", {"hsts_include_subdomains": True}),
    ],
    ids=["defaults", "named-server-no-http2", "dotted-app-name-subdomains"],
)
@pytest.mark.parametrize("https_live", [False, True], ids=["before-certificate", "https-live"])
def test_tls_sites_pass_nginx_t(
    nginx: PrivateNginx, letsencrypt: Path, values: dict[str, object], domain: str, tls_options: dict[str, bool], https_live: bool
) -> None:
    """The TLS-mode HTTP site alone (before the certificate), then with the HTTPS block and redirect snippet tls.sh adds."""
    s = settings(**values)
    name = site_name(s.app_name)
    http = render_nginx_site(s, domain=domain, acme_webroot="/var/www/letsencrypt")
    (nginx.sites_enabled / f"{name}.conf").write_text(http)
    nginx.write_upstream(s)
    assert "location ^~ /.well-known/acme-challenge/ {" in http and "root /var/www/letsencrypt;" in http
    assert http.count(f"include {https_redirect_snippet(name).removesuffix('.conf')}[.]conf;") == 2
    if https_live:
        https = render_nginx_tls_site(
            s,
            domain,
            letsencrypt_dir=str(letsencrypt),
            http2=tls_options.get("http2", True),
            hsts_include_subdomains=tls_options.get("hsts_include_subdomains", False),
        )
        (nginx.sites_enabled / f"{name}.tls.conf").write_text(https)
        snippet = nginx.prefix / https_redirect_snippet(name)
        snippet.parent.mkdir()
        snippet.write_text("return 301 https://$host$request_uri;\n")
        assert ("http2;" in https) == tls_options.get("http2", True)
        assert "ssl_protocols TLSv1.2 TLSv1.3;" in https and "preload" not in https
        assert ("includeSubDomains" in https) == tls_options.get("hsts_include_subdomains", False)
    result = nginx.test_config()
    assert result.returncode == 0, result.stderr


def test_http_site_without_domain_has_no_tls_parts() -> None:
    text = render_nginx_site(settings())
    assert text == render_nginx_site(settings(), domain=None)
    includes = [line.strip() for line in text.splitlines() if "include" in line and not line.lstrip().startswith("#")]
    assert includes == ["include sites-available/cognivern-agent.upstream;"], "only the upstream file, no https redirect"
    assert "acme-challenge" not in text and "\n\n\n" not in text


def test_tls_site_without_certificate_fails_nginx_t(nginx: PrivateNginx, tmp_path: Path) -> None:
    """Why tls.sh installs the HTTPS block only after certbot succeeded."""
    s = settings()
    (nginx.sites_enabled / "site.conf").write_text(render_nginx_site(s, domain="api.example.com"))
    nginx.write_upstream(s)
    (nginx.sites_enabled / "site.tls.conf").write_text(render_nginx_tls_site(s, "api.example.com", letsencrypt_dir=str(tmp_path)))
    result = nginx.test_config()
    assert result.returncode != 0 and "fullchain.pem" in result.stderr


def node_apps(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[dict[str, object]]:
    path = tmp_path / "ecosystem.config.cjs"
    path.write_text(text)
    check = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    out = subprocess.run(
        ["node", "-e", "process.stdout.write(JSON.stringify(require(process.argv[1]).apps))", str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})},
    )
    apps = json.loads(out.stdout)
    assert isinstance(apps, list)
    return apps


@pytest.mark.parametrize("agents", [False, True])
def test_ecosystem_is_valid_node_with_expected_apps(tmp_path: Path, agents: bool) -> None:
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "shared" / ".env").write_text("PORT=4000\nFIXTURE=x\n")
    state = {"slots": {"live": "green", "blue": "r1", "green": "r2", "agent": "r2"}}
    (root / "config" / "state.json").write_text(json.dumps(state))
    s = settings(
        root=str(root),
        port="4000",
        agentsEnabled="true" if agents else "false",
        instances="2",
        waitReady="true",
        secretEnv={"GROQ_API_KEY": "gsk-secret"},
    )
    text = render_ecosystem(s)
    # what cognivern-release gives PM2 from shared/.env (parsed as data), plus one variable not from it
    apps = node_apps(tmp_path, text, {"PORT": "4000", "FIXTURE": "x", "COGNIVERN_ENV_KEYS": "PORT FIXTURE", "OTHER": "y"})
    names = [a["name"] for a in apps]
    slots = [f"{s.app_name}-blue", f"{s.app_name}-green"]
    assert names == ([*slots, AGENT_NAME] if agents else slots)
    blue, green = apps[0], apps[1]
    for main in (blue, green):
        assert main["exec_mode"] == "cluster" and main["instances"] == 2 and main["wait_ready"] is True
        assert main["script"] == "./dist/index.js"
    assert blue["cwd"] == f"{s.root}/releases/r1" and green["cwd"] == f"{s.root}/releases/r2"
    # each .env variable marked, and the list of them, for env-preload.cjs (a removed one leaves the app)
    marks = {"COGNIVERN_ENV_KEY_PORT": "1", "COGNIVERN_ENV_KEY_FIXTURE": "1", "COGNIVERN_ENV_KEYS": "PORT FIXTURE"}
    assert blue["env"] == {"NODE_ENV": "production", "PORT": "4000", "FIXTURE": "x", **marks}
    assert green["env"] == {"NODE_ENV": "production", "PORT": "4001", "FIXTURE": "x", **marks}, "the slot's PORT wins over shared/.env's"
    if agents:
        assert apps[2]["cwd"] == f"{s.root}/releases/r2"
        assert apps[2]["env"] == {"NODE_ENV": "production", "PORT": "4000", "FIXTURE": "x", **marks}
    for app in apps:
        assert str(app["out_file"]).startswith(f"{s.root}/shared/logs/")
        assert app["node_args"] == ["--require", env_preload_path(s.root)]
    assert "gsk-secret" not in text, "secrets never reach the ecosystem file"


def test_ecosystem_run_by_anything_but_the_tool_marks_nothing(tmp_path: Path) -> None:
    """Without COGNIVERN_ENV_KEYS (an operator's own `pm2 reload` of the file) the apps get no
    variable, no marker and no list: PM2 keeps their environment, and env-preload.cjs drops nothing."""
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    state = {"slots": {"live": "blue", "blue": "r1", "green": None, "agent": None}}
    (root / "config" / "state.json").write_text(json.dumps(state))
    s = settings(root=str(root), port="4000")
    apps = node_apps(tmp_path, render_ecosystem(s), {"FIXTURE": "x"})
    assert [a["env"] for a in apps] == [{"NODE_ENV": "production", "PORT": "4000"}]


def preloaded_env(env: dict[str, str]) -> dict[str, str]:
    """The environment a process sees after env-preload.cjs (node --require, as PM2 starts the apps)."""
    code = "process.stdout.write(JSON.stringify(process.env))"
    out = subprocess.run(["node", "--require", str(ENV_PRELOAD), "-e", code], capture_output=True, text=True, check=True, env=env)
    seen: dict[str, str] = json.loads(out.stdout)
    return seen


STALE = {"OLD": "stale", "COGNIVERN_ENV_KEY_OLD": "1"}  # once in .env, kept by PM2 after its removal
CURRENT = {"KEPT": "x", "COGNIVERN_ENV_KEY_KEPT": "1", "COGNIVERN_ENV_KEYS": "KEPT"}


def test_env_preload_drops_variables_removed_from_env_in_cluster_mode() -> None:
    """A cluster worker gets its environment as JSON in `pm2_env`, which PM2's wrapper copies into process.env after the preload."""
    pm2_env = {**STALE, **CURRENT, "OTHER": "kept", "pm_id": 0, "env": {**CURRENT}}
    seen = json.loads(preloaded_env({"PATH": "/usr/bin:/bin", "pm2_env": json.dumps(pm2_env)})["pm2_env"])
    assert {k: v for k, v in seen.items() if k != "env"} == {"KEPT": "x", "OTHER": "kept", "pm_id": 0}


def test_env_preload_drops_variables_removed_from_env_in_fork_mode() -> None:
    """The agent (fork mode) gets the variables themselves."""
    seen = preloaded_env({"PATH": "/usr/bin:/bin", **STALE, **CURRENT, "OTHER": "kept"})
    assert {k: seen.get(k) for k in ("OLD", "KEPT", "OTHER", "COGNIVERN_ENV_KEYS", "COGNIVERN_ENV_KEY_KEPT")} == {
        "OLD": None,
        "KEPT": "x",
        "OTHER": "kept",
        "COGNIVERN_ENV_KEYS": None,
        "COGNIVERN_ENV_KEY_KEPT": None,
    }


def test_env_preload_leaves_an_unmarked_environment_alone() -> None:
    """Apps started by an ecosystem from before the markers: nothing is known, nothing is dropped."""
    seen = preloaded_env({"PATH": "/usr/bin:/bin", **STALE, "KEPT": "x"})
    assert seen["OLD"] == "stale" and seen["KEPT"] == "x"
    broken = preloaded_env({"PATH": "/usr/bin:/bin", "pm2_env": "{not json", "KEPT": "x"})
    assert broken["pm2_env"] == "{not json" and broken["KEPT"] == "x"


def test_ecosystem_without_a_state_runs_blue_and_the_agent_on_current(tmp_path: Path) -> None:
    """A host prepared before the slots (the tool has not written its state yet): blue runs where
    the single app was."""
    root = tmp_path / "root"
    (root / "releases" / "r0").mkdir(parents=True)
    (root / "current").symlink_to("releases/r0")
    s = settings(root=str(root), agentsEnabled="true")
    apps = node_apps(tmp_path, render_ecosystem(s))
    assert [(a["name"], a["cwd"]) for a in apps] == [
        (f"{s.app_name}-blue", f"{s.root}/releases/r0"),
        (AGENT_NAME, f"{s.root}/releases/r0"),
    ]


def test_ecosystem_ignores_a_slot_value_that_is_not_a_release_id(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    slots = {"live": "blue", "blue": "../../etc", "green": None, "agent": "r1\n"}
    (root / "config" / "state.json").write_text(json.dumps({"slots": slots}))
    apps = node_apps(tmp_path, render_ecosystem(settings(root=str(root))))
    assert apps == []


def shell_scripts() -> list[str]:
    tracked = subprocess.run(["git", "ls-files", "-z", "--", "*.sh"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted(p for p in tracked.split("\0") if p)


@pytest.mark.parametrize("script", shell_scripts())
def test_shellcheck(script: str) -> None:
    result = subprocess.run(["shellcheck", "-S", "style", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_request_the_live_slot_resets_is_retried_on_the_live_slot_not_the_stopped_backup(nginx: PrivateNginx) -> None:
    """A graceful reload of the live slot ends its old worker, which closes its idle keepalive
    connections: a request nginx has just written on one of them is reset. nginx retries it on a
    server not yet tried; with the live slot listed once that was the stopped backup (502). Here the
    live slot resets the first request it reads (SO_LINGER 0, as a close with unread data does) and
    answers the rest; the other slot is not listening."""
    port = free_port_pair()
    s = settings(port=str(port), nginxListen=[f"127.0.0.1:{nginx.port}"])
    (nginx.sites_enabled / "site.conf").write_text(render_nginx_site(s))
    nginx.write_upstream(s, live_port=port)
    seen: list[str] = []
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(10)

    def serve() -> None:
        with listener:
            while len(seen) < 2:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)
                    if not seen:
                        seen.append("reset")
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        continue
                    seen.append("answered")
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n"
                        b'Connection: close\r\n\r\n{"status":"ok"}'
                    )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        nginx.start()
        answer = httpx.get(nginx.url("/release"), timeout=10)
    finally:
        listener.close()
        thread.join(5)
    assert seen == ["reset", "answered"], seen
    assert answer.status_code == 200, (answer.status_code, nginx.error_log.read_text())
