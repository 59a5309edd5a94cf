"""Single-server TLS for real: tls.sh over SSH against Debian's pebble on loopback, through a private nginx.

One TargetHost serves the module (private sshd + private nginx + temp dirs), with its sshd's SetEnv
also pointing certbot's directories and the ACME webroot into the host's temp dir and trusting the
pebble API's CA (REQUESTS_CA_BUNDLE). pebble validates http-01 for real: it resolves the test
domain through pebble-challtestsrv (A 127.0.0.1) and fetches the challenge from the private nginx.
The commands run exactly as the program sends them (components.remote.script_command); the order
of the stages follows the life of a server: ACME unreachable first, then issuance, re-run,
renewals (tests/support/story.py: a test alone or in any order first runs the stages before it).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from components.host import nginx_site_input
from components.remote import script_command
from components.render import (
    HOST_DIR,
    https_redirect_snippet,
    render_nginx_site,
    render_nginx_tls_site,
    site_name,
)
from components.settings import Settings
from tests.support.acme import Pebble
from tests.support.fs import manifest
from tests.support.helpers import free_port, wait_for_port, wait_until
from tests.support.sshd import LocalSshd
from tests.support.story import Story
from tests.support.target_host import TargetHost

TLS = HOST_DIR / "tls.sh"
NGINX_SITE = HOST_DIR / "nginx-site.sh"
DOMAIN = "app.cognivern.test"
EMAIL = "ops@cognivern.test"


# ---------------------------------------------------------------------------- helpers
class Backend(BaseHTTPRequestHandler):
    """A stand-in app: every path answers JSON with what nginx forwarded."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        info = {"status": "ok", "path": self.path, "proto": self.headers.get("X-Forwarded-Proto"), "host": self.headers.get("Host")}
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


story = Story()
story_outcomes = story.fixture()


class Tls:
    """The TLS view of the test host: paths (as tls.sh sees them through SetEnv) and commands."""

    def __init__(self, host: TargetHost, acme: Pebble, https_port: int) -> None:
        self.host, self.acme, self.https_port = host, acme, https_port
        self.le_dir = host.base / "letsencrypt"
        self.le_work = host.base / "letsencrypt-work"
        self.le_logs = host.base / "letsencrypt-logs"
        self.webroot = host.base / "acme-webroot"
        self.settings: Settings = host.settings()
        self.name = site_name(self.settings.app_name)
        self.site = host.nginx.sites_available / f"{self.name}.tls.conf"
        self.link = host.nginx.sites_enabled / f"{self.name}.tls.conf"
        self.snippet = host.nginx.prefix / https_redirect_snippet(self.name)
        self.hook = self.le_dir / "renewal-hooks/deploy/cognivern-nginx-reload"
        self.live = self.le_dir / "live" / DOMAIN

    @property
    def env(self) -> dict[str, str]:
        return {
            "COGNIVERN_LETSENCRYPT_DIR": str(self.le_dir),
            "COGNIVERN_LETSENCRYPT_WORK_DIR": str(self.le_work),
            "COGNIVERN_LETSENCRYPT_LOGS_DIR": str(self.le_logs),
            "COGNIVERN_ACME_WEBROOT": str(self.webroot),
            "REQUESTS_CA_BUNDLE": str(self.acme.api_ca_path),
        }

    def http_site(self) -> str:
        return render_nginx_site(self.settings, domain=DOMAIN, acme_webroot=str(self.webroot))

    def https_site(self) -> str:
        return render_nginx_tls_site(self.settings, DOMAIN, https_listen=[f"127.0.0.1:{self.https_port}"], letsencrypt_dir=str(self.le_dir))

    def command(self, server: str | None = None, **overrides: str) -> str:
        args = {"--name": self.name, "--domain": DOMAIN, "--email": EMAIL, "--server": server or self.acme.directory_url, **overrides}
        return script_command(TLS, [x for pair in args.items() for x in pair])

    def run(self, server: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.host.run(self.command(server), stdin=self.https_site() if stdin is None else stdin)

    def certbot(self, *args: str) -> subprocess.CompletedProcess[str]:
        dirs = ["--config-dir", str(self.le_dir), "--work-dir", str(self.le_work), "--logs-dir", str(self.le_logs)]
        return self.host.run(" ".join(["certbot", *args, *dirs]))

    def context(self) -> ssl.SSLContext:
        """Trust only pebble's issuing root (fetched from its management API); hostnames checked."""
        return ssl.create_default_context(cadata=self.acme.issuing_roots())

    def https_get(self, path: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes, str | None]:
        """GET over TLS to 127.0.0.1 with SNI and Host = DOMAIN (HTTP/1.1, Connection: close)."""
        ctx = context or self.context()
        raw = socket.create_connection(("127.0.0.1", self.https_port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=DOMAIN) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            return int(lines[0].split()[1]), headers, body, tls.version()

    def served_certificate(self) -> bytes:
        ctx = self.context()
        with (
            socket.create_connection(("127.0.0.1", self.https_port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=DOMAIN) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def swap_sshd_env(host: TargetHost, extra: dict[str, str]) -> None:
    """Give the (not yet started) host's sshd more SetEnv overrides, keeping TargetHost's own."""
    old = host.sshd
    assert old is not None and old.pid is None
    env = {**old.set_env, "COGNIVERN_SSHD_CONFIG": "{config}", "COGNIVERN_SSHD_PIDFILE": "{pidfile}", **extra}
    host.sshd = LocalSshd(set_env=env)
    host.env = dict(host.sshd.set_env)
    old.stop()


def http_get(tls: Tls, path: str) -> httpx.Response:
    return httpx.get(tls.host.nginx.url(path), headers={"Host": DOMAIN}, timeout=10, follow_redirects=False)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    host = TargetHost()
    acme: Pebble | None = None
    try:
        acme = Pebble(http_port=host.nginx.port, domains=[DOMAIN])
        t = Tls(host, acme, free_port())
        swap_sshd_env(host, t.env)
        host.start()
        acme.start()
        yield t
    finally:
        if acme is not None:
            acme.stop()
        host.cleanup()


@pytest.fixture(scope="module")
def backend(tls: Tls) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", tls.host.app_port), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def http_site(tls: Tls, backend: ThreadingHTTPServer) -> str:
    """The HTTP site in TLS mode, installed by nginx-site.sh as the program does before tls.sh."""
    text = tls.http_site()
    result = tls.host.run(script_command(NGINX_SITE, ["--name", tls.name]), stdin=nginx_site_input(tls.settings, text))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: http_get(tls, "/health").status_code == 200)
    return text


@pytest.fixture(scope="module")
def issued(tls: Tls, http_site: str) -> subprocess.CompletedProcess[str]:
    result = tls.run()
    assert result.returncode == 0, result.stdout + result.stderr + tls.acme.log()[-3000:]
    # `nginx -s reload` returns before the master has read the new config and opened the https
    # listener (seen refused under load): wait for it with a deadline.
    wait_for_port(tls.https_port, timeout=30)
    return result


# ---------------------------------------------------------------------------- before a certificate
@story.stage
def test_http_site_in_tls_mode_proxies_until_https_exists(tls: Tls, http_site: str) -> None:
    """Until tls.sh has a certificate, HTTP keeps serving the app (no redirect to an HTTPS that is not there)."""
    health = http_get(tls, "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert not tls.snippet.exists()
    probe = tls.webroot / ".well-known/acme-challenge/probe-token"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("probe\n")
    try:
        answer = http_get(tls, "/.well-known/acme-challenge/probe-token")
        assert answer.status_code == 200 and answer.text == "probe\n"
        assert answer.headers["content-type"].startswith("text/plain")
        assert http_get(tls, "/.well-known/acme-challenge/missing").status_code == 404, "never proxied to the app"
    finally:
        probe.unlink()


@story.stage
def test_unreachable_acme_server_leaves_http_serving_and_nginx_untouched(tls: Tls, http_site: str) -> None:
    nginx = tls.host.nginx
    master, workers = nginx.master_pid, nginx.worker_pids()
    before = manifest(nginx.sites_available, nginx.sites_enabled, nginx.prefix / "snippets")
    dead = f"https://127.0.0.1:{free_port()}/dir"
    result = tls.run(server=dead)
    assert result.returncode != 0
    assert "certbot could not obtain a certificate" in result.stderr and "nginx and its sites are untouched" in result.stderr
    assert manifest(nginx.sites_available, nginx.sites_enabled, nginx.prefix / "snippets") == before
    assert not tls.site.exists() and not tls.link.is_symlink() and not tls.snippet.exists()
    assert nginx.master_pid == master and nginx.worker_pids() == workers, "nginx not reloaded"
    assert http_get(tls, "/health").status_code == 200, "HTTP keeps serving the app"
    assert not (tls.live / "fullchain.pem").exists()


# ---------------------------------------------------------------------------- issuance
@story.stage
def test_certificate_issued_and_https_serves_the_backend(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    lines = issued.stdout.splitlines()
    assert all(line.startswith("tls: ") for line in lines), issued.stdout
    assert any(line.startswith(f"tls: certificate: obtained for {DOMAIN} from {tls.acme.directory_url}") for line in lines)
    assert any(line.startswith("tls: https site: ") and line.endswith("reloaded nginx") for line in lines)
    assert f"Attempting to validate w/ HTTP: http://{DOMAIN}:{tls.host.nginx.port}/.well-known/acme-challenge/" in tls.acme.log()
    status, headers, body, version = tls.https_get("/health")
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"
    status, _, body, _ = tls.https_get("/api/x?y=1")
    info = json.loads(body)
    assert status == 200 and info["path"] == "/api/x?y=1" and info["proto"] == "https" and info["host"] == DOMAIN
    assert version in ("TLSv1.2", "TLSv1.3")
    assert headers["server"] == "nginx"
    renewal = (tls.le_dir / "renewal" / f"{DOMAIN}.conf").read_text()
    assert "authenticator = webroot" in renewal and f"server = {tls.acme.directory_url}" in renewal
    assert "installer" not in renewal or "installer = None" in renewal, "certbot never edits nginx"
    assert (tls.host.nginx.sites_available / f"{tls.name}.conf").read_text() == tls.http_site(), "the HTTP site stays ours"


@story.stage
def test_hsts_on_https_only(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    _, headers, _, _ = tls.https_get("/api/x")
    hsts = headers["strict-transport-security"]
    assert hsts == "max-age=31536000"
    assert int(hsts.split("=")[1]) >= 183 * 86400 and "preload" not in hsts
    assert "strict-transport-security" not in http_get(tls, "/.well-known/acme-challenge/x").headers


@story.stage
def test_https_protocols_and_http2(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    ctx = tls.context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", tls.https_port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=DOMAIN) as s:
        assert s.selected_alpn_protocol() == "h2"
        assert s.version() == "TLSv1.3"
    tls12 = tls.context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    status, _, _, version = tls.https_get("/health", tls12)
    assert status == 200 and version == "TLSv1.2"
    # TLS 1.1 is refused by the server (checked with openssl, whose client still offers it at level 0).
    legacy = ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]
    probe = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{tls.https_port}", "-servername", DOMAIN, *legacy],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert probe.returncode != 0 and "alert protocol version" in probe.stderr, probe.stdout + probe.stderr
    # A client that does not trust pebble's root fails: the trust anchor really is the issuer.
    with pytest.raises(ssl.SSLCertVerificationError):
        tls.https_get("/health", ssl.create_default_context(cafile=str(tls.acme.api_ca_path)))


@story.stage
def test_http_redirects_to_https_except_the_challenge(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    assert tls.snippet.read_text().splitlines()[-1] == "return 301 https://$host$request_uri;"
    for path in ("/", "/health", "/api/x?y=1&z=%20"):
        response = http_get(tls, path)
        assert response.status_code == 301, path
        assert response.headers["location"] == f"https://{DOMAIN}{path}"
    probe = tls.webroot / ".well-known/acme-challenge/after-https"
    probe.write_text("still-http\n")
    try:
        answer = http_get(tls, "/.well-known/acme-challenge/after-https")
        assert answer.status_code == 200 and answer.text == "still-http\n"
    finally:
        probe.unlink()


@story.stage
def test_rerun_with_valid_certificate_changes_nothing(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    nginx = tls.host.nginx
    watched = (tls.le_dir, tls.webroot, nginx.sites_available, nginx.sites_enabled, nginx.prefix / "snippets")
    before = manifest(*watched)
    workers, served = nginx.worker_pids(), tls.served_certificate()
    acme_log = tls.acme.log()
    result = tls.run()
    assert result.returncode == 0, result.stderr
    assert manifest(*watched) == before
    assert nginx.worker_pids() == workers, "nginx not reloaded"
    assert tls.served_certificate() == served
    assert tls.acme.log() == acme_log, "no request reached the ACME server"
    lines = result.stdout.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "certbot",
        "webroot",
        "deploy hook",
        "account",
        "certificate",
        "renewal",
        "https site",
    ]
    assert all(("ok (already" in line) or ("unchanged" in line) or line.startswith("tls: renewal:") for line in lines), result.stdout
    assert f"tls: https site: {tls.site} unchanged (nginx not reloaded)" in lines


@story.stage
def test_changed_email_updates_the_account_only(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    nginx = tls.host.nginx
    workers, served = nginx.worker_pids(), tls.served_certificate()
    accounts = tls.le_dir / "accounts" / tls.acme.directory_url.removeprefix("https://")
    result = tls.host.run(tls.command(**{"--email": "new-ops@cognivern.test"}), stdin=tls.https_site())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tls: account: email set to new-ops@cognivern.test" in result.stdout
    assert "tls: certificate: ok (already;" in result.stdout
    assert "POST /my-account/" in tls.acme.log(), "the account was updated at the ACME server"
    state = (tls.le_dir / "cognivern-acme-accounts").read_text()
    assert state == f"{tls.acme.directory_url} new-ops@cognivern.test\n"
    assert len([p for p in accounts.iterdir() if p.is_dir()]) == 1, "the same account, not a new one"
    assert nginx.worker_pids() == workers and tls.served_certificate() == served
    back = tls.run()
    assert back.returncode == 0 and f"tls: account: email set to {EMAIL}" in back.stdout
    assert "tls: account: ok (already" in tls.run().stdout


# ---------------------------------------------------------------------------- renewal
@story.stage
def test_renewal_dry_run_succeeds_and_would_run_the_hook(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    assert tls.hook.stat().st_mode & 0o777 == 0o755
    # --dry-run alone would switch to Let's Encrypt staging: name the server, as an operator would.
    result = tls.certbot("renew", "--dry-run", "--no-random-sleep-on-renew", "--server", tls.acme.directory_url)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "all simulated renewals succeeded" in out
    # certbot logs (letsencrypt.log) that it found the hook and skipped it, as dry runs do.
    assert f"Dry run: skipping deploy hook command: {tls.hook}" in (tls.le_logs / "letsencrypt.log").read_text()


@story.stage
def test_renewal_runs_deploy_hook_which_reloads_nginx(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    nginx = tls.host.nginx
    workers, served = nginx.worker_pids(), tls.served_certificate()
    result = tls.certbot("renew", "--force-renewal", "--no-random-sleep-on-renew")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "cognivern-nginx-reload: nginx reloaded for" in out
    wait_until(lambda: nginx.worker_pids() and nginx.worker_pids().isdisjoint(workers))
    assert wait_until(lambda: tls.served_certificate() != served), "nginx serves the renewed certificate"
    status, _, _, _ = tls.https_get("/health")
    assert status == 200


@story.stage
def test_deploy_hook_does_not_reload_a_broken_config(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    nginx = tls.host.nginx
    broken = nginx.sites_enabled / "zz-broken.conf"
    broken.write_text("bogus_directive;\n")
    try:
        workers = nginx.worker_pids()
        result = tls.host.run(str(tls.hook))
        assert result.returncode != 0 and "nginx not reloaded" in result.stderr
        assert nginx.worker_pids() == workers
    finally:
        broken.unlink()


# ---------------------------------------------------------------------------- failures and arguments
@story.stage
def test_https_site_rejected_by_nginx_restores_previous(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    nginx = tls.host.nginx
    before = manifest(nginx.sites_available, nginx.sites_enabled, nginx.prefix / "snippets")
    master, workers = nginx.master_pid, nginx.worker_pids()
    broken = tls.https_site().replace("server_tokens off;", "server_tokens off;\n    bogus_directive on;")
    result = tls.run(stdin=broken)
    assert result.returncode != 0
    assert "bogus_directive" in result.stderr and "nginx -t rejected the HTTPS site" in result.stderr
    assert tls.site.read_text() == tls.https_site()
    after = manifest(nginx.sites_available, nginx.sites_enabled, nginx.prefix / "snippets")
    assert {k: v[:4] + v[5:] for k, v in after.items()} == {k: v[:4] + v[5:] for k, v in before.items()}, "same files (mtimes aside)"
    assert nginx.master_pid == master and nginx.worker_pids() == workers
    assert tls.https_get("/health")[0] == 200


@story.stage
def test_https_site_for_another_letsencrypt_dir_is_refused(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    production = render_nginx_tls_site(tls.settings, DOMAIN)  # /etc/letsencrypt: not where this host keeps certificates
    result = tls.run(stdin=production)
    assert result.returncode != 0 and f"does not use {tls.live}/fullchain.pem" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"--domain": "App.Example.com"}, "--domain must be a lowercase DNS name"),
        ({"--domain": "*.example.com"}, "--domain must be a lowercase DNS name"),
        ({"--domain": "localhost"}, "--domain must be a lowercase DNS name"),
        ({"--email": "not-an-address"}, "--email must be an address"),
        ({"--email": "a@b.c;rm -rf /"}, "--email must be an address"),
        ({"--server": "http://acme.example/dir"}, "--server must be an https:// ACME directory URL"),
        ({"--name": "../etc"}, "--name must be"),
    ],
)
def test_rejects_bad_arguments(tls: Tls, http_site: str, overrides: dict[str, str], message: str) -> None:
    result = tls.host.run(tls.command(**overrides), stdin=tls.https_site())
    assert result.returncode != 0 and message in result.stderr, result.stderr


@story.stage
def test_requires_the_http_site_in_tls_mode(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    result = tls.host.run(tls.command(**{"--name": "other-site"}), stdin=tls.https_site())
    assert result.returncode != 0 and "install the HTTP site" in result.stderr
    plain = tls.host.nginx.sites_available / "plain-site.conf"
    plain.write_text(render_nginx_site(tls.settings))  # rendered without the domain: no challenge location
    try:
        result = tls.host.run(tls.command(**{"--name": "plain-site"}), stdin=tls.https_site())
        assert result.returncode != 0 and "has no ACME challenge location" in result.stderr
    finally:
        plain.unlink()
    assert not (tls.host.nginx.sites_available / "other-site.tls.conf").exists()


@story.stage
def test_changed_acme_server_replaces_the_certificate_and_reloads(tls: Tls, issued: subprocess.CompletedProcess[str]) -> None:
    """A new acmeServer (here: the same pebble under another URL) replaces a valid certificate.

    The HTTPS site itself is unchanged, so only the new certificate makes tls.sh reload nginx.
    """
    nginx = tls.host.nginx
    workers, served = nginx.worker_pids(), tls.served_certificate()
    other = tls.acme.directory_url.replace("127.0.0.1", "localhost")
    result = tls.run(server=other)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tls: certificate: obtained for {DOMAIN} from {other} (issued by {tls.acme.directory_url}, not {other})" in result.stdout
    assert f"tls: https site: {tls.site} unchanged, certificate renewed" in result.stdout
    assert f"server = {other}" in (tls.le_dir / "renewal" / f"{DOMAIN}.conf").read_text()
    wait_until(lambda: nginx.worker_pids() and nginx.worker_pids().isdisjoint(workers))
    assert tls.served_certificate() != served
    again = tls.run(server=other)
    assert again.returncode == 0 and f"tls: https site: {tls.site} unchanged (nginx not reloaded)" in again.stdout


# ---------------------------------------------------------------------------- rendering
def test_https_block_proxies_exactly_like_the_http_site(tls: Tls) -> None:
    """The location blocks are duplicated between the two templates; they must not drift apart.

    Response headers differ by design: the HTTPS site sets them at server level beside HSTS, the
    HTTP site inside `location /` (tests/test_security_headers.py checks both on real answers)."""

    def proxying(site: str) -> list[str]:
        return [line for line in site[site.index("    client_max_body_size") :].splitlines() if "add_header" not in line]

    assert proxying(tls.https_site()) == proxying(render_nginx_site(tls.settings))


def test_tls_script_is_sent_like_the_other_host_scripts() -> None:
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "tls.sh"
        copy.write_text(TLS.read_text())
        assert script_command(copy, ["--name", "x"]) == script_command(TLS, ["--name", "x"])
    assert "sudo -n bash -c" in script_command(TLS, ["--name", "x"], sudo=True)
