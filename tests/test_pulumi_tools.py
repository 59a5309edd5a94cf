"""`make pulumi-tools`: the real engine built from Go modules and the upstream source tarballs.

The build refuses, in one line and before compiling anything, a missing third_party folder and a
tarball whose checksum differs from SHA256SUMS; the versions that meet (CLI, language host, the
provider, the program's SDK) are the ones the README names, each read from its one source.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.real_engine import BIN, tools_bin

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "tools" / "pulumi" / "build.sh"
THIRD_PARTY = Path(os.environ.get("COGNIVERN_THIRD_PARTY", REPO.parent / "shared" / "third_party"))


def build(third_party: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COGNIVERN_THIRD_PARTY": str(third_party)}
    return subprocess.run(["bash", str(BUILD), str(bin_dir)], env=env, capture_output=True, text=True, timeout=60, check=False)


def requirement(name: str) -> str:
    (pin,) = re.findall(rf"^{re.escape(name)}==([0-9.]+)$", (REPO / "requirements.txt").read_text(), re.M)
    return str(pin)


def language_host_version() -> str:
    (version,) = re.findall(r"pulumi-language-python-v([0-9.]+)\.tar\.gz", (THIRD_PARTY / "SHA256SUMS").read_text())
    return str(version)


def test_a_missing_third_party_folder_stops_the_build_in_one_line(tmp_path: Path) -> None:
    done = build(tmp_path / "absent", tmp_path / "bin")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "SHA256SUMS is missing" in done.stderr and "COGNIVERN_THIRD_PARTY" in done.stderr
    assert not (tmp_path / "bin").exists()


def test_a_tarball_that_differs_from_its_checksum_is_never_opened(tmp_path: Path) -> None:
    copy = tmp_path / "third_party"
    shutil.copytree(THIRD_PARTY, copy)
    tarball = copy / f"pulumi-command-v{requirement('pulumi-command')}-provider.tar.gz"
    tarball.chmod(0o644)
    with tarball.open("ab") as f:
        f.write(b"tampered")
    done = build(copy, tmp_path / "bin")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert f"{tarball.name} has sha256" in done.stderr and "not building from it" in done.stderr
    assert not (tmp_path / "bin").exists()


def test_the_versions_that_meet_are_the_ones_the_readme_names() -> None:
    bin_dir = tools_bin()
    cli = (REPO / "tools" / "pulumi" / "VERSION").read_text().strip()
    host = language_host_version()
    sdk, command = requirement("pulumi"), requirement("pulumi-command")
    assert subprocess.run([bin_dir / "pulumi", "version"], capture_output=True, text=True, check=True).stdout.strip() == f"v{cli}"
    assert (
        subprocess.run([bin_dir / "pulumi-language-python", "-version"], capture_output=True, text=True, check=True).stdout.strip()
        == f"v{host}"
    )
    readme = (REPO / "README.md").read_text()
    assert f"CLI {cli}, the Python language host {host}, the Python SDK {sdk} and pulumi-command {command}" in readme
    for script in ("pulumi-language-python-exec", "pulumi-resource-pulumi-python"):
        assert os.access(BIN / script, os.X_OK)


@pytest.mark.parametrize("missing", ["pulumi-resource-command", "pulumi-language-python-exec"])
def test_a_missing_plugin_fails_the_real_engine_tests_rather_than_skipping_them(
    missing: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for binary in tools_bin().iterdir():
        if binary.name != missing:
            (fake / binary.name).symlink_to(binary)
    monkeypatch.setattr("tests.support.real_engine.BIN", fake)
    with pytest.raises(pytest.fail.Exception, match=f"lacks {missing}.*make pulumi-tools"):
        tools_bin()
