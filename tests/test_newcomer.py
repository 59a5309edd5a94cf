"""A newcomer's first deploy on a fresh clone, with a stand-in `pulumi` (tests/support/fake_pulumi.py).

The stand-in records each call's backend, stack and passphrase and changes the stack file like
the real CLI, so these tests can see: that every documented `pulumi` command reaches the same
stack as `make deploy`, that `make preview` changes no tracked file, that the CLI installs itself
from a (local, file://) release archive checked against its checksum file, and that `make init`
asks for what is missing and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.support.pulumi_cli import pulumi_binary

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "support" / "fake_pulumi.py"
FIXTURE_APP = REPO / "tests" / "fixtures" / "app"
VERSION = (REPO / "tools" / "pulumi" / "VERSION").read_text().strip()
SECRETS = ("GROQ_API_KEY", "RECALL_API_KEY", "ROUTEWAY_API_KEY", "SAPIENCE_PRIVATE_KEY")
TOKEN = "t" * 64


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout


def commit_all(cwd: Path, message: str) -> None:
    git(cwd, "add", "-A")
    git(cwd, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "--allow-empty", "-m", message)


def stand_in(path: Path, version: str = VERSION) -> Path:
    """An executable `pulumi` that runs the recording stand-in (reporting `version`)."""
    path.write_text(f'#!/bin/sh\nFAKE_PULUMI_VERSION={version} exec {sys.executable} {FAKE} "$@"\n')
    path.chmod(0o755)
    return path


@dataclass
class Clone:
    """A fresh clone of this working tree, a HOME of its own and a PATH without any real pulumi."""

    root: Path
    home: Path
    bin: Path
    log: Path
    env: dict[str, str]

    def run(self, *argv: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), cwd=self.root, input=stdin, capture_output=True, text=True, env=env or self.env, timeout=120, check=False
        )

    def calls(self) -> list[dict[str, Any]]:
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
        "FAKE_PULUMI_LOG": str(tmp_path / "pulumi-calls.jsonl"),
        "PULUMI_CLI_URL": f"file://{tmp_path}/no-mirror",  # nothing may be downloaded here
    }
    return Clone(root, home, bin_dir, tmp_path / "pulumi-calls.jsonl", env)


def skip_venv(clone: Clone) -> None:
    """The deploy venv is pip's business (checked by test_deploy_checks_the_cli_first_then_builds_a_runtime_only_venv)."""
    (clone.root / "venv").mkdir(exist_ok=True)
    (clone.root / "venv" / ".runtime").touch()


def init_non_interactive(clone: Clone) -> subprocess.CompletedProcess[str]:
    env = {**clone.env, "HCLOUD_TOKEN": TOKEN, **{name: f"value-of-{name}" for name in SECRETS}}
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
    stand_in(clone.bin / "pulumi")
    skip_venv(clone)
    assert init_non_interactive(clone).returncode == 0
    deploy = clone.run("make", "deploy")
    assert deploy.returncode == 0, deploy.stderr
    reference = [c for c in clone.calls() if c["argv"][:1] == ["up"]]
    assert len(reference) == 1
    target = (reference[0]["backend"], reference[0]["stack"], reference[0]["passphrase"])
    assert target == (f"file://{clone.root}/.pulumi-state", "prod", clone.passphrase_id())

    commands = documented_commands(clone) + printed_hints(clone)
    assert len(commands) >= 12, commands  # README, OPERATIONS, Pulumi.prod.yaml and the tools' hints
    deliberate = [c for c in commands if c.startswith("PULUMI_BACKEND_URL=")]  # moving to a shared backend, on purpose
    assert len(deliberate) <= 2, deliberate
    for command in commands:
        if command in deliberate:
            continue
        for placeholder, value in PLACEHOLDERS.items():
            command = command.replace(placeholder, value)
        command = re.sub(r"\s<\s\S+", "", command)  # `< key-file`: the value comes on stdin instead
        before = len(clone.calls())
        result = clone.run("bash", "-c", command, stdin="a-value\n")
        acted = [c for c in clone.calls()[before:] if c["argv"] != ["version"] and c["argv"][:2] != ["stack", "select"]]
        assert acted, f"{command!r} ran no pulumi command: {result.stderr}"
        for call in acted:
            assert (call["backend"], call["stack"], call["passphrase"]) == target, f"{command!r} -> {call}"
            assert call["exit"] == 0, f"{command!r}: {result.stderr}"


def test_bare_pulumi_misses_the_deploy_stack(clone: Clone) -> None:
    """The control: the stand-in does tell a bare `pulumi config set` apart (what the issue found in the README)."""
    stand_in(clone.bin / "pulumi")
    skip_venv(clone)
    assert init_non_interactive(clone).returncode == 0
    before = len(clone.calls())
    clone.run("bash", "-c", "pulumi config set --secret hcloud:token", stdin="x\n")
    (call,) = clone.calls()[before:]
    assert call["backend"] is None and call["exit"] != 0


# --- 2. the CLI installs itself: pinned version, release archive, checksum ---


def release_archive(folder: Path, version: str = VERSION, *, tamper: bool = False) -> Path:
    """pulumi-v<V>-linux-x64.tar.gz (pulumi/ inside, like Pulumi's) and pulumi-<V>-checksums.txt beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"pulumi-v{version}-linux-x64.tar.gz"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        members = {
            "pulumi/pulumi": f'#!/bin/sh\nFAKE_PULUMI_VERSION={version} exec {sys.executable} {FAKE} "$@"\n',
            "pulumi/pulumi-language-python": "#!/bin/sh\nexit 0\n",
        }
        for member, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    (folder / name).write_bytes(raw.getvalue())
    digest = hashlib.sha256(raw.getvalue()).hexdigest()
    if tamper:
        digest = "0" * 64
    other = "f" * 64
    (folder / f"pulumi-{version}-checksums.txt").write_text(f"{other}  pulumi-v{version}-darwin-arm64.tar.gz\n{digest}  {name}\n")
    return folder


@pytest.mark.parametrize("on_path", [None, "3.100.0"], ids=["missing", "too-old"])
def test_missing_or_old_cli_is_installed_from_the_release_archive(clone: Clone, on_path: str | None) -> None:
    if on_path:
        stand_in(clone.bin / "pulumi", on_path)
    mirror = release_archive(clone.root.parent / "mirror")
    result = clone.run("scripts/ensure-pulumi", env={**clone.env, "PULUMI_CLI_URL": f"file://{mirror}"})
    assert result.returncode == 0, result.stderr
    installed = clone.root / ".tools" / "bin" / "pulumi"
    assert result.stdout.strip() == str(installed)
    assert (clone.root / ".tools" / "bin" / "pulumi-language-python").exists()
    assert subprocess.run([installed, "version"], capture_output=True, text=True, check=True).stdout.strip() == f"v{VERSION}"
    assert "sha256 verified" in result.stderr
    assert clone.status() == ""  # .tools/ is ignored


def test_a_new_enough_cli_on_path_is_used_as_it_is(clone: Clone) -> None:
    mine = stand_in(clone.bin / "pulumi", "9.0.0")
    result = clone.run("scripts/ensure-pulumi")
    assert (result.returncode, result.stdout.strip()) == (0, str(mine))
    assert not (clone.root / ".tools").exists()


def test_an_archive_that_does_not_match_its_checksum_is_not_installed(clone: Clone) -> None:
    mirror = release_archive(clone.root.parent / "mirror", tamper=True)
    result = clone.run("scripts/ensure-pulumi", env={**clone.env, "PULUMI_CLI_URL": f"file://{mirror}"})
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
    stand_in(clone.bin / "pulumi")
    (clone.home / ".ssh").mkdir()
    (clone.home / ".ssh" / "id_rsa.pub").write_text("ssh-rsa AAAA user@laptop\n")  # must not be picked up silently
    result = clone.run("make", "preview")
    assert result.returncode != 0
    assert "make init" in result.stderr
    assert clone.status() == ""
    assert not (clone.root / ".pulumi-passphrase").exists() and not (clone.root / ".pulumi-state").exists()
    assert not (clone.root / "venv").exists()  # said before spending time on the venv
    assert not [c for c in clone.calls() if c["argv"][:2] == ["config", "set"]]


def test_preview_after_init_changes_no_tracked_file(clone: Clone) -> None:
    stand_in(clone.bin / "pulumi")
    skip_venv(clone)
    assert init_non_interactive(clone).returncode == 0
    assert "Pulumi.prod.yaml" in clone.status()  # init did write the stack file (the stand-in does, like the CLI)
    commit_all(clone.root, "stack prod set up")
    result = clone.run("make", "preview")
    assert result.returncode == 0, result.stderr
    assert "stand-in pulumi: preview --diff --stack prod" in result.stdout
    assert clone.status() == ""


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
    stand_in(clone.bin / "pulumi")
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
    stand_in(clone.bin / "pulumi")
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
    stand_in(clone.bin / "pulumi")
    result = clone.run("scripts/init", "--non-interactive", env={**clone.env, "HCLOUD_TOKEN": " "})
    assert result.returncode == 1
    assert "HCLOUD_TOKEN is empty" in result.stderr
    assert not [c for c in clone.calls() if c["argv"][:3] == ["config", "set", "--secret"] and "hcloud:token" in c["argv"]]


def test_init_without_a_terminal_asks_for_non_interactive(clone: Clone) -> None:
    stand_in(clone.bin / "pulumi")
    result = clone.run("scripts/init", stdin="")
    assert result.returncode == 2 and "--non-interactive" in result.stderr


def test_init_reads_the_config_once_and_a_second_run_only_reads(clone: Clone) -> None:
    """One `config --json --show-secrets` per run, not a `config get` per key (each pulumi-local call costs ~0.6 s of CPU)."""
    stand_in(clone.bin / "pulumi")
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


# --- the whole walkthrough, as the README tells it ---


def test_fresh_machine_from_clone_to_deploy(clone: Clone, app_checkout: Path) -> None:
    """No pulumi anywhere: make init installs it from the (mirrored) release archive; make deploy reaches it."""
    mirror = release_archive(clone.root.parent / "mirror")
    skip_venv(clone)
    env = {**clone.env, "PULUMI_CLI_URL": f"file://{mirror}", "HCLOUD_TOKEN": TOKEN, "COGNIVERN_APP": str(app_checkout)}
    init = clone.run("make", "init", "INIT_ARGS=--non-interactive", env=env)
    assert init.returncode == 0, init.stderr
    assert "installed" in init.stderr and "cognivern:release: set to" in init.stdout
    deploy = clone.run("make", "deploy", env=env)
    assert deploy.returncode == 0, deploy.stderr
    (up,) = [c for c in clone.calls() if c["argv"][:1] == ["up"]]
    assert (up["backend"], up["stack"], up["passphrase"]) == (f"file://{clone.root}/.pulumi-state", "prod", clone.passphrase_id())


# --- the same set-up against the real CLI (built by `make pulumi-tools`) ---


def test_init_against_the_real_cli(clone: Clone) -> None:
    """Real `stack init`, `config set --secret [--path]` from stdin, `config get` with Pulumi.yaml's defaults."""
    env = {
        **clone.env,
        "PATH": f"{pulumi_binary().parent}:{clone.env['PATH']}",
        "PULUMI_HOME": str(clone.root.parent / "pulumi-home"),
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_DIY_BACKEND_NO_LEGACY_WARNING": "true",
        "HCLOUD_TOKEN": TOKEN,
        **{name: f"value-of-{name}" for name in SECRETS},
    }
    first = clone.run("scripts/init", "--non-interactive", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    key = clone.home / ".ssh" / "cognivern-prod_ed25519"
    assert "generated a dedicated SSH key" in first.stdout and key.exists()  # Pulumi.yaml's default "" is not a key

    def get(*args: str) -> str:
        result = clone.run("scripts/pulumi-local", "prod", "config", "get", *args, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.removesuffix("\n")

    assert get("hcloud:token") == TOKEN
    assert get("--path", "cognivern:secretEnv.GROQ_API_KEY") == "value-of-GROQ_API_KEY"
    assert get("cognivern:sshPrivateKey") == key.read_text().removesuffix("\n")  # multi-line, through stdin
    assert get("cognivern:sshPublicKey") == (key.parent / (key.name + ".pub")).read_text().strip()
    stack_file = (clone.root / "Pulumi.prod.yaml").read_text()
    assert "encryptionsalt:" in stack_file
    for secret in (TOKEN, *(f"value-of-{n}" for n in SECRETS), "PRIVATE KEY"):
        assert secret not in stack_file

    second = clone.run("scripts/init", "--non-interactive", env=env)
    assert second.returncode == 0, second.stderr
    assert ": set" not in second.stdout and "generated" not in second.stdout
    assert second.stdout.count("ok (already") == 3 + len(SECRETS)  # stack, token, key, each secret
