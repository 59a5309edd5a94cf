"""A newcomer's first deploy on a fresh clone, against the real Pulumi CLI and plugins.

The CLI comes the way scripts/ensure-pulumi fetches it: from a `file://` PULUMI_CLI_URL folder this
module builds out of .tools/bin (`make pulumi-tools`) in Pulumi's release layout,
`pulumi-v<V>-<os>-<arch>.tar.gz` with a `pulumi/` folder inside (the CLI, the Python language host
and its scripts) and `pulumi-<V>-checksums.txt` beside it. pulumi-resource-command is not in that
archive: on a user's machine the CLI downloads it into ~/.pulumi/plugins the first time a program
asks for it; here (no downloads: PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION) the walkthrough
installs the same build into that same place with `pulumi plugin install resource command V --file`,
so the engine loads it as it loads a downloaded one (not from PATH, which a user's machine does not
do and which the CLI warns about). The walkthrough then deploys, in existing-host mode, to a real
TargetHost that serves the release.

Where a test's point is which backend, stack and passphrase a command reached (the README's one
entry point), `pulumi` on PATH is the real CLI behind a recorder (tests/support/recording_pulumi.py).
These tests see: every documented `pulumi` command reaches the stack `make deploy` uses, `make
preview` changes no tracked file, the CLI installs itself from the release archive checked against
its checksum file, and `make init` asks for what is missing and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import pytest
import yaml

from tests.support.helpers import http_get
from tests.support.real_engine import tools_bin
from tests.support.stack import FIXTURE_SETTINGS
from tests.support.target_host import TargetHost

REPO = Path(__file__).resolve().parents[1]
RECORDER = REPO / "tests" / "support" / "recording_pulumi.py"
FIXTURE_APP = REPO / "tests" / "fixtures" / "app"
VERSION = (REPO / "tools" / "pulumi" / "VERSION").read_text().strip()
SECRETS = ("GROQ_API_KEY", "RECALL_API_KEY", "ROUTEWAY_API_KEY", "SAPIENCE_PRIVATE_KEY")
TOKEN = "t" * 64
# What Pulumi's release archive holds in pulumi/ of what this project needs (it also has other languages' hosts).
ARCHIVED = ("pulumi", "pulumi-language-python", "pulumi-language-python-exec", "pulumi-resource-pulumi-python")
COMMAND_VERSION = re.findall(r"^pulumi-command==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)[0]  # the plugin the SDK asks for


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout


def commit_all(cwd: Path, message: str) -> None:
    git(cwd, "add", "-A")
    git(cwd, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "--allow-empty", "-m", message)


def archive_name(version: str = VERSION) -> str:
    """This machine's release archive, named as scripts/ensure-pulumi asks for it."""
    os_name = {"Linux": "linux", "Darwin": "darwin"}[platform.system()]
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    return f"pulumi-v{version}-{os_name}-{arch}.tar.gz"


def write_checksums(folder: Path, digest: str, version: str = VERSION) -> None:
    other = "f" * 64
    (folder / f"pulumi-{version}-checksums.txt").write_text(
        f"{other}  pulumi-v{version}-darwin-arm64.tar.gz\n{digest}  {archive_name(version)}\n"
    )


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CLI and language host (.tools/bin) as Pulumi publishes them: the archive and its checksum file."""
    folder = tmp_path_factory.mktemp("mirror")
    bin_dir = tools_bin()
    archive = folder / archive_name()
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # ~160 MB of binaries: the fastest gzip level
        for name in ARCHIVED:
            tar.add(bin_dir / name, arcname=f"pulumi/{name}")
    write_checksums(folder, hashlib.sha256(archive.read_bytes()).hexdigest())
    return folder


def tampered(mirror: Path, folder: Path) -> Path:
    """The same archive beside a checksum file that does not match it."""
    folder.mkdir()
    (folder / archive_name()).symlink_to(mirror / archive_name())
    write_checksums(folder, "0" * 64)
    return folder


def recording_cli(clone: Clone) -> Path:
    """`pulumi` on the clone's PATH: the real CLI (.tools/bin), each call recorded (tests/support/recording_pulumi.py)."""
    path = clone.bin / "pulumi"
    # `version` (scripts/ensure-pulumi's question before every call) goes straight to the CLI: nothing to record
    real = clone.env["RECORD_PULUMI_REAL"]
    path.write_text(f'#!/bin/sh\n[ "$*" = version ] && exec {real} version\nexec {sys.executable} {RECORDER} "$@"\n')
    path.chmod(0o755)
    return path


def old_cli(path: Path, version: str) -> Path:
    """A CLI on PATH too old for tools/pulumi/VERSION: all ensure-pulumi asks of it is `version`."""
    path.write_text(f'#!/bin/sh\n[ "$1" = version ] && echo v{version} && exit 0\nexit 1\n')
    path.chmod(0o755)
    return path


@dataclass
class Clone:
    """A fresh clone of this working tree, a HOME (and ~/.pulumi) of its own and a PATH without any real pulumi."""

    root: Path
    home: Path
    bin: Path
    log: Path
    env: dict[str, str]

    def run(
        self, *argv: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), cwd=self.root, input=stdin, capture_output=True, text=True, env=env or self.env, timeout=timeout, check=False
        )

    def calls(self) -> list[dict[str, Any]]:
        """The recorded CLI calls (recording_cli), in order."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def status(self) -> str:
        return git(self.root, "status", "--porcelain", "--ignored=no")

    def passphrase_id(self) -> str:
        return hashlib.sha256((self.root / ".pulumi-passphrase").read_bytes()).hexdigest()[:16]


@pytest.fixture
def clone(tmp_path: Path) -> Clone:
    root = tmp_path / "cognivern-infra"
    files = git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    git(root.parent, "init", "-q", "-b", "main", str(root))
    commit_all(root, "clone")
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    env = {
        "HOME": str(home),
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PULUMI_CLI_URL": f"file://{tmp_path}/no-mirror",  # nothing may be downloaded here
        # the user's ~/.pulumi (the CLI takes ~ from the passwd entry, not $HOME: without this, root's own)
        "PULUMI_HOME": str(home / ".pulumi"),
        # What a user's machine does differently, because this one has no route to Pulumi: no update
        # check (api.pulumi.com) and no plugin download (github.com; the walkthrough installs the plugin).
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "RECORD_PULUMI_LOG": str(tmp_path / "pulumi-calls.jsonl"),
        "RECORD_PULUMI_REAL": str(tools_bin() / "pulumi"),
    }
    return Clone(root, home, bin_dir, tmp_path / "pulumi-calls.jsonl", env)


def skip_venv(clone: Clone) -> None:
    """The deploy venv is pip's business (checked by test_deploy_checks_the_cli_first_then_builds_a_runtime_only_venv):
    an empty one here, for tests that stop before the program runs."""
    (clone.root / "venv").mkdir(exist_ok=True)
    (clone.root / "venv" / ".runtime").touch()


def init_non_interactive(clone: Clone, **env: str) -> subprocess.CompletedProcess[str]:
    env = {**clone.env, "HCLOUD_TOKEN": TOKEN, **{name: f"value-of-{name}" for name in SECRETS}, **env}
    return clone.run("scripts/init", "--non-interactive", env=env)


# --- 1. every documented pulumi command reaches make deploy's backend, stack and passphrase ---

FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:scripts/pulumi-local|pulumi)\s")
PLACEHOLDERS = {
    "<older-id>": "20261127090000-def5678",
    "<id>": "20261128120000-abc1234",
    "NAME": "GROQ_API_KEY",
    "STACK": "prod",
    " ID": " 20261128120000-abc1234",
}


# Documented text that is a notation, not a command to run as it stands, and what the real CLI says to it.
NOT_RUNNABLE = {
    "scripts/pulumi-local prod ...": "unknown flag",  # "scripts/pulumi-local STACK ...": any command
    "scripts/pulumi-local prod config set-all --json": "",  # the JSON follows it in the text
}
# Calls that run the program or read what a deploy exported need its runtime and a deployed stack, which
# this clone has not: test_fresh_machine_from_clone_to_deploy deploys and then runs them. Here only
# where they went is checked.
NEED_A_DEPLOYMENT = (["up"], ["preview"], ["refresh"], ["destroy"], ["stack", "output"])


def runnable(commands: Iterable[str]) -> list[str]:
    """The commands with their placeholders filled and `< file` dropped (the value comes on stdin), each
    shape once: commands that differ only in a secret's name or a release id run once (each real CLI call
    through scripts/pulumi-local is three CLI starts)."""
    out: dict[str, str] = {}
    for command in commands:
        for placeholder, value in PLACEHOLDERS.items():
            command = command.replace(placeholder, value)
        command = re.sub(r"\s<\s\S+", "", command)
        shape = re.sub(r"secretEnv\.[A-Z_]+|cognivern:release \S+", "<same>", command)
        out.setdefault(shape, command)
    return list(out.values())


def commands_in(text: str) -> list[str]:
    """`pulumi ...` / `scripts/pulumi-local ...` commands in code blocks and in inline code a reader would type."""
    found: list[str] = []
    pieces = [line for block in FENCE.findall(text) for line in block.splitlines()]
    pieces += [span for span in INLINE.findall(FENCE.sub("", text)) if re.match(r"(scripts/pulumi-local|pulumi (config|stack))\b", span)]
    for piece in pieces:
        for part in re.split(r"&&|;|\|\|", piece.split(" # ")[0].split("  #")[0]):
            part = part.strip()
            if COMMAND.match(part) and not part.startswith("pulumi-local"):
                found.append(part)
    return found


def hints_in(output: str) -> list[str]:
    """Commands the tools print for the user to run next."""
    return [
        m.group(0).strip() for m in re.finditer(r"(?:scripts/pulumi-local|(?<![\w/-])pulumi) [^()\n]*?(?=\s\(|$|\)|, then)", output, re.M)
    ]


def documented_commands(clone: Clone) -> list[str]:
    texts = [clone.root / "README.md", *sorted((clone.root / "docs").glob("*.md")), clone.root / "Pulumi.prod.yaml"]
    found: list[str] = []
    for path in texts:
        text = path.read_text()
        if path.suffix == ".yaml":
            text = "```\n" + "\n".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#")) + "\n```"
        found += commands_in(text)
    return found


def printed_hints(clone: Clone) -> list[str]:
    app = clone.root.parent / "app"
    shutil.copytree(FIXTURE_APP, app)
    git(app.parent, "init", "-q", "-b", "main", str(app))
    commit_all(app, "app")
    built = clone.run("scripts/build-artifact", str(app), "--skip-build", "--out", str(clone.root.parent / "out"))
    assert built.returncode == 0, built.stderr
    echo_ssh = {**clone.env, "COGNIVERN_SSH": "echo ssh root@192.0.2.1"}
    ops = clone.run("scripts/ops", "prod", "activate", "20261127090000-def5678", env=echo_ssh)
    assert ops.returncode == 0, ops.stderr
    hints = hints_in(built.stdout) + hints_in(ops.stderr)
    assert len(hints) == 3, (built.stdout, ops.stderr)
    return hints


def test_every_documented_pulumi_command_reaches_the_deploy_stack(clone: Clone) -> None:
    recording_cli(clone)
    skip_venv(clone)
    assert init_non_interactive(clone).returncode == 0
    clone.run("make", "deploy")  # the reference: its `pulumi up` (this clone's venv is empty, so the run itself stops there)
    reference = [c for c in clone.calls() if c["argv"][:1] == ["up"]]
    assert len(reference) == 1, clone.calls()
    target = (reference[0]["backend"], reference[0]["stack"], reference[0]["passphrase"])
    assert target == (f"file://{clone.root}/.pulumi-state", "prod", clone.passphrase_id())

    commands = documented_commands(clone) + printed_hints(clone)
    assert len(commands) >= 12, commands  # README, OPERATIONS, Pulumi.prod.yaml and the tools' hints
    deliberate = [c for c in commands if c.startswith("PULUMI_BACKEND_URL=")]  # moving to a shared backend, on purpose
    assert len(deliberate) <= 2, deliberate
    failed = {}
    for command in runnable(c for c in commands if c not in deliberate):
        before = len(clone.calls())
        result = clone.run("bash", "-c", command, stdin="a-value\n")
        acted = [c for c in clone.calls()[before:] if c["argv"] != ["version"] and c["argv"][:2] != ["stack", "select"]]
        assert acted, f"{command!r} ran no pulumi command: {result.stderr}"
        for call in acted:
            assert (call["backend"], call["stack"], call["passphrase"]) == target, f"{command!r} -> {call}"
            if call["exit"] != 0 and not any(call["argv"][: len(words)] == words for words in NEED_A_DEPLOYMENT):
                failed[command] = result.stderr.strip()
    # the CLI refuses only the notations that are not commands
    assert {c: e for c, e in failed.items() if NOT_RUNNABLE.get(c, "\0") not in e} == {}, failed


def test_bare_pulumi_misses_the_deploy_stack(clone: Clone) -> None:
    """The control: with the stack set up, a bare `pulumi config set` (what the issue found in the README) reaches no backend and fails."""
    recording_cli(clone)
    assert clone.run("scripts/pulumi-local", "prod", "stack-init").returncode == 0
    before = len(clone.calls())
    result = clone.run("bash", "-c", "pulumi config set --secret hcloud:token", stdin="x\n")
    (call,) = clone.calls()[before:]
    assert call["backend"] is None and call["exit"] != 0, result.stderr


# --- 2. the CLI installs itself: pinned version, release archive, checksum ---


@pytest.mark.parametrize("on_path", [None, "3.100.0"], ids=["missing", "too-old"])
def test_missing_or_old_cli_is_installed_from_the_release_archive(clone: Clone, mirror: Path, on_path: str | None) -> None:
    if on_path:
        old_cli(clone.bin / "pulumi", on_path)
    result = clone.run("scripts/ensure-pulumi", env={**clone.env, "PULUMI_CLI_URL": f"file://{mirror}"})
    assert result.returncode == 0, result.stderr
    installed = clone.root / ".tools" / "bin" / "pulumi"
    assert result.stdout.strip() == str(installed)
    assert sorted(p.name for p in installed.parent.iterdir()) == sorted(ARCHIVED)  # the language host beside the CLI
    assert clone.run(str(installed), "version").stdout.strip() == f"v{VERSION}"
    assert "sha256 verified" in result.stderr
    assert clone.status() == ""  # .tools/ is ignored


def test_a_new_enough_cli_on_path_is_used_as_it_is(clone: Clone) -> None:
    mine = clone.bin / "pulumi"
    mine.symlink_to(tools_bin() / "pulumi")  # the pinned version itself
    result = clone.run("scripts/ensure-pulumi")
    assert (result.returncode, result.stdout.strip()) == (0, str(mine))
    assert not (clone.root / ".tools").exists()


def test_the_cli_is_asked_its_version_once_until_the_file_changes(clone: Clone) -> None:
    """ensure-pulumi runs before every pulumi-local command and `pulumi version` is a CLI start
    (0.1 s): the answer is kept in .tools/cli-versions, keyed by the file, so a CLI rewritten in
    place is asked again."""
    asked, cli = clone.root.parent / "asked", clone.bin / "pulumi"

    def stand_in(version: str) -> None:
        cli.write_text(f'#!/bin/sh\necho "$*" >>{asked}\n[ "$1" = version ] && echo v{version} && exit 0\nexit 1\n')
        cli.chmod(0o755)

    stand_in(VERSION)
    (clone.root / ".tools").mkdir()
    for _ in range(3):
        result = clone.run("scripts/ensure-pulumi")
        assert (result.returncode, result.stdout.strip()) == (0, str(cli)), result.stderr
    assert asked.read_text().splitlines() == ["version"]
    stand_in("3.100.0")  # the same path and size, rewritten: asked again, and now too old
    result = clone.run("scripts/ensure-pulumi")
    assert result.returncode == 1 and "older than the pinned" in result.stderr, result.stderr
    assert asked.read_text().splitlines() == ["version", "version"]
    assert clone.status() == ""  # .tools/ is ignored


def test_a_stack_in_the_local_state_is_found_without_a_cli_start(clone: Clone) -> None:
    """pulumi-local checks the stack exists before every command (only make init creates one): in
    a file:// state it looks for the stack's file instead of asking `pulumi stack select`; a stack
    not there, or a state of another layout, is still asked of the CLI."""
    recording_cli(clone)
    assert clone.run("scripts/pulumi-local", "prod", "stack-init").returncode == 0
    before = len(clone.calls())
    assert clone.run("scripts/pulumi-local", "prod", "stack-check").returncode == 0
    assert clone.calls()[before:] == []
    missing = clone.run("scripts/pulumi-local", "other", "stack-check")
    assert missing.returncode == 1 and "make init" in missing.stderr
    assert [c["argv"] for c in clone.calls()[before:]] == [["stack", "select", "other"]]
    meta = clone.root / ".pulumi-state" / ".pulumi" / "meta.yaml"
    assert meta.read_text().strip() == "version: 1"
    meta.write_text("version: 2\n")  # a layout this script does not know: the CLI decides
    clone.run("scripts/pulumi-local", "prod", "stack-check")
    assert [c["argv"][:2] for c in clone.calls()[before + 1 :]] == [["stack", "select"]]


def test_an_archive_that_does_not_match_its_checksum_is_not_installed(clone: Clone, mirror: Path) -> None:
    bad = tampered(mirror, clone.root.parent / "tampered")
    result = clone.run("scripts/ensure-pulumi", env={**clone.env, "PULUMI_CLI_URL": f"file://{bad}"})
    assert result.returncode == 1
    assert "does not match pulumi-" in result.stderr and "nothing installed" in result.stderr
    assert not (clone.root / ".tools" / "bin" / "pulumi").exists()


def test_no_mirror_and_no_cli_says_so(clone: Clone) -> None:
    result = clone.run("make", "deploy")
    assert result.returncode != 0
    assert "could not fetch" in result.stderr
    assert not (clone.root / "venv").exists()  # the CLI is checked before the venv is built


def test_deploy_checks_the_cli_first_then_builds_a_runtime_only_venv(clone: Clone) -> None:
    plan = clone.run("make", "-n", "deploy").stdout.splitlines()
    assert plan[0] == "scripts/ensure-pulumi >/dev/null"
    pip = [line for line in plan if "pip install" in line]
    assert pip == ["venv/bin/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock"]
    assert plan[-1] == "scripts/pulumi-local prod up"
    test_plan = clone.run("make", "-n", "test").stdout
    assert "--require-hashes -r requirements-dev.lock" in test_plan


def test_bare_make_lists_the_targets(clone: Clone) -> None:
    bare, help_ = clone.run("make"), clone.run("make", "help")
    assert bare.returncode == 0 and bare.stdout == help_.stdout
    for target in ("init", "deploy", "preview", "test", "help"):
        assert re.search(rf"^  make {target}\s+\S", bare.stdout, re.M), bare.stdout


# --- 3. make preview changes nothing ---


def test_preview_on_a_fresh_clone_changes_nothing_and_points_to_init(clone: Clone) -> None:
    recording_cli(clone)
    (clone.home / ".ssh").mkdir()
    (clone.home / ".ssh" / "id_rsa.pub").write_text("ssh-rsa AAAA user@laptop\n")  # must not be picked up silently
    result = clone.run("make", "preview")
    assert result.returncode != 0
    assert "make init" in result.stderr
    assert clone.status() == ""
    assert not (clone.root / ".pulumi-passphrase").exists() and not (clone.root / ".pulumi-state").exists()
    assert not (clone.root / "venv").exists()  # said before spending time on the venv
    assert not [c for c in clone.calls() if c["argv"][:2] == ["config", "set"]]
    # (make preview after make init changes no tracked file either: the walkthrough checks it)


# --- 4. make init ---


def pty_init(clone: Clone, env: dict[str, str]) -> pexpect.spawn[str]:
    return pexpect.spawn("make", ["init"], cwd=str(clone.root), env=env, encoding="utf-8", timeout=60)


@pytest.fixture
def app_checkout(clone: Clone) -> Path:
    """The fixture app as a git checkout, and a stand-in pnpm (the build itself is test_build_artifact's business)."""
    app = clone.root.parent / "cognivern"
    shutil.copytree(FIXTURE_APP, app)
    git(app.parent, "init", "-q", "-b", "main", str(app))
    commit_all(app, "app")
    pnpm = clone.bin / "pnpm"
    pnpm.write_text("#!/bin/sh\nexit 0\n")
    pnpm.chmod(0o755)
    return app


def test_init_under_a_terminal_then_again_asks_nothing(clone: Clone, app_checkout: Path) -> None:
    recording_cli(clone)
    child = pty_init(clone, clone.env)
    child.expect("Stack prod: created")
    child.expect("permission 'Read & Write'")
    child.expect(r"Hetzner API token \(hidden\): ")
    child.sendline("")
    child.expect("must not be empty")
    child.expect(r"Hetzner API token \(hidden\): ")
    child.sendline(TOKEN)
    child.expect("SSH key for the server.*Enter for (\\S+): ")
    child.sendline("")
    child.expect("generated a dedicated SSH key")
    child.expect(r"Its path \(Enter: type each one, hidden\): ")
    child.sendline("")
    for name in SECRETS:
        child.expect(rf"{name} \(hidden, Enter to skip\): ")
        child.sendline(f"typed-{name}")
    child.expect(r"Path of the Cognivern app checkout to build it from \(Enter to skip\): ")
    child.sendline(str(app_checkout))
    child.expect("cognivern:release: set to (\\S+)")
    assert isinstance(child.match, re.Match)
    release = child.match.group(1)
    child.expect(pexpect.EOF)
    child.close()
    transcript = child.before or ""
    assert child.exitstatus == 0, transcript
    for name in SECRETS:
        assert f"typed-{name}" not in transcript  # hidden: never echoed

    stack = (clone.root / "Pulumi.prod.yaml").read_text()
    for secret in (TOKEN, *(f"typed-{n}" for n in SECRETS)):
        assert secret not in stack  # only ciphertext in the stack file
    key = clone.home / ".ssh" / "cognivern-prod_ed25519"
    assert key.exists() and (key.stat().st_mode & 0o077) == 0
    assert (clone.root / ".artifacts" / f"cognivern-{release}.tar.gz").exists()
    sets = [c for c in clone.calls() if c["argv"][:2] == ["config", "set"]]
    secret_sets = [c for c in sets if "--secret" in c["argv"]]
    assert {c["argv"][-3] for c in secret_sets} == {
        "hcloud:token",
        "cognivern:sshPrivateKey",
        *(f"cognivern:secretEnv.{n}" for n in SECRETS),
    }
    assert all(
        len(c["argv"]) == 4 + ("--path" in c["argv"]) + 2 for c in secret_sets
    )  # config set --secret [--path] KEY --stack prod: no value in argv

    before = len(clone.calls())
    again = pty_init(clone, clone.env)
    again.expect(pexpect.EOF)
    again.close()
    second = again.before or ""
    assert again.exitstatus == 0, second
    assert "hidden" not in second and "Enter" not in second and "?" not in second  # no question at all
    assert "hcloud:token: ok (already set)" in second and f"artifact: ok (.artifacts/cognivern-{release}.tar.gz)" in second
    assert not [c for c in clone.calls()[before:] if c["argv"][:2] == ["config", "set"]]


def test_init_reads_secrets_from_an_env_file_and_asks_only_for_the_rest(clone: Clone) -> None:
    recording_cli(clone)
    env_file = clone.root.parent / "old.env"
    env_file.write_text("GROQ_API_KEY=from-file-groq\nexport RECALL_API_KEY='from-file-recall'\n# SAPIENCE_PRIVATE_KEY=commented\n")
    env = {**clone.env, "HCLOUD_TOKEN": TOKEN}
    first = clone.run("scripts/init", "--non-interactive", "--env-file", str(env_file), env=env)
    assert first.returncode == 0, first.stderr
    assert "secretEnv.GROQ_API_KEY: set" in first.stdout and "secretEnv.SAPIENCE_PRIVATE_KEY: skipped" in first.stdout
    child = pty_init(clone, clone.env)
    child.expect(r"not set yet: ROUTEWAY_API_KEY, SAPIENCE_PRIVATE_KEY")
    child.expect(r"Its path .*: ")
    child.sendline("")
    child.expect(r"ROUTEWAY_API_KEY \(hidden, Enter to skip\): ")
    child.sendline("typed-routeway")
    child.expect(r"SAPIENCE_PRIVATE_KEY \(hidden, Enter to skip\): ")
    child.sendline("")
    child.expect(r"\(Enter to skip\): ")  # the artifact question
    child.sendline("")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    stack = clone.run("scripts/pulumi-local", "prod", "config", "get", "--path", "cognivern:secretEnv.RECALL_API_KEY")
    assert stack.stdout.strip() == "from-file-recall"


def test_non_interactive_init_refuses_an_empty_token(clone: Clone) -> None:
    recording_cli(clone)
    result = clone.run("scripts/init", "--non-interactive", env={**clone.env, "HCLOUD_TOKEN": " "})
    assert result.returncode == 1
    assert "HCLOUD_TOKEN is empty" in result.stderr
    assert not [c for c in clone.calls() if c["argv"][:3] == ["config", "set", "--secret"] and "hcloud:token" in c["argv"]]


def test_init_without_a_terminal_asks_for_non_interactive(clone: Clone) -> None:
    recording_cli(clone)
    result = clone.run("scripts/init", stdin="")
    assert result.returncode == 2 and "--non-interactive" in result.stderr


def test_init_reads_the_config_once_and_a_second_run_only_reads(clone: Clone) -> None:
    """One `config --json --show-secrets` per run, not a `config get` per key (each pulumi-local call costs ~0.6 s of CPU)."""
    recording_cli(clone)
    assert init_non_interactive(clone).returncode == 0
    first = [c["argv"][:2] for c in clone.calls() if c["argv"][:1] == ["config"]]
    assert first[0] == ["config", "--json"] and set(map(tuple, first[1:])) == {("config", "set")}, first
    before = len(clone.calls())
    second = init_non_interactive(clone)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("ok (already") == 3 + len(SECRETS)  # stack, token, key, each secret: read from that one call
    config = [c["argv"] for c in clone.calls()[before:] if c["argv"][:1] == ["config"]]
    assert config == [["config", "--json", "--show-secrets", "--stack", "prod"]]
    argv = " ".join(a for c in clone.calls() for a in c["argv"])
    assert not [s for s in (TOKEN, *(f"value-of-{n}" for n in SECRETS)) if s in argv]

    # what the CLI stored is what init sent: secrets and the multi-line key through stdin, Pulumi.yaml's "" no key
    key = clone.home / ".ssh" / "cognivern-prod_ed25519"
    assert key.exists() and (key.stat().st_mode & 0o077) == 0

    shown = clone.run("scripts/pulumi-local", "prod", "config", "--json", "--show-secrets")
    assert shown.returncode == 0, shown.stderr
    stored = json.loads(shown.stdout)
    assert stored["hcloud:token"] == {"value": TOKEN, "secret": True}
    assert stored["cognivern:secretEnv"]["objectValue"] == {name: f"value-of-{name}" for name in SECRETS}
    assert stored["cognivern:sshPrivateKey"] == {"value": key.read_text().removesuffix("\n"), "secret": True}
    assert stored["cognivern:sshPublicKey"]["value"] == (key.parent / (key.name + ".pub")).read_text().strip()
    stack_file = (clone.root / "Pulumi.prod.yaml").read_text()
    assert "encryptionsalt:" in stack_file
    for secret in (TOKEN, *(f"value-of-{n}" for n in SECRETS), "PRIVATE KEY"):
        assert secret not in stack_file


@pytest.fixture(scope="module")
def init_script() -> Iterator[Any]:
    """scripts/init as a module, to check what its Stack makes of `config --json` without running a CLI."""
    loader = importlib.machinery.SourceFileLoader("cognivern_init", str(REPO / "scripts" / "init"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))  # type: ignore[arg-type]
    sys.modules[loader.name] = module  # its dataclass looks itself up there
    loader.exec_module(module)
    yield module
    del sys.modules[loader.name]


# as the real CLI (v3.274) prints `config --json --show-secrets`: project defaults included, objectValue for structures
CONFIG_JSON = {
    "cognivern:host": {"value": "", "secret": False},
    "cognivern:hosts": {"value": "[]", "objectValue": [], "secret": False},
    "cognivern:release": {"value": "20261128120000-abc1234", "secret": False},
    "cognivern:servers": {"value": "1", "secret": False},
    "cognivern:secretEnv": {"value": '{"EMPTY":"","G":"g-secret"}', "objectValue": {"EMPTY": "", "G": "g-secret"}, "secret": True},
    "hcloud:token": {"value": "t-secret", "secret": True},
}
SECRET = object()  # get refuses: init keeps no secret's value


def stack_answering(init_script: Any, code: int, stdout: str, stderr: str = "") -> tuple[Any, list[tuple[tuple[str, ...], str | None]]]:
    stack, calls = init_script.Stack("prod"), []

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        calls.append((args, stdin))
        reading = args[:2] == ("config", "--json")
        return subprocess.CompletedProcess(args, code if reading else 0, stdout if reading else "", stderr if reading else "")

    stack.run = run
    return stack, calls


@pytest.mark.parametrize(
    ("key", "path", "is_set", "value"),
    [
        ("cognivern:host", False, False, None),  # Pulumi.yaml's default "" is not a setting
        ("cognivern:hosts", False, True, "[]"),
        ("cognivern:release", False, True, "20261128120000-abc1234"),
        ("cognivern:servers", False, True, "1"),
        ("cognivern:artifact", False, False, None),  # not in the output at all
        ("hcloud:token", False, True, SECRET),
        ("cognivern:secretEnv.G", True, True, SECRET),
        ("cognivern:secretEnv.EMPTY", True, False, None),
        ("cognivern:secretEnv.MISSING", True, False, None),
        ("cognivern:hosts.x", True, False, None),
    ],
)
def test_init_answers_from_one_config_read(init_script: Any, key: str, path: bool, is_set: bool, value: object) -> None:
    stack, calls = stack_answering(init_script, 0, json.dumps(CONFIG_JSON))
    assert stack.is_set(key, path=path) is is_set
    if value is SECRET:
        with pytest.raises(init_script.InitError, match="secret"):
            stack.get(key, path=path)
    else:
        assert stack.get(key, path=path) == value
    assert calls == [(("config", "--json", "--show-secrets"), None)]
    assert "g-secret" not in repr(vars(stack)) and "t-secret" not in repr(vars(stack))  # only "is set" is kept


def test_init_set_updates_what_it_read_and_keeps_no_secret(init_script: Any) -> None:
    stack, calls = stack_answering(init_script, 0, json.dumps(CONFIG_JSON))
    assert not stack.is_set("cognivern:secretEnv.R", path=True)
    stack.set("cognivern:secretEnv.R", "r-secret", secret=True, path=True)
    stack.set("cognivern:release", "20261129080000-0123456")
    stack.set("cognivern:sshPrivateKey", "k-secret", secret=True)
    assert stack.is_set("cognivern:secretEnv.R", path=True) and stack.is_set("cognivern:secretEnv.G", path=True)
    assert stack.is_set("cognivern:sshPrivateKey") and stack.get("cognivern:release") == "20261129080000-0123456"
    assert "r-secret" not in repr(vars(stack)) and "k-secret" not in repr(vars(stack))
    assert [c[0][:2] for c in calls].count(("config", "--json")) == 1
    assert not [args for args, _ in calls if "r-secret" in args or "k-secret" in args]  # on stdin


@pytest.mark.parametrize(("code", "stdout"), [(255, "t-secret"), (0, "t-secret is no JSON"), (0, '{"hcloud:token": {"secret": true}}')])
def test_init_config_read_errors_never_show_its_output(init_script: Any, code: int, stdout: str) -> None:
    stack, _ = stack_answering(init_script, code, stdout, "error: incorrect passphrase")
    with pytest.raises(init_script.InitError) as err:
        stack.is_set("hcloud:token")
    assert "t-secret" not in str(err.value)
    assert ("incorrect passphrase" in str(err.value)) is (code != 0)


# --- the whole walkthrough, as the README tells it, to a real server ---


def existing_host(clone: Clone, target: TargetHost) -> dict[str, Any]:
    """Pulumi.prod.yaml pointed at the test host (existing-host mode), as a user edits the committed stack file.

    The private key is not in it: the walkthrough sets it as the README says (`config set --secret ... < key`)."""
    assert target.sshd is not None
    host = {
        "host": "127.0.0.1",
        "sshPort": target.sshd.port,
        "hostKey": target.sshd.host_key,
        "root": str(target.root),
        "appUser": target.app_user,
        "port": target.app_port,
        "nodeMajor": int(target.config()["nodeMajor"]),
        "nginxListen": [f"127.0.0.1:{target.nginx.port}"],
        "bakeSeconds": 2,
        **FIXTURE_SETTINGS,
    }
    path = clone.root / "Pulumi.prod.yaml"
    stack = yaml.safe_load(path.read_text())
    stack["config"].update({f"cognivern:{key}": value for key, value in host.items()})
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    return host


@pytest.mark.needs_root("the test host creates its app user")
def test_fresh_machine_from_clone_to_deploy(clone: Clone, app_checkout: Path, mirror: Path) -> None:
    """No pulumi anywhere: make init installs the real CLI from the release archive; make preview changes
    nothing; make deploy runs the real engine and the release serves on the (existing) host."""
    env = {**clone.env, "PULUMI_CLI_URL": f"file://{mirror}", "COGNIVERN_APP": str(app_checkout)}
    env.update({name: f"value-of-{name}" for name in SECRETS})
    # The program's runtime is this checkout's venv (installing it is pip's business: see the `make -n` test
    # above); the clone's lock file is dated before that venv's marker, so make finds the runtime up to date.
    (clone.root / "venv").symlink_to(REPO / "venv")
    marker = (REPO / "venv" / ".runtime").stat().st_mtime
    os.utime(clone.root / "requirements.lock", (marker - 1, marker - 1))
    with TargetHost() as target:
        assert target.sshd is not None
        existing_host(clone, target)
        init = clone.run("make", "init", "INIT_ARGS=--non-interactive", env=env)
        assert init.returncode == 0, init.stdout + init.stderr
        assert "installed" in init.stderr and "no Hetzner token or server key needed" in init.stdout
        (release,) = re.findall(r"cognivern:release: set to (\S+)", init.stdout)
        cli = clone.root / ".tools" / "bin" / "pulumi"
        # where a user's CLI puts the plugin it downloads on first use (~/.pulumi/plugins), from this build
        plugin = clone.run(
            str(cli),
            "plugin",
            "install",
            "resource",
            "command",
            COMMAND_VERSION,
            "--file",
            str(tools_bin() / "pulumi-resource-command"),
            env=env,
        )
        assert plugin.returncode == 0, plugin.stderr
        assert (clone.home / ".pulumi" / "plugins" / f"resource-command-v{COMMAND_VERSION}").is_dir()
        key = clone.run(
            "bash", "-c", f"scripts/pulumi-local prod config set --secret cognivern:sshPrivateKey < {target.sshd.private_key_path}", env=env
        )
        assert key.returncode == 0, key.stderr
        commit_all(clone.root, "stack prod set up")

        preview = clone.run("make", "preview", env=env, timeout=300)
        assert preview.returncode == 0, preview.stdout + preview.stderr
        assert re.search(r"\+ \d+ to create", preview.stdout) and "cognivern-prod-release-activate" in preview.stdout, preview.stdout
        assert clone.status() == "", "make preview changed a tracked file"

        # at a terminal, as a newcomer runs it: `pulumi up` previews, then asks (without one it refuses to go on)
        deploy = pexpect.spawn("make", ["deploy"], cwd=str(clone.root), env={**env, "TERM": "xterm"}, encoding="utf-8", timeout=300)
        deploy.expect("Do you want to perform this update")
        deploy.sendline("yes")
        deploy.expect(pexpect.EOF, timeout=600)
        deploy.close()
        output = deploy.before or ""
        assert deploy.exitstatus == 0, output
        assert "Traceback" not in output and "from $PATH" not in output, output  # the installed plugin, not one on PATH
        served = http_get(target.nginx.url("/release"), timeout=5)
        assert served.status_code == 200 and served.json()["release"] == release
        known = clone.run("scripts/pulumi-local", "prod", "stack", "output", "knownHosts", env=env)
        assert known.stdout.rstrip("\n") == f"[127.0.0.1]:{target.sshd.port} {target.sshd.host_key}", known.stderr
