"""What the release tool prints from the app's logs shows every secretEnv value as ***.

The fixture app logs its configuration at boot, secrets included (`logConfigAtBoot`): a release
that then fails (at its start in the idle slot, or in its bake) prints the end of error.log, which `pulumi up` shows and
CI keeps. Run as root against a temp ROOT with its own app user, like tests/test_release_tool.py,
and once through the real `pulumi up` with the real program (its output, event log and state).

The values to mask come only from a shared/.env that root owns and nobody else can write (the
program writes it root:<app group> 0640): a copy the app could rewrite would let it choose what is
masked, so with any other .env the tool withholds what it would print. Everything the tool prints
from the app (log tails, the error log of a failed deploy, the health answer in `status`) has its
control characters other than newline and tab removed, before masking, so no escape sequence
reaches a terminal or a CI log. These tests guard the behaviour, whatever language the tool is in.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.render import render_env, render_release_conf
from tests.support.helpers import http_get
from tests.support.real_engine import RunFailedError
from tests.support.release_host import SECRET_VALUE, ReleaseHost, build_release_tarball, ensure_app_user, remove_app_user, unique_app_user
from tests.support.stack import DeployStack
from tests.support.target_host import TargetHost

APP_USER = unique_app_user()  # this run's own user: other modules and other runs may be going at the same time
# literal matching: characters that are special to bash patterns, sed, regexes or replacement strings
ODD_SECRET = "t*k[e]n&$x\\1'?y|z"
# Control characters the fixture app prints (its `escapes` option): CSI colour and clear-screen, an
# OSC title ended by BEL, a carriage return, a backspace, DEL and the C1 CSI (U+009B, two bytes in
# UTF-8), with text between them that must survive.
ESCAPES = "\x1b[31mred\x1b[0m \x1b[2J\x1b]0;title\x07 cr\rover bs\bx del\x7f c1\u009b31m end\ttab"
SECRETS = {"FIXTURE_SECRET": SECRET_VALUE, "FIXTURE_TOKEN": ODD_SECRET, "FIXTURE_PART": SECRET_VALUE[:15]}


pytestmark = pytest.mark.needs_root("it creates a user and runs the tool as root")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseHost]:
    ensure_app_user(APP_USER)
    h = ReleaseHost(user=APP_USER, extra_config={"secretEnv": json.dumps(SECRETS)})
    out = tmp_path_factory.mktemp("artifacts")
    try:
        h.install("good", *build_release_tarball(out, "good", "ok", healthLeak=True, escapes=ESCAPES))
        h.ok("activate", "good")
        for rid, mode in (("boot-crash", "crash"), ("closed-crash", "crash")):
            h.install(rid, *build_release_tarball(out, rid, mode, logConfigAtBoot=True, escapes=ESCAPES))
        h.install(
            "late-crash", *build_release_tarball(out, "late-crash", "crash-loop-after", delayMs=3000, logConfigAtBoot=True, escapes=ESCAPES)
        )
        yield h
    finally:
        h.stop()
        remove_app_user(APP_USER)


# Every control character but newline and tab: C0, DEL, and C1 (U+0080-U+009F, which terminals in UTF-8 mode may act on).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")
# What ESCAPES leaves behind once the control characters are gone.
STRIPPED = "[31mred[0m [2J]0;title crover bsx del c131m end\ttab"


def assert_stripped(text: str) -> None:
    """No control character in any line that came from the app (every line the fixture prints names
    it); PM2's own coloured CLI output around them is not the app's text and is left as PM2 writes it."""
    from_app = "\n".join(line for line in text.splitlines() if "fixture" in line)
    assert CONTROL.findall(from_app) == []
    assert STRIPPED in from_app, "the text between the control characters is kept, tab included"


def assert_masked(text: str) -> None:
    for value in SECRETS.values():
        assert value not in text
    assert_stripped(text)
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


def as_app(host: ReleaseHost, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", APP_USER, "--", *argv], input=stdin, text=True, capture_output=True, check=False)


def append_to_error_log(host: ReleaseHost, text: str) -> None:
    """What the app writes to its own log (as the app user, into shared/logs, the app's)."""
    as_app(host, "tee", "-a", str(host.root / "shared" / "logs" / "error.log"), stdin=text).check_returncode()


@contextmanager
def untrusted_env(host: ReleaseHost, how: str) -> Iterator[None]:
    """shared/.env made into one the app could write, holding values of the app's choosing (not the
    secrets): a tool that masked with them would print the real ones. Put back afterwards."""
    env = host.root / "shared" / ".env"
    saved = env.read_bytes()
    st = env.stat()
    app = pwd.getpwnam(APP_USER)
    bogus = render_env(host.settings.stack_env, {key: "not-the-secret" for key in SECRETS})
    try:
        if how == "app-owned":  # as every host had it before: the app's, 0600
            os.chown(env, app.pw_uid, app.pw_gid)
            env.chmod(0o600)
            assert as_app(host, "sh", "-c", 'cat > "$1"', "sh", str(env), stdin=bogus).returncode == 0
        elif how == "group-writable":  # root's, but its group (the app's) may write it
            env.write_text(bogus)
            env.chmod(0o660)
            assert as_app(host, "sh", "-c", 'cat > "$1"', "sh", str(env), stdin=bogus).returncode == 0
        else:  # a link to a root-owned file elsewhere: never followed
            elsewhere = host.root / "config" / "other.env"
            elsewhere.write_text(bogus)
            env.unlink()
            env.symlink_to(elsewhere)
        yield
    finally:
        if env.is_symlink():
            env.unlink()
            (host.root / "config" / "other.env").unlink()
        env.write_bytes(saved)
        os.chown(env, st.st_uid, st.st_gid)
        env.chmod(stat.S_IMODE(st.st_mode))


def test_the_app_cannot_rewrite_the_values_the_tool_masks_with(host: ReleaseHost) -> None:
    """shared/.env as the program writes it (root's, 0640, the app's group): the app reads it, cannot write it."""
    env = host.root / "shared" / ".env"
    assert (env.stat().st_uid, stat.S_IMODE(env.stat().st_mode), env.stat().st_gid) == (0, 0o640, pwd.getpwnam(APP_USER).pw_gid)
    assert as_app(host, "cat", str(env)).stdout == env.read_text(), "the app (PM2) reads it"
    rewrite = as_app(host, "sh", "-c", 'echo FIXTURE_SECRET=not-the-secret >> "$1"', "sh", str(env))
    assert rewrite.returncode != 0 and "Permission denied" in rewrite.stderr
    append_to_error_log(host, f"leaked: {SECRET_VALUE}\n")
    proc = host.run("logs", "--err", "-n", "3")
    assert proc.returncode == 0 and "leaked: ***" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("how", ["app-owned", "group-writable", "link"])
def test_an_env_the_app_could_write_is_not_trusted_and_the_log_is_withheld(host: ReleaseHost, how: str) -> None:
    append_to_error_log(host, f"control line for {how}: {SECRET_VALUE}\n")
    with untrusted_env(host, how):
        proc = host.run("logs", "--err", "-n", "5")
    assert proc.returncode == 0, proc.stderr
    assert "(withheld: the secret values to mask it with could not be read" in proc.stdout
    assert SECRET_VALUE not in proc.stdout + proc.stderr and f"control line for {how}" not in proc.stdout
    # control: the same command with the real .env prints the line, masked
    again = host.run("logs", "--err", "-n", "5")
    assert f"control line for {how}: ***" in again.stdout, again.stdout + again.stderr


def test_when_the_values_cannot_be_trusted_a_failed_deploys_log_is_withheld_not_printed(host: ReleaseHost) -> None:
    """Fail closed on the failed-deploy path too: an .env the app owns (as older hosts had it)."""
    log = host.root / "shared" / "logs" / "error.log"
    append_to_error_log(host, f"control line before closed-crash: {SECRET_VALUE}\n")  # something the tool would print, were it allowed
    with untrusted_env(host, "app-owned"):
        proc = host.run("activate", "closed-crash")
    assert proc.returncode == 1 and "did not start healthy in slot" in proc.stderr, proc.stderr
    assert "(withheld: the secret values to mask it with could not be read" in proc.stderr
    assert "control line before closed-crash" not in proc.stderr and SECRET_VALUE not in proc.stderr
    # control: there was output to print (the error log the tool withheld)
    assert "control line before closed-crash" in log.read_text()


def test_through_the_engine_the_secret_is_not_in_the_captured_output_or_state(tmp_path: Path) -> None:
    """The real `pulumi up` of the program: what the operator's terminal shows of the failed bake is masked, and
    the values are in no event, step or state file (each of them encrypted where the engine keeps it)."""
    with TargetHost() as target:
        stack = DeployStack(target.config, tmp_path, secretEnv=SECRETS)
        stack.up(release="m-good", artifact=stack.artifact("m-good"))
        path, sha = build_release_tarball(
            tmp_path / "artifacts", "m-late", "crash-after", delayMs=500, logConfigAtBoot=True, escapes=ESCAPES
        )
        path.with_name(path.name + ".sha256").write_text(f"{sha}  {path.name}\n")
        with pytest.raises(RunFailedError) as failed:
            stack.up(release="m-late", artifact=str(path))
        report = failed.value.report
        assert re.search(r"fixture config: FIXTURE_SECRET=\*\*\*$", report.output, re.MULTILINE), report.output
        assert_stripped(report.output)
        events = "\n".join(p.read_text() for p in sorted(stack.engine.workdir.glob("events-*.jsonl")))
        assert "fixture config: FIXTURE_SECRET=***" in events  # control: the event log holds the tool's output
        for value in SECRETS.values():
            for where, text in (("output", report.output), ("events", events), ("state", stack.engine.raw_state())):
                assert value not in text, where
            assert value not in json.dumps([s.__dict__ for s in report.steps], default=str)


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


def test_log_tails_strip_control_characters_before_masking(host: ReleaseHost) -> None:
    """An escape sequence in the app's log never reaches the terminal; one inside a secret does not hide it from the mask."""
    split = SECRET_VALUE[:10] + "\x00\x07\x7f" + SECRET_VALUE[10:]  # the secret with control characters in the middle
    append_to_error_log(host, f"fixture log escapes: {ESCAPES}\nsplit secret: {split} (end)\n")
    assert "\x1b" in (host.root / "shared" / "logs" / "error.log").read_text()  # control: the file holds them raw
    proc = host.run("logs", "--err", "-n", "2")
    assert proc.returncode == 0, proc.stderr
    assert CONTROL.findall(proc.stdout) == []
    assert_stripped(proc.stdout)
    assert "split secret: *** (end)" in proc.stdout and SECRET_VALUE[:10] not in proc.stdout


def test_status_prints_the_health_answer_masked_and_stripped(host: ReleaseHost) -> None:
    """The live release's health answer (tests/fixtures/app healthLeak) carries a secret and control characters."""
    assert host.current() == "good"
    raw = http_get(f"http://127.0.0.1:{host.slot_port(host.slots()['live'])}/health", timeout=5).text
    assert SECRET_VALUE in raw and "\x1b" in raw, "control: the app's answer holds both"
    proc = host.run("status")
    assert proc.returncode == 0, proc.stderr
    (health,) = [line for line in proc.stdout.splitlines() if line.startswith("health:")]
    assert '"token":"***"' in health, health
    assert SECRET_VALUE not in proc.stdout + proc.stderr
    assert CONTROL.findall(proc.stdout) == [] and "[31mred[0m" in health
