"""A private ACME server on loopback: Debian's pebble, with pebble-challtestsrv as its DNS.

    with Pebble(http_port=nginx.port, domains=["app.cognivern.test"]) as acme:
        certbot ... --server acme.directory_url   (REQUESTS_CA_BUNDLE=acme.api_ca_path)
        acme.issuing_roots()                     # PEM of the root(s) pebble issues under

Everything lives in one temp dir (removed on stop):
  * a throwaway CA (`api-ca.pem`) and a cert for 127.0.0.1/localhost signed by it, for pebble's
    HTTPS API; ACME clients trust it through `api_ca_path` (certbot/requests: REQUESTS_CA_BUNDLE).
    Debian's pebble package ships no test certificates, so they are made here with openssl.
  * `pebble-config.json`: ACME API and management API on free 127.0.0.1 ports; `httpPort` (where
    the validation authority fetches http-01 challenges) is the port of the nginx under test.
  * pebble-challtestsrv serving only DNS on 127.0.0.1 (TCP and UDP, its HTTP/TLS challenge servers
    off), answering A 127.0.0.1 (or `resolve_to`) for the domains and no AAAA; pebble resolves through
    it (`-dnsserver`), so http-01 is validated for real against the nginx on that address's httpPort.
  * the ACME API on 127.0.0.1, or on `address` (its certificate names that IP too) for a test host
    in a network namespace, which reaches the root namespace through its veth.

PEBBLE_VA_NOSLEEP=1 (no random validation delays) and PEBBLE_WFE_NONCEREJECT=0 (no random
badNonce rejections) keep runs fast and deterministic. Validation is NOT faked
(PEBBLE_VA_ALWAYS_VALID is never set). Both daemons are stopped on exit, also after failures.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.support.helpers import free_port, wait_for_port

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def make_ca_and_cert(directory: Path, name: str, *, dns: Sequence[str], ips: Sequence[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA plus a server cert/key signed by it (openssl CLI): (ca.pem, cert.pem, key.pem)."""
    ca_key, ca_pem = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    san = ",".join([*(f"DNS:{d}" for d in dns), *(f"IP:{i}" for i in ips)])
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    signing = ["-days", "2", "-extfile", str(ext), "-out", str(cert)]
    commands = [
        ["req", "-x509", *ec, "-days", "2", "-subj", f"/CN={name} test CA", "-keyout", str(ca_key), "-out", str(ca_pem)],
        ["req", "-new", *ec, "-subj", f"/CN={(list(dns) or list(ips))[0]}", "-keyout", str(key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca_pem), "-CAkey", str(ca_key), "-CAcreateserial", *signing],
    ]
    for command in commands:
        subprocess.run(["openssl", *command], check=True, capture_output=True)
    return ca_pem, cert, key


class Pebble:
    """pebble + pebble-challtestsrv (DNS only) on loopback; see the module docstring.

    Attributes: dir, http_port (validation target), port (ACME API), management_port, dns_port,
    directory_url, api_ca_path (trust this for the ACME API), log_path, dns_log_path.
    """

    def __init__(self, *, http_port: int, domains: Sequence[str] = (), address: str = "127.0.0.1", resolve_to: str = "127.0.0.1") -> None:
        """`address`: where the ACME API listens (a test host in a network namespace reaches the root
        namespace's end of its veth); `resolve_to`: the A record of every domain (where http-01 is fetched)."""
        self.dir = Path(tempfile.mkdtemp(prefix="cognivern-pebble-"))
        self.dir.chmod(0o755)  # certbot (root) reads the CA bundle; keep it world-readable anyway
        self.http_port = http_port
        self.domains = tuple(domains)
        self.address = address
        self.resolve_to = resolve_to
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.dns_management_port = free_port()
        self.directory_url = f"https://{address}:{self.port}/dir"
        self.log_path = self.dir / "pebble.log"
        self.dns_log_path = self.dir / "challtestsrv.log"
        self._pebble: subprocess.Popen[bytes] | None = None
        self._dns: subprocess.Popen[bytes] | None = None
        self._logs: list[object] = []
        try:
            ips = ["127.0.0.1", *([address] if address != "127.0.0.1" else [])]
            self.api_ca_path, cert, key = make_ca_and_cert(self.dir, "pebble-api", dns=["localhost"], ips=ips)
        except Exception:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.config_path = self.dir / "pebble-config.json"
        self.config_path.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"{address}:{self.port}",
                        "managementListenAddress": f"127.0.0.1:{self.management_port}",
                        "certificate": str(cert),
                        "privateKey": str(key),
                        "httpPort": self.http_port,
                        "tlsPort": free_port(),
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                    }
                },
                indent=2,
            )
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Pebble:
        if self._pebble is not None:
            return self
        try:
            dns_log = self.dns_log_path.open("ab")
            self._logs.append(dns_log)
            self._dns = subprocess.Popen(
                [
                    CHALLTESTSRV,
                    *("-dns01", f"127.0.0.1:{self.dns_port}", "-management", f"127.0.0.1:{self.dns_management_port}"),
                    *("-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""),
                ],
                stdout=dns_log,
                stderr=dns_log,
                stdin=subprocess.DEVNULL,
            )
            wait_for_port(self.dns_management_port, alive=self._dns)
            for domain in self.domains:
                self._dns_api("add-a", {"host": domain, "addresses": [self.resolve_to]})
            log = self.log_path.open("ab")
            self._logs.append(log)
            self._pebble = subprocess.Popen(
                [PEBBLE, "-config", str(self.config_path), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin", "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"},
            )
            wait_for_port(self.port, alive=self._pebble, host=self.address)
            wait_for_port(self.management_port, alive=self._pebble)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self, *, keep_dir: bool = False) -> None:
        _stop(self._pebble)
        _stop(self._dns)
        self._pebble = self._dns = None
        for log in self._logs:
            with contextlib.suppress(Exception):
                log.close()  # type: ignore[attr-defined]
        self._logs = []
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._pebble, self._dns) if p is not None and p.poll() is None]

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ APIs
    def _dns_api(self, path: str, body: dict[str, object]) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dns_management_port}/{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            response.read()

    def management(self, path: str) -> str:
        """GET a path of pebble's management API (HTTPS with the API cert), e.g. 'roots/0'."""
        context = ssl.create_default_context(cafile=str(self.api_ca_path))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management_port}/{path}", timeout=5, context=context) as r:
            return str(r.read().decode())

    def issuing_roots(self) -> str:
        """PEM of the root pebble issues under (generated afresh at every start): the TLS trust anchor."""
        return self.management("roots/0")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
