"""What a reviewer reads: `pulumi preview --diff` of one change at a time, kept as golden files.

One TargetHost runs release v1 of a stack deployed by the real engine; each test previews one
change from there and compares what the CLI printed with tests/goldens/preview/<name>.txt
(tests/support/goldens.py says exactly what is normalised: the values this host picked, digests,
id suffixes, warnings, the order of independent resources). A golden that changes in a commit is
reviewed like code; GOLDEN_UPDATE=1 rewrites them. No golden holds a secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.goldens import GOLDENS, Run, assert_golden, normalise
from tests.support.real_engine import PASSPHRASE, RunReport
from tests.support.stack import DeployStack
from tests.support.target_host import TargetHost, node_major

V1, V2 = "gold-v1", "gold-v2"
SECRET, ROTATED = "golden-secret-one", "golden-secret-rotated"
SECOND = "127.0.0.2"  # the second server of the "second server" preview: a preview connects to nothing


class Stack(DeployStack):
    def __init__(self, host: TargetHost, tmp: Path) -> None:
        super().__init__(host.config, tmp, secretEnv={"FIXTURE_ECHO": SECRET})
        self.host = host

    def config(self, **changes: Any) -> dict[str, str]:
        cfg = super().config(**changes)
        if "hosts" in self.settings and self.settings["hosts"] is not None:
            cfg.pop("host")  # TargetHost.config names `host`; a `hosts` stack has none
        return cfg

    def run_values(self) -> Run:
        """What this host and this run picked, as the goldens' placeholders."""
        host, sshd = self.host, self.host.sshd
        assert sshd is not None
        return Run(
            {
                str(host.root): "<ROOT>",
                str(self.tmp): "<TMP>",
                host.app_user: "<APP_USER>",
                sshd.host_key: "<HOST_KEY>",
                f"-p {sshd.port} ": "-p <SSH_PORT> ",
                f"]:{sshd.port} ": "]:<SSH_PORT> ",
                f"127.0.0.1:{host.nginx.port}": "127.0.0.1:<SITE_PORT>",
                f"--node-major {node_major()} ": "--node-major <NODE_MAJOR> ",
            }
        )

    def preview_from_base(self, **change: Any) -> RunReport:
        """`pulumi preview --diff` of the base config plus `change`; the stack's config is the base again after."""
        saved = dict(self.settings)
        try:
            return self.preview(**change)
        finally:
            self.settings = saved


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with TargetHost() as host:
        stack = Stack(host, tmp_path_factory.mktemp("boundaries"))
        stack.up(release=V1, artifact=stack.artifact(V1))
        yield stack


def golden(stack: Stack, name: str, report: RunReport) -> str:
    assert report.ok, report.output
    text = normalise(report.text, stack.run_values())
    assert_golden(name, text)
    return text


def test_a_release_change(stack: Stack) -> None:
    golden(stack, "release", stack.preview_from_base(release=V2, artifact=stack.artifact(V2)))


def test_a_secret_rotation_shows_no_value(stack: Stack) -> None:
    text = golden(stack, "secret-rotation", stack.preview_from_base(secretEnv={"FIXTURE_ECHO": ROTATED}))
    assert "[secret] => [secret]" in text


def test_an_nginx_setting(stack: Stack) -> None:
    golden(stack, "nginx-setting", stack.preview_from_base(framePolicy="deny"))


def test_keep_releases(stack: Stack) -> None:
    golden(stack, "keep-releases", stack.preview_from_base(keepReleases=4))


def test_a_second_server(stack: Stack) -> None:
    golden(stack, "second-server", stack.preview_from_base(hosts=["127.0.0.1", SECOND]))


def test_no_golden_holds_a_secret(stack: Stack) -> None:
    """Every secret the stack ever held, in none of the goldens (checked on the files, whichever tests ran)."""
    private_key = stack.host.config()["sshPrivateKey"]
    secrets = [SECRET, ROTATED, PASSPHRASE, *[line for line in private_key.splitlines() if "PRIVATE KEY" not in line]]
    files = sorted(GOLDENS.glob("*.txt"))
    assert files, f"no goldens in {GOLDENS}"
    for path in files:
        text = path.read_text()
        for secret in secrets:
            assert secret not in text, f"{path.name} holds a secret"
