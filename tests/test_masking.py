"""What the release tool prints from the app's logs shows every secretEnv value as ***.

The fixture app logs its configuration at boot, secrets included (`logConfigAtBoot`): a release
that then fails (at its start in the idle slot, or in its bake) prints the end of error.log, which `pulumi up` shows and
CI keeps. Run as root against a temp ROOT with its own app user, like tests/test_release_tool.py,
and once through the engine stand-in with the real program (its captured output and state).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.render import render_release_conf
from tests.engine import RunFailedError
from tests.support.release_host import SECRET_VALUE, ReleaseHost, build_release_tarball, ensure_app_user, remove_app_user, unique_app_user
from tests.support.stack import DeployStack
from tests.support.target_host import TargetHost

APP_USER = unique_app_user()  # this run's own user: other modules and other runs may be going at the same time
# literal matching: characters that are special to bash patterns, sed, regexes or replacement strings
ODD_SECRET = "t*k[e]n&$x\\1'?y|z"
SECRETS = {"FIXTURE_SECRET": SECRET_VALUE, "FIXTURE_TOKEN": ODD_SECRET, "FIXTURE_PART": SECRET_VALUE[:15]}


pytestmark = pytest.mark.needs_root("it creates a user and runs the tool as root")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseHost]:
    ensure_app_user(APP_USER)
    h = ReleaseHost(user=APP_USER, extra_config={"secretEnv": json.dumps(SECRETS)})
    out = tmp_path_factory.mktemp("artifacts")
    try:
        h.install("good", *build_release_tarball(out, "good", "ok"))
        h.ok("activate", "good")
        for rid, mode in (("boot-crash", "crash"), ("closed-crash", "crash")):
            h.install(rid, *build_release_tarball(out, rid, mode, logConfigAtBoot=True))
        h.install("late-crash", *build_release_tarball(out, "late-crash", "crash-loop-after", delayMs=3000, logConfigAtBoot=True))
        yield h
    finally:
        h.stop()
        remove_app_user(APP_USER)


def assert_masked(text: str) -> None:
    for value in SECRETS.values():
        assert value not in text
    # whole values, longest first: FIXTURE_PART (a prefix of FIXTURE_SECRET) must not leave a tail
    assert re.search(r"fixture config: FIXTURE_SECRET=\*\*\*$", text, re.MULTILINE), "the secret's line was printed, masked"
    assert re.search(r"fixture config: FIXTURE_TOKEN=\*\*\*$", text, re.MULTILINE)
    assert "fixture config: FIXTURE_ECHO=hello-from-env" in text, "plain env values are left alone"


def test_the_secret_names_reach_the_tool_but_never_the_values(host: ReleaseHost) -> None:
    conf = render_release_conf(host.settings)
    assert "SECRET_KEYS='FIXTURE_PART FIXTURE_SECRET FIXTURE_TOKEN'" in conf
    for value in SECRETS.values():
        assert value not in conf


def test_a_release_that_fails_its_start_prints_its_log_masked(host: ReleaseHost) -> None:
    proc = host.run("activate", "boot-crash")
    assert proc.returncode == 1 and "did not start healthy in slot" in proc.stderr, proc.stderr
    assert_masked(proc.stdout + proc.stderr)
    # control: the log the tool read holds the secret in clear text (the app's, 0750 shared/logs)
    assert SECRET_VALUE in (host.root / "shared" / "logs" / "error.log").read_text()


def test_a_release_that_fails_its_bake_prints_the_error_log_masked(host: ReleaseHost) -> None:
    host.set_conf(BAKE_SECONDS="12")  # its first boot lives 3 s: the crash loop comes inside the bake
    try:
        proc = host.run("activate", "late-crash")
    finally:
        host.set_conf(BAKE_SECONDS="2")
    assert proc.returncode == 1 and "late-crash failed its bake" in proc.stderr, proc.stderr
    assert "last lines of" in proc.stderr and "error.log" in proc.stderr
    assert_masked(proc.stdout + proc.stderr)
    assert SECRET_VALUE in (host.root / "shared" / "logs" / "error.log").read_text()  # control, as above
    assert host.current() == "good"


def test_when_the_values_cannot_be_trusted_the_log_is_withheld_not_printed(host: ReleaseHost) -> None:
    """Fail closed: the values come from root's own copy (shared/.env, root:APP 0640). One the app
    could have rewritten (the app's, as older hosts had it) is not root's copy: nothing is printed."""
    env = host.root / "shared" / ".env"
    log = host.root / "shared" / "logs" / "error.log"
    line = f"control line before closed-crash: {SECRET_VALUE}\n"  # something the tool would print, were it allowed
    subprocess.run(["runuser", "-u", APP_USER, "--", "tee", "-a", str(log)], input=line, text=True, check=True, capture_output=True)
    stat = env.stat()
    app = pwd.getpwnam(APP_USER)
    os.chown(env, app.pw_uid, app.pw_gid)
    try:
        proc = host.run("activate", "closed-crash")
    finally:
        os.chown(env, stat.st_uid, stat.st_gid)
    assert proc.returncode == 1 and "did not start healthy in slot" in proc.stderr, proc.stderr
    assert "(withheld: the secret values to mask it with could not be read" in proc.stderr
    assert "control line before closed-crash" not in proc.stderr
    # control: there was output to print (the error log the tool withheld)
    assert "control line before closed-crash" in log.read_text()


def test_through_the_engine_the_secret_is_not_in_the_captured_output_or_state(tmp_path: Path) -> None:
    """The real program over SSH: `pulumi up`'s failure message and the stored outputs are masked."""
    with TargetHost() as target:
        stack = DeployStack(target.config, tmp_path, secretEnv=SECRETS)
        stack.up(release="m-good", artifact=stack.artifact("m-good"))
        path, sha = build_release_tarball(tmp_path / "artifacts", "m-late", "crash-after", delayMs=500, logConfigAtBoot=True)
        path.with_name(path.name + ".sha256").write_text(f"{sha}  {path.name}\n")
        with pytest.raises(RunFailedError) as failed:
            stack.up(release="m-late", artifact=str(path))
        text = str(failed.value.report.error) + "\n".join(failed.value.report.warnings)
        assert re.search(r"fixture config: FIXTURE_SECRET=\*\*\*$", text, re.MULTILINE), text
        for value in SECRETS.values():
            assert value not in text
            assert value not in json.dumps([s.__dict__ for s in failed.value.report.steps], default=str)


def test_the_logs_command_prints_the_app_logs_masked(host: ReleaseHost) -> None:
    """`cognivern-release logs` (and so `scripts/ops logs`) masks like the failure tails do."""
    log = host.root / "shared" / "logs" / "error.log"
    line = f"leaked at boot: {SECRET_VALUE} (end)\n"
    subprocess.run(["runuser", "-u", APP_USER, "--", "tee", "-a", str(log)], input=line, text=True, check=True, capture_output=True)
    assert SECRET_VALUE in log.read_text()  # control: the file holds it in clear text
    proc = host.run("logs", "--err", "-n", "5")
    assert proc.returncode == 0, proc.stderr
    assert "leaked at boot: *** (end)" in proc.stdout
    for value in SECRETS.values():
        assert value not in proc.stdout + proc.stderr
