"""scripts/build-artifact on the fixture app: determinism, exact contents, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from components.release.component import resolve_artifact

REPO = Path(__file__).resolve().parents[1]
BUILDER = REPO / "scripts" / "build-artifact"
FIXTURE = REPO / "tests" / "fixtures" / "app"


def git(app: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(app), *args], check=True, capture_output=True)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A committed git checkout of the fixture app."""
    app = tmp_path / "app"
    shutil.copytree(FIXTURE, app, ignore=shutil.ignore_patterns("node_modules"))
    git(app, "init", "-q", "-b", "main")
    git(app, "add", "-A")
    git(app, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "fixture")
    return app


def build(app: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUILDER), str(app), "--out", str(out), *args], capture_output=True, text=True, check=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_builds_of_the_same_tree_are_identical(app: Path, tmp_path: Path) -> None:
    first = build(app, tmp_path / "a", "--skip-build", "--release", "r1")
    assert first.returncode == 0, first.stderr
    for path in app.rglob("*"):  # new mtimes must not change the artifact
        os.utime(path, (1_800_000_000, 1_800_000_000))
    second = build(app, tmp_path / "b", "--skip-build", "--release", "r1")
    assert second.returncode == 0, second.stderr
    a, b = tmp_path / "a" / "cognivern-r1.tar.gz", tmp_path / "b" / "cognivern-r1.tar.gz"
    assert digest(a) == digest(b)
    assert (tmp_path / "a" / "cognivern-r1.tar.gz.sha256").read_text() == f"{digest(a)}  cognivern-r1.tar.gz\n"


def test_packs_exactly_dist_package_lock_and_config(app: Path, tmp_path: Path) -> None:
    (app / "README.md").write_text("not shipped\n")
    (app / "src").mkdir()
    (app / "src" / "index.ts").write_text("export {}\n")
    git(app, "add", "-A")
    git(app, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "more")
    result = build(app, tmp_path, "--skip-build", "--release", "r2")
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / "cognivern-r2.tar.gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    packed = [p.relative_to(app).as_posix() for top in ("dist", "config") for p in [app / top, *(app / top).rglob("*")]]
    expected = [*packed, "package.json", "pnpm-lock.yaml"]
    assert names == sorted(expected)
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" and m.mtime == 946684800 for m in members)
    assert {m.mode for m in members if m.isdir()} == {0o755}


def test_default_release_id_and_printed_commands(app: Path, tmp_path: Path) -> None:
    result = build(app, tmp_path, "--skip-build")
    assert result.returncode == 0, result.stderr
    sha = subprocess.run(
        ["git", "-C", str(app), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    lines = result.stdout.strip().splitlines()
    match = re.fullmatch(rf"scripts/pulumi-local prod config set cognivern:release (\d{{14}}-{sha})", lines[1])
    assert match, result.stdout
    release = match.group(1)
    # the artifact path is given relative to the project (it ends up in the shared stack file)
    relative = os.path.relpath(tmp_path / f"cognivern-{release}.tar.gz", REPO)
    assert lines[0] == f"scripts/pulumi-local prod config set cognivern:artifact {relative}"
    assert not relative.startswith("/")
    assert lines[2] == "make deploy"
    assert resolve_artifact(release, REPO, relative, None, None).kind == "file"
    assert "packing" in result.stderr  # progress is shown
    # the program accepts what the builder wrote
    art = resolve_artifact(release, REPO, str(tmp_path / f"cognivern-{release}.tar.gz"), None, None)
    assert art.kind == "file" and art.sha256 == digest(tmp_path / f"cognivern-{release}.tar.gz")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda app: shutil.rmtree(app / "dist"), "dist is missing"),
        (lambda app: (app / "dist" / "index.js").unlink(), "dist/index.js is missing: PM2 starts it"),
        (lambda app: (app / "config" / ".env").write_text("SECRET=1\n"), ".env files hold secrets"),
        (lambda app: (app / "config" / ".env.production").write_text("SECRET=1\n"), ".env files hold secrets"),
        (lambda app: (app / "dist" / "deploy.pem").write_text("x\n"), "looks like a private key"),
        (lambda app: (app / "dist" / "blob.txt").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n"), "looks like a private key"),
        (lambda app: (app / "dist" / "node_modules").mkdir(), "node_modules never ships"),
        (lambda app: (app / "dist" / "link.js").symlink_to("/etc/passwd"), "is a symlink"),
    ],
    ids=["no-dist", "no-entry", "env", "env-production", "pem", "key-content", "node_modules", "symlink"],
)
def test_refuses_what_must_not_ship(app: Path, tmp_path: Path, setup, message: str) -> None:
    setup(app)
    result = build(app, tmp_path / "out", "--skip-build", "--release", "r3", "--force")
    assert result.returncode == 1
    assert message in result.stderr
    assert not list((tmp_path / "out").glob("*.tar.gz"))


def test_env_example_is_allowed(app: Path, tmp_path: Path) -> None:
    (app / "config" / ".env.example").write_text("PORT=3000\n")
    assert build(app, tmp_path, "--skip-build", "--release", "r4", "--force").returncode == 0


def test_uncommitted_changes_are_refused_unless_forced(app: Path, tmp_path: Path) -> None:
    (app / "dist" / "index.js").write_text((app / "dist" / "index.js").read_text() + "\n// local edit\n")
    refused = build(app, tmp_path, "--skip-build", "--release", "r5")
    assert refused.returncode == 1 and "uncommitted changes" in refused.stderr and "dist/index.js" in refused.stderr
    assert build(app, tmp_path, "--skip-build", "--release", "r5", "--force").returncode == 0


@pytest.mark.parametrize("bad", ["-x", "a;b", "$(id)", "a b", "x" * 65])
def test_explicit_release_id_is_validated(app: Path, tmp_path: Path, bad: str) -> None:
    result = build(app, tmp_path, "--skip-build", "--release", bad)
    assert result.returncode != 0
    assert not list(tmp_path.glob("*.tar.gz"))


def test_full_build_runs_pnpm_install_and_build(app: Path, tmp_path: Path) -> None:
    """Without --skip-build: a frozen-lockfile install and the app's own build script produce dist/."""
    pkg = json.loads((app / "package.json").read_text())
    pkg["scripts"] = {"build": "node -e \"require('fs').writeFileSync('dist/built.txt', require('ms')(60000))\""}
    (app / "package.json").write_text(json.dumps(pkg, indent=2) + "\n")
    (app / ".gitignore").write_text("node_modules/\ndist/built.txt\n")
    git(app, "add", "-A")
    git(app, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "build script")
    result = build(app, tmp_path, "--release", "r6")
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / "cognivern-r6.tar.gz") as tar:
        built = tar.extractfile("dist/built.txt")
        assert built is not None and built.read() == b"1m"
        assert not [n for n in tar.getnames() if "node_modules" in n]


def test_default_output_prints_release_and_deploy_only(app: Path) -> None:
    """Into this repo's .artifacts/: no cognivern:artifact line, and the release line names the entry point and the stack."""
    result = subprocess.run(
        [str(BUILDER), str(app), "--skip-build", "--release", "r-default", "--stack", "staging"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "scripts/pulumi-local staging config set cognivern:release r-default",
            "make deploy STACK=staging",
        ]
    finally:
        for path in (REPO / ".artifacts").glob("cognivern-r-default.tar.gz*"):
            path.unlink()


def test_not_a_node_app_is_refused_before_anything_runs(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pnpm").write_text(f"#!/bin/sh\ntouch {tmp_path / 'pnpm-ran'}\n")
    (bin_dir / "pnpm").chmod(0o755)
    empty = tmp_path / "not-an-app"
    empty.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(
        [str(BUILDER), str(empty), "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 1
    assert "no package.json: not a Node app" in result.stderr
    assert not (tmp_path / "pnpm-ran").exists()


def test_missing_agent_entry_warns(app: Path, tmp_path: Path) -> None:
    (app / "dist" / "services" / "AutomatedForecastingService.js").unlink()
    result = build(app, tmp_path, "--skip-build", "--release", "r-agent", "--force")
    assert result.returncode == 0, result.stderr
    assert "warning: dist/services/AutomatedForecastingService.js is missing" in result.stderr
    git(app, "checkout", "--", "dist")
    clean = build(app, tmp_path / "c", "--skip-build", "--release", "r-agent3")
    assert clean.returncode == 0 and "AutomatedForecastingService" not in clean.stderr


def test_forced_dirty_build_gets_its_own_id(app: Path, tmp_path: Path) -> None:
    clean = build(app, tmp_path / "clean", "--skip-build")
    assert clean.returncode == 0, clean.stderr
    clean_id = clean.stdout.splitlines()[1].rsplit(" ", 1)[1]
    (app / "dist" / "index.js").write_text((app / "dist" / "index.js").read_text() + "\n// local edit\n")
    dirty = build(app, tmp_path / "dirty", "--skip-build", "--force")
    assert dirty.returncode == 0, dirty.stderr
    dirty_id = dirty.stdout.splitlines()[1].rsplit(" ", 1)[1]
    tarball = tmp_path / "dirty" / f"cognivern-{dirty_id}.tar.gz"
    assert dirty_id == f"{clean_id}-dirty-{digest(tarball)[:7]}"
    assert not (tmp_path / "dirty" / f"cognivern-{clean_id}.tar.gz").exists()
    assert not list((tmp_path / "dirty").glob(".*part"))
