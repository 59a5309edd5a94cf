"""What the server installs is pinned in one place (issue 11 §6), and CI installs the same.

components/host/versions.env names the PM2 and pnpm versions; the program passes them to
provision.sh, .ci/run installs from the same file, and the tools the real-host tests run against are
those versions. The NodeSource key is trusted by fingerprint: provision.sh's key_fingerprints is
checked against a key made here (there is no route to NodeSource from the test machines).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from components.host import PROVISION, VERSIONS, pinned_versions
from tests.support.target_host import node_major

REPO = Path(__file__).resolve().parents[1]
CI_RUN = REPO / ".ci" / "run"


def test_versions_file_pins_exact_versions() -> None:
    pins = pinned_versions()
    assert set(pins) == {"PM2_VERSION", "PNPM_VERSION"}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in pins.values()), pins


def test_ci_installs_from_the_same_file() -> None:
    text = CI_RUN.read_text()
    assert ". components/host/versions.env" in text
    assert 'npm install -g --silent "pm2@$PM2_VERSION" "pnpm@$PNPM_VERSION"' in text
    assert not re.search(r"(pm2|pnpm)@\d", text), "a version literal in .ci/run bypasses versions.env"
    sourced = subprocess.run(["bash", "-c", f'. "{VERSIONS}"; echo "$PM2_VERSION $PNPM_VERSION"'], capture_output=True, text=True)
    pins = pinned_versions()
    assert sourced.stdout.split() == [pins["PM2_VERSION"], pins["PNPM_VERSION"]]


def test_provision_installs_only_the_pinned_versions() -> None:
    text = PROVISION.read_text()
    installs = re.findall(r"npm install -g --\S+ --\S+ \S+", text)
    assert installs == ['npm install -g --no-fund --no-audit "$1@$2"'], "one install line, for the pinned package@version"
    assert 'npm_global_pin pnpm "$pnpm_version"' in text and 'npm_global_pin pm2 "$pm2_version"' in text
    assert "corepack enable" not in text, "pnpm comes from npm on every Node major (Node 25+ has no corepack)"


@pytest.mark.parametrize("package", ["pm2", "pnpm"])
def test_the_tools_under_test_are_the_pinned_versions(package: str) -> None:
    root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, check=True).stdout.strip()
    installed = json.loads((Path(root) / package / "package.json").read_text())["version"]
    assert installed == pinned_versions()[f"{package.upper()}_VERSION"]
    assert 18 <= node_major() <= 26


def test_nodesource_key_is_checked_by_fingerprint(tmp_path: Path) -> None:
    text = PROVISION.read_text()
    assert "readonly NODESOURCE_FPR=6F71F525282841EEDAF851B42F59B5F99B1BE0B4" in text
    assert '[ "$have_fpr" = "$NODESOURCE_FPR" ]' in text
    function = re.search(r"^key_fingerprints\(\) \{.*?^\}\n", text, re.MULTILINE | re.DOTALL)
    assert function is not None
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    make_key = [*gpg, "--quick-gen-key", "Test Key <test@example.invalid>", "ed25519", "sign", "never"]
    try:
        subprocess.run(make_key, check=True, capture_output=True)
        listing = subprocess.run([*gpg, "--with-colons", "--list-keys"], capture_output=True, text=True, check=True).stdout
        want = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        armored = tmp_path / "key.asc"
        armored.write_text(subprocess.run([*gpg, "--armor", "--export"], capture_output=True, text=True, check=True).stdout)
    finally:  # generating the key started a gpg-agent for this home: nothing outlives the test
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    got = subprocess.run(
        ["bash", "-c", function.group(0) + 'key_fingerprints "$1"', "check", str(armored)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "GNUPGHOME": str(home)},
    )
    assert got.stdout.split() == [want]
    assert want != "6F71F525282841EEDAF851B42F59B5F99B1BE0B4"
