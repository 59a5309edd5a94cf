"""Single-server TLS through the real `pulumi up`: `cognivern:domain` gets a certificate and HTTPS serves.

One host in its own network and mount namespaces (tests/support/netns_host.py), so the program's
production paths hold unchanged: nginx listens on 80 and 443 of the namespace, and certbot and
nginx use /etc/letsencrypt and /var/www/letsencrypt, private copies bound over the machine's
directories inside the namespace only. The ACME server is Debian's pebble in the root namespace,
on the host's veth peer address, its DNS (pebble-challtestsrv) resolving the domain to the host, so
http-01 is validated for real against the host's nginx on port 80. The stack sets
`cognivern:domain`, `acmeEmail` and `acmeServer` (the pebble directory) as the README says, and one
`pulumi up` (tests/support/real_engine.py) prepares the host, deploys a release and runs tls.sh;
then HTTPS answers for the domain with a certificate pebble issued, and HTTP redirects to it.
The script-level behaviours of tls.sh (re-runs, renewals, failures): tests/test_tls.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.acme import Pebble
from tests.support.netns_host import NetnsHost, NetnsHosts
from tests.support.real_engine import RunReport
from tests.support.release_host import FIXTURE_APP
from tests.support.stack import DeployStack

DOMAIN = "app.cognivern.test"
EMAIL = "ops@cognivern.test"
RELEASE = "tls-v1"
HTTPS_PORT = 443  # the program's own: the rendered HTTPS site listens on 443 and [::]:443

pytestmark = pytest.mark.needs_root("network and mount namespaces, bind mounts, a test user")


class TlsStack(DeployStack):
    def __init__(self, pool: NetnsHosts, acme: Pebble, tmp: Path) -> None:
        self.pool, self.acme = pool, acme
        super().__init__(self.host_config, tmp)

    @property
    def host(self) -> NetnsHost:
        return self.pool.hosts[0]

    def host_config(self, **values: Any) -> dict[str, str]:
        """One existing host (`host`, pinned), nginx on its default listen addresses, TLS for DOMAIN from pebble."""
        host = self.host
        assert host.sshd is not None
        tls = {"domain": DOMAIN, "acmeEmail": EMAIL, "acmeServer": self.acme.directory_url}
        return self.pool.config(host=host.address, hostKey=host.sshd.host_key, hosts=None, hostKeys=None, nginxListen=None, **tls, **values)

    def https_get(self, path: str) -> tuple[int, dict[str, str], bytes, dict[str, Any]]:
        """GET over TLS to the host's 443 with SNI and Host = DOMAIN, trusting only pebble's issuing root."""
        context = ssl.create_default_context(cadata=self.acme.issuing_roots())
        with (
            socket.create_connection((self.host.address, HTTPS_PORT), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=DOMAIN) as tls,
        ):
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            certificate = tls.getpeercert()
            assert certificate is not None
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body, certificate


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsStack, RunReport]]:
    binds = (Path("/etc/letsencrypt"), Path("/var/www"))
    env = {
        "COGNIVERN_LETSENCRYPT_WORK_DIR": "{base}/letsencrypt-work",  # certbot's --work-dir and --logs-dir (rendered nowhere)
        "COGNIVERN_LETSENCRYPT_LOGS_DIR": "{base}/letsencrypt-logs",
        "REQUESTS_CA_BUNDLE": "{base}/acme-api-ca.pem",  # certbot trusts pebble's API (written below, once pebble exists)
    }
    with NetnsHosts(1, binds=binds, env=env) as pool:
        host = pool.hosts[0]
        acme = Pebble(http_port=80, domains=[DOMAIN], address=host.peer, resolve_to=host.address)
        try:
            shutil.copy(acme.api_ca_path, host.base / "acme-api-ca.pem")
            acme.start()
            pool.seed_pnpm_store(FIXTURE_APP)  # the namespace has no route off the machine
            stack = TlsStack(pool, acme, tmp_path_factory.mktemp("tls-engine"))
            report = stack.up(release=RELEASE, artifact=stack.artifact(RELEASE))
            yield stack, report
        finally:
            acme.stop()


def test_pulumi_up_gets_the_certificate_and_https_serves_the_release(deployed: tuple[TlsStack, RunReport]) -> None:
    stack, report = deployed
    assert report.op("-tls") == "create" and report.op("-release-activate") == "create", report.summary()
    status, headers, body, certificate = stack.https_get("/release")
    assert status == 200 and json.loads(body)["release"] == RELEASE, body
    assert headers["strict-transport-security"] == "max-age=31536000"
    names = [value for kind, value in certificate["subjectAltName"] if kind == "DNS"]
    assert names == [DOMAIN]
    issuer = dict(pair[0] for pair in certificate["issuer"])
    assert "Pebble" in issuer["commonName"], issuer
    assert f"Attempting to validate w/ HTTP: http://{DOMAIN}:80/.well-known/acme-challenge/" in stack.acme.log()


def test_the_certificate_lives_where_the_program_says_and_http_redirects(deployed: tuple[TlsStack, RunReport]) -> None:
    stack, _ = deployed
    host = stack.host
    live = host.binds[Path("/etc/letsencrypt")] / "live" / DOMAIN
    assert (live / "fullchain.pem").exists() and (live / "privkey.pem").exists()
    assert not Path(f"/etc/letsencrypt/live/{DOMAIN}").exists(), "the machine's own /etc/letsencrypt is untouched"
    renewal = (host.binds[Path("/etc/letsencrypt")] / "renewal" / f"{DOMAIN}.conf").read_text()
    assert f"server = {stack.acme.directory_url}" in renewal and "authenticator = webroot" in renewal
    tls_step = stack.engine.resources()["cognivern-test-tls"]["outputs"]["stdout"]
    assert f"tls: certificate: obtained for {DOMAIN} from {stack.acme.directory_url}" in tls_step, tls_step
    redirect = httpx.get(f"http://{host.address}/release?x=1", headers={"Host": DOMAIN}, timeout=10, follow_redirects=False)
    assert redirect.status_code == 301 and redirect.headers["location"] == f"https://{DOMAIN}/release?x=1"
