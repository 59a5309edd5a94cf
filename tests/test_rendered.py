"""What the program renders is accepted by the tools that will read it: nginx, node, shellcheck.

nginx -t runs inside a PrivateNginx prefix (never /etc/nginx); the ecosystem file is checked by
node itself; every shell script in the repository passes `shellcheck -S style`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from components.render import (
    AGENT_NAME,
    https_redirect_snippet,
    render_ecosystem,
    render_nginx_site,
    render_nginx_tls_site,
    site_name,
)
from components.settings import Settings, parse_settings
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
    assert blue["env"] == {"NODE_ENV": "production", "PORT": "4000", "FIXTURE": "x"}
    assert green["env"] == {"NODE_ENV": "production", "PORT": "4001", "FIXTURE": "x"}, "the slot's PORT wins over shared/.env's"
    if agents:
        assert apps[2]["cwd"] == f"{s.root}/releases/r2" and apps[2]["env"] == {"NODE_ENV": "production", "PORT": "4000", "FIXTURE": "x"}
    for app in apps:
        assert str(app["out_file"]).startswith(f"{s.root}/shared/logs/")
    assert "gsk-secret" not in text, "secrets never reach the ecosystem file"


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
