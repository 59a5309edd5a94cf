"""An existing stack upgrades in place: a state written by the previous layout, run by this program.

The previous layout is main before this change (commit BEFORE, what users run today: the Python
release tool installed by provisioning from its stdin, its config a Host command, install and
activate per release, `prune --keep` inside the activation), taken from git (`git archive`; CI
checks out the whole history). It deploys v1 to a TargetHost through the real engine; then this
checkout's program runs on the same project, state and host, under 8 clients through nginx, and must:
- replace no server and run no activation: the activation's command changed, so it is updated,
  which runs only its `update` (`list --json`); v1 keeps serving from the same slot;
- keep the config file's state across its move (Host -> ReleaseTool) through its alias: updated,
  never created or deleted;
- run what the new layout adds once (the tool's install, the env preload, the prune command) and
  provisioning once (its command changed: the tool left it), each step "ok (already)";
- fail no request (the ecosystem now loads the preload: one graceful reload);
and from then on behave as the new layout: a second run changes nothing, keepReleases runs a prune.
The preview a reviewer would read is kept as tests/goldens/preview/upgrade.txt.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.goldens import assert_golden, normalise
from tests.support.load import Load
from tests.support.program import REPO
from tests.support.real_engine import RealEngine
from tests.support.release_host import read_state
from tests.support.target_host import TargetHost
from tests.test_boundaries import Stack

BEFORE = "6f51a0919d79539b2df6f22c8b5260c46d1726c9"  # main before issue 22's layout (issue 23's Python tool merged)
V1 = "upg-v1"
NODE = "cognivern-test"


def checkout(commit: str, dest: Path) -> Path:
    """The program files of `commit` (git archive) in `dest`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True, check=False)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {commit} failed (a shallow clone? CI checks out the history): {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


class OldStack(Stack):
    """The boundaries stack, started on the previous layout's program."""

    def __init__(self, host: TargetHost, tmp: Path, program: Path) -> None:
        super().__init__(host, tmp)
        self.engine = RealEngine(tmp / "upgrade-engine", tree=program)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OldStack]:
    tmp = tmp_path_factory.mktemp("upgrade")
    old = checkout(BEFORE, tmp / "before")
    with TargetHost() as host:
        yield OldStack(host, tmp, old)


def test_a_stack_of_the_previous_layout_upgrades_in_place(stack: OldStack) -> None:
    first = stack.up(release=V1, artifact=stack.artifact(V1))
    assert {f"{NODE}-release-install", f"{NODE}-release-conf"} <= set(first.ops()), first.summary()
    slots = read_state(stack.host.root)["slots"]
    apps_before = stack.pm2()

    stack.engine.use_program(REPO)
    with Load([stack.host.nginx.url("/release"), stack.host.nginx.url("/health")], clients=8) as load:
        preview = stack.preview()
        report = stack.up()
    print(f"\n--- the upgrade's preview ---\n{preview.output}\n--- the upgrade's up ---\n{report.output}")
    assert_golden("upgrade", normalise(preview.text, stack.run_values()))
    assert load.failures == [], load.failures

    ran = report.ops(include_same=False)
    assert ran == {
        f"{NODE}-provision": "replace",  # its command changed (the tool left it): runs once, nothing to do
        f"{NODE}-env-preload": "create",
        # lib.sh, in front of every host script, changed: the file and site commands run again,
        # compare and change nothing ("unchanged", no reload)
        f"{NODE}-nginx-site": "update",
        f"{NODE}-env": "update",
        f"{NODE}-ecosystem": "update",  # loads the preload: one graceful reload
        f"{NODE}-tool-install": "create",
        f"{NODE}-tool-conf": "update",  # the Host's release-conf, kept by its alias (KEEP_RELEASES left it)
        f"{NODE}-release-install": "delete",  # one server: deploy installs (a delete runs nothing)
        f"{NODE}-release-activate": "update",  # runs its `update`: list --json, no activation
        f"{NODE}-release-prune": "create",
    }, report.summary()
    assert f"{NODE}-release-conf" not in report.ops(), "the alias kept the config file's state: no delete, no create"
    assert report.step(f"{NODE}-release-activate").commands == [f"cognivern-release --root {stack.host.root} list --json"]
    provision = report.step(f"{NODE}-provision", "replace")
    assert provision.done
    assert "switching current" not in report.output and "starting" not in report.output
    assert "release tool: skipped (not on stdin" in report.output, "provisioning no longer carries the tool"
    # this change edits the tool too: installed once, by its own command
    assert report.output.count("release tool: installed") == 2, "tool-install's creating and created lines"
    assert "install-tool: release tool: installed" in report.output
    # (.env's command logs nothing, it carries secrets: that it reloaded nothing is the restart count below)
    assert "cognivern-agent.conf: unchanged (nginx not reloaded)" in report.output
    assert stack.serving()["release"] == V1 and report.outputs["activeRelease"] == V1
    assert read_state(stack.host.root)["slots"] == slots, "no activation: the same slot serves"
    apps_after = stack.pm2()
    assert set(apps_after) == set(apps_before), "no slot started or stopped"
    for app, processes in apps_before.items():
        assert [r for _, r in apps_after[app]] == [r + 1 for _, r in processes], "one graceful reload (the ecosystem)"

    again = stack.up()
    assert again.commands == [] and again.ops(include_same=False) == {}, again.summary()
    keep = stack.up(keepReleases=4)
    assert keep.ops(include_same=False) == {f"{NODE}-release-prune": "replace"}, keep.summary()
    assert read_state(stack.host.root)["keep_releases"] == 4
