"""The app user can never make root's deploy tools touch what it points them at (issue 11 §1, §2).

A provisioned host (tests/support/hardened_host.py): before each root operation the app user points
every path it can write at a root-owned target (a file holding a secret, a directory); afterwards
every target has the same owner, mode and content, the secret never appears in the operation's
output, and the operation either succeeded (it ignored the link) or failed saying why.

"Legacy" cases put a link where one of the app's own directories belongs (shared/data, shared/logs,
cache/pnpm-store). The app cannot do that any more (its parents are root's; checked below), but a
host laid out by an older provisioning could have one: every operation must refuse it.
Run as root: venv/bin/pytest tests/test_hardening.py
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from components.host import PROVISION, PUT_FILE, provision_args
from components.remote import script_command
from tests.support.hardened_host import HardenedHost, hardened_host, other_user, snapshot
from tests.support.helpers import wait_until

SECRET = f"ROOT-ONLY-SECRET-{uuid.uuid4().hex}"
APP_SECRET = f"app-secret-{uuid.uuid4().hex[:12]}"


pytestmark = pytest.mark.needs_root("it provisions a host and runs the tools as root")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedHost]:
    # a 6 s bake: room for the three failed health polls that fail "late" in it, even on a busy host
    with hardened_host(tmp_path_factory.mktemp("hardening"), secretEnv=json.dumps({"FIXTURE_SECRET": APP_SECRET}), bakeSeconds=6) as h:
        for rid in ("r1", "r2"):
            assert h.install(rid).returncode == 0
        h.ok("activate", "r1")
        yield h


@pytest.fixture
def targets() -> Iterator[dict[str, Path]]:
    """Root-owned targets: files holding SECRET (0600) and directories (0711, 1777) with one inside."""
    base = Path(tempfile.mkdtemp(prefix="cgv-targets-"))
    base.chmod(0o755)
    out: dict[str, Path] = {}
    for name in ("file-a", "file-b", "file-c"):
        path = base / name
        path.write_text(f"{SECRET}\n")
        path.chmod(0o600)
        out[name] = path
    for name, mode in (("dir-a", 0o711), ("dir-b", 0o1777), ("dir-c", 0o700), ("dir-d", 0o755)):
        path = base / name
        path.mkdir()
        (path / "inside").write_text(f"{SECRET}\n")
        (path / "inside").chmod(0o600)
        path.chmod(mode)
        out[name] = path
    yield out
    shutil.rmtree(base)


# Paths inside the app's own directories, which the app may replace at will -> target.
LEAF_LINKS = {
    "shared/logs/error.log": "file-a",
    "shared/logs/out.log": "file-b",
    "shared/logs/preflight": "dir-a",
    "shared/data/evil-file": "file-c",
    "shared/data/evil-dir": "dir-b",
    "cache/pnpm-store/evil": "dir-c",
}
# The app's directories themselves (their parents are root's now): only an older layout has these.
LEGACY_LINKS = {"shared/data": "dir-a", "shared/logs": "dir-b", "cache/pnpm-store": "dir-c"}


@dataclass
class Op:
    run: Callable[[HardenedHost], subprocess.CompletedProcess[str]]
    prepare: Callable[[HardenedHost], None] | None = None
    leaf_fails: str | None = None  # None: with the leaf links in place it succeeds; else it fails saying this


def _other(h: HardenedHost) -> str:
    """r1 or r2, whichever does not serve, installed again when an earlier `prune` (any order) removed it."""
    other = "r2" if h.current() == "r1" else "r1"
    if not (h.root / "releases" / other).is_dir():
        assert h.install(other).returncode == 0
    return other


def _install_late(h: HardenedHost) -> None:
    if not (h.root / "releases" / "late").is_dir():
        # healthy for its start (2 health checks), then 500: it always fails in the bake, however slow the host
        assert h.install("late", "health-flip", healthyChecks=2).returncode == 0


def _backup(h: HardenedHost) -> None:
    h.ok("backup")


def _latest_backup(h: HardenedHost) -> str:
    return sorted((h.root / "backups" / "data").glob("data-*-manual.tar.gz"))[-1].name


def _put_env(h: HardenedHost) -> subprocess.CompletedProcess[str]:
    h.env_serial += 1
    return h.put_env(ATTACK_SERIAL=str(h.env_serial))


OPS = {
    "provision": Op(lambda h: h.provision()),
    "put-file": Op(_put_env),
    "install": Op(lambda h: h.install(f"i{uuid.uuid4().hex[:6]}")),
    "activate": Op(lambda h: h.tool("activate", _other(h))),
    "activate-failing": Op(lambda h: h.tool("activate", "--force", "late"), prepare=_install_late, leaf_fails="rolled back: r"),
    "prune": Op(lambda h: h.tool("prune", "--keep", "2")),
    "backup": Op(lambda h: h.tool("backup")),
    "restore": Op(lambda h: h.tool("restore", _latest_backup(h)), prepare=_backup),
    "reload": Op(lambda h: h.tool("reload")),
    # Read as the app user, the linked files are out of reach: the reader fails, root read nothing.
    "logs": Op(lambda h: h.tool("logs", "-n", "20"), leaf_fails="Permission denied"),
    "ops-logs": Op(lambda h: h.ops("logs"), leaf_fails="Permission denied"),
}


def _plant_leaf(h: HardenedHost, targets: dict[str, Path]) -> None:
    for rel, target in LEAF_LINKS.items():
        h.as_app("sh", "-c", 'rm -rf -- "$2" && ln -s -- "$1" "$2"', "sh", str(targets[target]), str(h.root / rel))
        assert (h.root / rel).is_symlink()


def _remove_leaf(h: HardenedHost) -> None:
    for rel in LEAF_LINKS:
        path = h.root / rel
        if path.is_symlink():
            path.unlink()


def _plant_legacy(h: HardenedHost, targets: dict[str, Path]) -> None:
    for rel, target in LEGACY_LINKS.items():
        path = h.root / rel
        path.rename(path.with_name(path.name + ".real"))
        path.symlink_to(targets[target])
        os.lchown(path, *_app_ids(h))


def _remove_legacy(h: HardenedHost) -> None:
    for rel in LEGACY_LINKS:
        path = h.root / rel
        if path.is_symlink():
            path.unlink()
        real = path.with_name(path.name + ".real")
        if real.exists():
            real.rename(path)


def _app_ids(h: HardenedHost) -> tuple[int, int]:
    pw = pwd.getpwnam(h.user)
    return pw.pw_uid, pw.pw_gid


def _attack(
    host: HardenedHost,
    targets: dict[str, Path],
    op: Op,
    plant: Callable[[HardenedHost, dict[str, Path]], None],
    remove: Callable[[HardenedHost], None],
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run `op` with the app's links planted; every root-owned target unchanged, no secret printed."""
    if op.prepare is not None:
        op.prepare(host)
    before = {name: snapshot(path) for name, path in targets.items()}
    plant(host, targets)
    try:
        result = op.run(host)
    finally:
        remove(host)
    output = result.stdout + result.stderr
    assert {name: snapshot(path) for name, path in targets.items()} == before
    assert SECRET not in output
    return result, output


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_links_the_app_plants_are_ignored_or_refused(host: HardenedHost, targets: dict[str, Path], op_name: str) -> None:
    op = OPS[op_name]
    result, output = _attack(host, targets, op, _plant_leaf, _remove_leaf)
    if op.leaf_fails is None:
        assert result.returncode == 0, output
    else:
        assert result.returncode != 0 and op.leaf_fails in output, output
    assert host.tool("status").returncode == 0


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_a_link_in_place_of_an_app_directory_is_refused(host: HardenedHost, targets: dict[str, Path], op_name: str) -> None:
    result, output = _attack(host, targets, OPS[op_name], _plant_legacy, _remove_legacy)
    assert result.returncode != 0, output
    assert "symbolic link" in output or "Permission denied" in output, output
    if op_name == "put-file":  # its content is in place; the reload it could not do is retried next time
        assert (host.root / ".deploy" / "reload-pending").exists()
        assert host.put_env(ATTACK_SERIAL=str(host.env_serial)).returncode == 0


def test_a_link_at_the_pm2_home_stops_provisioning(host: HardenedHost, targets: dict[str, Path]) -> None:
    """~/.pm2 is made private by the app user itself: a link there is never chmodded by root."""
    pm2 = Path(f"/home/{host.user}/.pm2")
    before = snapshot(targets["dir-d"])
    pm2.rename(pm2.with_name(".pm2.real"))
    try:
        host.as_app("ln", "-s", str(targets["dir-d"]), str(pm2))
        result = host.provision()
    finally:
        if pm2.is_symlink():
            pm2.unlink()
        pm2.with_name(".pm2.real").rename(pm2)
    assert snapshot(targets["dir-d"]) == before
    assert result.returncode != 0 and "could not make" in result.stderr and ".pm2 private" in result.stderr


APP_CANNOT_WRITE = [
    "shared/data",
    "shared/logs",
    "shared/.env",
    "config/state.json",
    "cache/pnpm-store",
    "releases/r1",
    "backups",
    "current",
]


@pytest.mark.parametrize("rel", APP_CANNOT_WRITE)
def test_the_app_cannot_replace_what_root_works_in(host: HardenedHost, rel: str) -> None:
    """Renaming it away (to put a link in its place) needs write access to its parent: root's."""
    path = host.root / rel
    moved = host.as_app("mv", "-T", "--", str(path), str(path) + ".x", check=False)
    planted = host.as_app("ln", "-s", "/etc", str(path.parent / "planted"), check=False)
    assert moved.returncode != 0 and planted.returncode != 0
    assert "Permission denied" in moved.stderr and "Permission denied" in planted.stderr
    assert path.exists() and not Path(str(path) + ".x").exists() and not (path.parent / "planted").is_symlink()


def test_the_env_file_is_roots_and_the_app_only_reads_it(host: HardenedHost) -> None:
    """shared/.env as put-file writes it for the program: the app (PM2) reads it but cannot
    change it, so the release tool can take the secret values it masks with from it (test_masking.py)."""
    env = host.root / "shared" / ".env"
    st = env.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (0, _app_ids(host)[1], "0o640")
    assert host.as_app("cat", str(env)).stdout == env.read_text()
    for attempt in (["sh", "-c", f"echo FIXTURE_SECRET=x >> {env}"], ["truncate", "-s", "0", str(env)], ["chmod", "0666", str(env)]):
        assert host.as_app(*attempt, check=False).returncode != 0, attempt
    assert env.stat().st_mtime_ns == st.st_mtime_ns and oct(env.stat().st_mode & 0o777) == "0o640"


def test_releases_are_roots_and_read_only_to_the_app(host: HardenedHost) -> None:
    rel = host.root / "releases" / "r1"
    query = ["(", "!", "-user", "root", "-o", "-perm", "/022", ")", "!", "-type", "l"]
    found = subprocess.run(["find", str(rel), *query], capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout == ""
    for attempt in (
        ["sh", "-c", f"echo pwned >> {rel}/dist/index.js"],
        ["touch", f"{rel}/dist/new.js"],
        ["touch", f"{rel}/node_modules/ms/pwned.js"],
        ["sh", "-c", f"echo pwned >> {rel}/node_modules/ms/index.js"],
    ):
        assert host.as_app(*attempt, check=False).returncode != 0, attempt
    assert b"pwned" not in (rel / "dist" / "index.js").read_bytes()


def test_a_release_left_writable_by_an_older_version_is_sealed_on_activation(host: HardenedHost) -> None:
    uid, gid = _app_ids(host)
    rel = host.root / "releases" / _other(host)
    for path in [rel, *rel.rglob("*")]:
        os.lchown(path, uid, gid)
    result = host.ok("activate", rel.name)
    assert "making it root's" in result.stderr
    owners = {p.lstat().st_uid for p in [rel, *rel.rglob("*")]}
    assert owners == {0}


def test_put_file_refuses_a_directory_the_app_can_write(host: HardenedHost) -> None:
    dest = host.root / "shared" / "data" / "planted.conf"
    argv = ["--dest", str(dest), "--mode", "0644", "--owner", "root:root"]
    result = host.target.run(script_command(PUT_FILE, argv), stdin="x=1\n")
    assert result.returncode != 0 and "is not root's alone" in result.stderr
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".put-file")]


def _tarball_with(tmp: Path, name: str, members: list[tuple[str, str]]) -> Path:
    """A data backup holding the given (name, link target) symlinks plus one file."""
    path = tmp / name
    with tarfile.open(path, "w:gz") as tar:
        for dir_name in ("data", "data/sub"):
            info = tarfile.TarInfo(dir_name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o750
            tar.addfile(info)
        blob = b'{"ok": true}\n'
        info = tarfile.TarInfo("data/sub/state.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
        for member, target in members:
            info = tarfile.TarInfo(member)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def test_restore_accepts_links_inside_data_and_refuses_links_out(host: HardenedHost, tmp_path: Path) -> None:
    inside = _tarball_with(tmp_path, "inside.tar.gz", [("data/latest.json", "sub/state.json"), ("data/sub/up", "../latest.json")])
    result = host.tool("restore", str(inside))
    assert result.returncode == 0, result.stderr
    data = host.root / "shared" / "data"
    assert os.readlink(data / "latest.json") == "sub/state.json"
    assert (data / "latest.json").read_text() == '{"ok": true}\n'
    assert (data / "sub" / "state.json").stat().st_uid == _app_ids(host)[0]
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    for target in ("/etc/shadow", "../../../../../../etc", "sub/../../.env"):
        outside = _tarball_with(tmp_path, "outside.tar.gz", [("data/escape", target)])
        result = host.tool("restore", str(outside))
        assert result.returncode == 1 and "links that leave data/" in result.stderr, result.stderr
        assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before
    assert "starting the app again" in result.stderr
    assert host.tool("status").returncode == 0


def test_a_second_user_reads_neither_the_pm2_dump_nor_the_logs(host: HardenedHost) -> None:
    """~/.pm2/dump.pm2 holds every .env value (the secret one too); home and ~/.pm2 are 0700."""
    home = Path(f"/home/{host.user}")
    dump = home / ".pm2" / "dump.pm2"
    assert dump.is_file() and APP_SECRET in dump.read_text()
    # another test of this module may have replaced shared/logs: a reload has the app write again
    assert host.tool("reload").returncode == 0
    out_log = host.root / "shared" / "logs" / "out.log"
    wait_until(lambda: out_log.is_file() and out_log.stat().st_size > 0, timeout=30)
    logs = [*sorted((home / ".pm2" / "logs").glob("*")), *sorted((host.root / "shared" / "logs").glob("*.log"))]
    assert out_log in logs
    with other_user() as other:
        for path in [dump, *logs, home / ".pm2", host.root / "shared" / "logs", host.root / "shared" / "data"]:
            result = subprocess.run(
                ["runuser", "-u", other, "--", "sh", "-c", 'cat -- "$1" 2>&1 || ls -- "$1" 2>&1', "sh", str(path)],
                capture_output=True,
                text=True,
                cwd="/",
            )
            assert result.returncode != 0 and "Permission denied" in result.stdout, (path, result.stdout)


# ---------------------------------------------------------------------------- the app account
def _provision_as(host: HardenedHost, app_user: str, ssh_user: str = "root") -> subprocess.CompletedProcess[str]:
    s = host.settings
    args = provision_args(s)
    args[args.index("--app-user") + 1] = app_user
    args[args.index("--ssh-user") + 1] = ssh_user
    return host.target.run(script_command(PROVISION, args), stdin="")


@pytest.fixture
def account() -> Iterator[Callable[..., str]]:
    """Creates test-only accounts of a given shape (useradd arguments); removes them afterwards."""
    made: list[str] = []

    def make(*useradd: str, password: bool = False) -> str:
        name = f"cga{uuid.uuid4().hex[:8]}"
        subprocess.run(["useradd", *useradd, name], check=True, capture_output=True)
        made.append(name)
        if password:
            subprocess.run(["chpasswd"], input=f"{name}:correct-horse-{uuid.uuid4().hex}\n", text=True, check=True)
        return name

    yield make
    for name in made:
        subprocess.run(["userdel", "-r", name], capture_output=True, check=False)


ACCOUNT_SHAPES = {
    "service account (home elsewhere)": (["--system", "--no-create-home", "--home-dir", "/var/lib/cga-service"], False, "has its home at"),
    "login account with a password": (["--create-home", "--user-group", "--shell", "/bin/bash"], True, "has a password"),
    "member of another group": (["--system", "--create-home", "--user-group", "--groups", "adm"], False, "belongs to groups"),
}


@pytest.mark.parametrize("shape", sorted(ACCOUNT_SHAPES))
def test_provision_refuses_an_existing_account_that_is_not_the_apps(host: HardenedHost, account: Callable[..., str], shape: str) -> None:
    useradd, password, message = ACCOUNT_SHAPES[shape]
    name = account(*useradd, password=password)
    home_before = snapshot(Path(pwd.getpwnam(name).pw_dir)) if Path(pwd.getpwnam(name).pw_dir).exists() else None
    result = _provision_as(host, name)
    assert result.returncode == 1, result.stdout
    assert f"--app-user {name} already exists and {message}" in result.stderr
    if home_before is not None:
        assert snapshot(Path(pwd.getpwnam(name).pw_dir)) == home_before, "nothing of the account was changed"


@pytest.mark.parametrize("name", ["daemon", "www-data", "nobody"])
def test_provision_refuses_system_accounts(host: HardenedHost, name: str) -> None:
    result = _provision_as(host, name)
    assert result.returncode == 1 and f"--app-user {name} already exists and " in result.stderr, result.stderr


def test_provision_refuses_the_ssh_user_as_app_user(host: HardenedHost, account: Callable[..., str]) -> None:
    deploy = account("--system", "--create-home", "--user-group", "--shell", "/bin/bash")
    result = _provision_as(host, deploy, ssh_user=deploy)
    assert result.returncode == 1 and "--app-user must differ from --ssh-user" in result.stderr


def test_provision_accepts_the_account_it_created(host: HardenedHost) -> None:
    result = host.provision()
    assert result.returncode == 0 and f"provision: app user: ok (already {host.user})" in result.stdout
