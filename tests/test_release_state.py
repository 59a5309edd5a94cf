"""The release tool's state, facts and file steps in-process: the JSON schema, taking over the text
state of hosts from before it, the KEY=value format, and the seal's walk (no PM2, no SSH).
Run as root (the seal changes owners): venv/bin/pytest tests/test_release_state.py
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.release.cognivern_release import facts, install, safefs, state
from components.render import render_env, render_release_conf
from components.settings import parse_settings

pytestmark = pytest.mark.needs_root("the seal changes owners")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    for sub in (".deploy", "config", "releases"):
        (tmp_path / sub).mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def old_text_state(path: Path) -> None:
    """What the bash tool left: config/slots, .deploy/previous, journal, meta/<id>, bad/<id>."""
    (path / "config" / "slots").write_text("live=green\nblue=r1\ngreen=r2\nagent=r2\n")
    (path / ".deploy" / "previous").write_text("r1\n")
    (path / ".deploy" / "journal").write_text("id=r3\nfrom=r2\nprev=r1\nslot=blue\nfrom_slot=green\npid=4242\nphase=switched\n")
    (path / ".deploy" / "meta").mkdir()
    (path / ".deploy" / "bad").mkdir()
    for rid, epoch in (("r1", 100), ("r2", 200), ("r3", 300)):
        text = f"installed_at=2026-01-01T00:00:0{rid[1]}Z\ninstalled_epoch={epoch}\nsha256={'a' * 64}\nsource=/in/{rid}.tar.gz\n"
        (path / ".deploy" / "meta" / rid).write_text(text)
    (path / ".deploy" / "bad" / "r0").write_text("marked_at=2026-01-01T00:00:00Z\nreason=did not start healthy in slot green\n")


def test_a_host_with_the_old_text_state_is_read_and_then_written_as_json(root: tuple[Path, int]) -> None:
    path, fd = root
    old_text_state(path)
    store = state.Store(fd)
    read = store.read()
    assert read["slots"] == {"live": "green", "blue": "r1", "green": "r2", "agent": "r2"}
    assert read["previous"] == "r1"
    journal = {"id": "r3", "from": "r2", "prev": "r1", "slot": "blue", "from_slot": "green", "pid": 4242, "phase": "switched"}
    assert read["journal"] == journal
    meta = {"installed_at": "2026-01-01T00:00:02Z", "installed_epoch": 200, "sha256": "a" * 64, "source": "/in/r2.tar.gz"}
    assert read["releases"]["r2"] == meta
    assert read["releases"]["r0"]["bad"]["reason"] == "did not start healthy in slot green"
    assert not (path / facts.STATE_FILE).exists(), "reading writes nothing"
    with store.update():
        pass  # the first update writes the JSON and removes the text files
    written = json.loads((path / facts.STATE_FILE).read_text())
    assert written == {**read, "schema": facts.STATE_SCHEMA}
    assert oct((path / facts.STATE_FILE).stat().st_mode & 0o777) == "0o644", "world-readable: the ecosystem file reads it"
    for gone in ("config/slots", ".deploy/previous", ".deploy/journal", ".deploy/meta", ".deploy/bad"):
        assert not (path / gone).exists(), gone
    assert store.read() == read


@pytest.mark.parametrize(("raw", "kept"), [(4, 4), (2, 2), (1, None), (True, None), ("4", None), (None, None)])
def test_the_remembered_keep_releases_is_a_whole_number_of_at_least_two(raw: object, kept: int | None) -> None:
    """`prune --keep N` is remembered as `keep_releases`; anything else in the file reads as none
    (the tool then keeps KEEP_RELEASES), never as a number that would prune current or previous."""
    assert state.normalise({"keep_releases": raw})["keep_releases"] == kept
    assert state.empty()["keep_releases"] is None


def test_a_host_before_the_slots_runs_blue_and_the_agent_on_current(root: tuple[Path, int]) -> None:
    path, fd = root
    (path / "releases" / "r0").mkdir()
    (path / "current").symlink_to("releases/r0")
    assert state.Store(fd).read()["slots"] == {"live": "blue", "blue": "r0", "green": None, "agent": "r0"}


@pytest.mark.parametrize(
    "raw",
    [
        {"slots": {"live": "purple", "blue": "../../etc", "green": "r\n1", "agent": 7}},
        {"journal": {"id": "r1", "slot": "blue", "phase": "dancing"}},
        {"releases": {"../x": {"sha256": "a"}, "r1": "not a dict"}},
        ["not", "an", "object"],
    ],
)
def test_whatever_the_file_holds_is_read_as_a_valid_state(root: tuple[Path, int], raw: object) -> None:
    path, fd = root
    (path / facts.STATE_FILE).write_text(json.dumps(raw))
    assert state.Store(fd).read() == state.empty()


def test_updates_from_two_writers_are_both_kept(root: tuple[Path, int]) -> None:
    """An install (its own lock) and an activation (the deploy lock) change the same file."""
    _, fd = root
    a, b = state.Store(fd), state.Store(fd)
    with a.update() as sa:
        sa["releases"]["r1"] = {"sha256": "1" * 64}
    with b.update() as sb:
        sb["slots"]["blue"] = "r1"
    with a.update() as sa:
        sa["previous"] = "r1"
    got = a.read()
    assert (got["releases"]["r1"]["sha256"], got["slots"]["blue"], got["previous"]) == ("1" * 64, "r1", "r1")


@pytest.mark.parametrize("value", ["plain", "with space", "it's", "$(id)", "`id`", "a\\b", '"q"', "x\u2028y", "#hash", "", "=="])
def test_env_values_written_by_the_program_read_back_exactly_as_data(value: str) -> None:
    text = render_env({"PORT": "3000"}, {"SECRET": value})
    assert facts.parse_assignments(text) == {"PORT": "3000", "SECRET": value}


def test_the_conf_the_program_renders_reads_back_whole() -> None:
    s = parse_settings({"release": "v1", "host": "127.0.0.1", "appUser": "svc", "secretEnv": json.dumps({"B": "1", "A": "2"})}.get)
    values = facts.parse_assignments(render_release_conf(s))
    assert values["APP_USER"] == "svc" and values["BUILD_USER"] == facts.build_user("svc") == "svc-build"
    assert values["BAKE_SECONDS"] == str(facts.BAKE_SECONDS) and values["SECRET_KEYS"] == "A B"


def test_the_build_gets_roots_proxy_and_path_and_nothing_else_of_its_environment() -> None:
    """A server that reaches npm's registry only through a proxy (set in /etc/environment, so in the
    deploy's SSH session): pnpm, run as the build account, must get it (the pristine host's guest
    reaches the registry only so); nothing else of root's (its HOME, a secret) reaches the build."""
    root_env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "SECRET": "s", "https_proxy": "http://10.0.0.1:3128/", "NO_PROXY": "localhost"}
    env = install.build_env("/opt/c/cache/build", "c-build", root_env)
    assert (env["https_proxy"], env["NO_PROXY"], env["PATH"]) == ("http://10.0.0.1:3128/", "localhost", "/usr/bin:/bin")
    assert env["HOME"] == "/opt/c/cache/build/work" and "SECRET" not in env and "http_proxy" not in env
    assert install.build_env("/opt/c/cache/build", "c-build", {}).keys().isdisjoint(install.PROXY_VARIABLES)


# ---------------------------------------------------------------------------- the seal's walk
def test_the_seal_makes_everything_roots_without_setuid_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("root's file elsewhere\n")
    outside.chmod(0o755)
    release = tmp_path / "release"
    (release / "node_modules" / "pkg").mkdir(parents=True)
    suid = release / "node_modules" / "pkg" / "tool"
    suid.write_text("#!/bin/sh\n")
    (release / "node_modules" / "pkg" / "data.json").write_text("{}")
    (release / "node_modules" / "pkg" / "link").symlink_to(outside)
    os.mkfifo(release / "node_modules" / "fifo")
    for p in [release, *release.rglob("*")]:
        os.lchown(p, 4321, 4321)
    suid.chmod(0o4775)
    (release / "node_modules").chmod(0o777)
    before = outside.stat()
    with safefs.opened_dir(str(release)) as fd:
        assert safefs.unsealed(fd) is not None
        safefs.seal(fd)
        assert safefs.unsealed(fd) is None
    modes = {str(p.relative_to(release)): (p.lstat().st_uid, oct(stat.S_IMODE(p.lstat().st_mode))) for p in release.rglob("*")}
    assert modes["node_modules"] == (0, "0o755")
    assert modes["node_modules/pkg/tool"] == (0, "0o755"), "setuid gone, executable kept"
    assert modes["node_modules/pkg/data.json"] == (0, "0o644")
    assert modes["node_modules/pkg/link"][0] == 0 and "node_modules/fifo" not in modes
    assert (outside.stat().st_uid, outside.stat().st_mode) == (before.st_uid, before.st_mode), "the link's target untouched"


def test_a_hard_link_to_a_file_outside_is_removed_and_refused_with_its_inode_untouched(tmp_path: Path) -> None:
    """Where fs.protected_hardlinks is 0 the build account can link any file it can name (a root
    secret, say): sealing that inode would re-own and chmod it 0644 outside the release too."""
    outside = tmp_path / "secret"
    outside.write_text("elsewhere\n")
    os.chown(outside, 4321, 4321)
    outside.chmod(0o600)
    release = tmp_path / "release"
    (release / "node_modules" / "pkg").mkdir(parents=True)
    (release / "node_modules" / "pkg" / "index.js").write_text("module.exports = 1\n")
    os.link(outside, release / "node_modules" / "pkg" / "linked.js")
    with safefs.opened_dir(str(release)) as fd, pytest.raises(safefs.RefusedError, match=r"node_modules/pkg/linked\.js is a hard link"):
        safefs.seal(fd)
    st = outside.stat()
    assert (st.st_uid, oct(stat.S_IMODE(st.st_mode)), st.st_nlink) == (4321, "0o600", 1), (
        "the outside file keeps owner, mode, and loses the link"
    )
    assert not (release / "node_modules" / "pkg" / "linked.js").exists()


def test_a_link_where_a_directory_belongs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(safefs.RefusedError, match="symbolic link"):
        safefs.open_dir(str(tmp_path / "link"))
