"""nginx exposure defaults on real answers: security headers, the frame policy, and X-Forwarded-For.

Each site is rendered by the program, passes `nginx -t` in a private nginx, and then answers a
real request, proxied to a small upstream on loopback that reports the headers it received.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from components.render import render_nginx_site, render_nginx_tls_site
from components.settings import Settings, parse_settings
from tests.support.helpers import http_get
from tests.support.nginx import PrivateNginx
from tests.support.sshd import free_port

SPOOFED = "198.51.100.66"
DOMAIN = "api.example.com"


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"x-forwarded-for": self.headers.get("X-Forwarded-For")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def settings(upstream: int, nginx: PrivateNginx, **values: Any) -> Settings:
    raw: dict[str, Any] = {"release": "r1", "host": "192.0.2.10", "port": upstream, "nginxListen": [f"127.0.0.1:{nginx.port}"], **values}
    cfg = {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    return parse_settings(cfg.get)


def serve(nginx: PrivateNginx, *sites: str, upstream: Settings) -> None:
    for index, text in enumerate(sites):
        (nginx.sites_enabled / f"site{index}.conf").write_text(text)
    nginx.write_upstream(upstream)
    result = nginx.test_config()
    assert result.returncode == 0, result.stderr
    nginx.start()


def test_one_server_facing_the_world_sends_security_headers_and_only_the_peer_as_forwarded_for(nginx: PrivateNginx, upstream: int) -> None:
    s = settings(upstream, nginx)
    serve(nginx, render_nginx_site(s), upstream=s)
    response = http_get(nginx.url("/"), headers={"X-Forwarded-For": SPOOFED}, timeout=10)
    assert response.status_code == 200
    assert response.json() == {"x-forwarded-for": "127.0.0.1"}, "a client's own X-Forwarded-For must not reach the app"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert response.headers["Content-Security-Policy"] == "frame-ancestors 'self'"


def test_behind_a_balancer_its_forwarded_for_is_kept(nginx: PrivateNginx, upstream: int) -> None:
    s = settings(upstream, nginx, host="", hosts=["192.0.2.10", "192.0.2.11"])
    serve(nginx, render_nginx_site(s), upstream=s)
    response = http_get(nginx.url("/"), headers={"X-Forwarded-For": SPOOFED}, timeout=10)
    assert response.json() == {"x-forwarded-for": f"{SPOOFED}, 127.0.0.1"}
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(("policy", "frame_options", "csp"), [("deny", "DENY", "frame-ancestors 'none'"), ("any", None, None)])
def test_the_frame_policy_is_configurable(
    nginx: PrivateNginx, upstream: int, policy: str, frame_options: str | None, csp: str | None
) -> None:
    s = settings(upstream, nginx, framePolicy=policy)
    serve(nginx, render_nginx_site(s), upstream=s)
    response = http_get(nginx.url("/"), timeout=10)
    assert response.headers.get("X-Frame-Options") == frame_options
    assert response.headers.get("Content-Security-Policy") == csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_a_balancer_terminating_tls_gets_hsts_and_the_headers_together(nginx: PrivateNginx, upstream: int) -> None:
    """Control for nginx's add_header inheritance: HSTS and the security headers share one block."""
    s = settings(upstream, nginx)
    serve(nginx, render_nginx_site(s, hsts=True), upstream=s)
    response = http_get(nginx.url("/"), timeout=10)
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert response.headers["X-Frame-Options"] == "SAMEORIGIN"


def test_the_https_site_sends_hsts_and_the_headers_and_only_the_peer_as_forwarded_for(
    nginx: PrivateNginx, upstream: int, tmp_path: Path
) -> None:
    live = tmp_path / "live" / DOMAIN
    live.mkdir(parents=True)
    key, cert = str(live / "privkey.pem"), str(live / "fullchain.pem")
    req = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]
    subprocess.run([*req, "-subj", f"/CN={DOMAIN}", "-keyout", key, "-out", cert], check=True, capture_output=True)
    s = settings(upstream, nginx, domain=DOMAIN, acmeEmail="ops@example.com")
    https_port = free_port()
    tls = render_nginx_tls_site(s, DOMAIN, https_listen=[f"127.0.0.1:{https_port}"], letsencrypt_dir=str(tmp_path), http2=False)
    serve(nginx, render_nginx_site(s, domain=DOMAIN, acme_webroot=str(tmp_path / "webroot")), tls, upstream=s)
    with httpx.Client(verify=False, timeout=10) as client:  # noqa: S501 (a throwaway self-signed certificate)
        response = client.get(f"https://127.0.0.1:{https_port}/", headers={"Host": DOMAIN, "X-Forwarded-For": SPOOFED})
    assert response.json() == {"x-forwarded-for": "127.0.0.1"}
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert response.headers["Content-Security-Policy"] == "frame-ancestors 'self'"
