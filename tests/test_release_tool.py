"""cognivern-release against real Node, pnpm and PM2 on a temp ROOT (private PM2_HOME, a unique app user).

The module installs r1 and r2 once and snapshots ROOT (PM2_HOME included); every test starts from
that snapshot with no PM2 daemon running (`host`), and the `serving` (r1 active) and `switched`
(r1 then r2 active) fixtures build the rest through the tool itself. So each test runs alone and in
any order. Run as root:
    venv/bin/pytest tests/test_release_tool.py
    venv/bin/pytest "tests/test_release_tool.py::test_backup_and_restore"
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from components.release.cognivern_release import facts
from components.release.component import sha256_file
from tests.support.helpers import UserCommandLines, http_get, http_post, wait_until
from tests.support.release_host import (
    SECRET_VALUE,
    ReleaseHost,
    build_evil_tarball,
    build_release_tarball,
    ensure_app_user,
    remove_app_user,
    unique_app_user,
)

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


pytestmark = pytest.mark.needs_root("it creates a user and runs the tool as root")


@pytest.fixture(scope="module")
def app_user() -> Iterator[str]:
    name = unique_app_user()
    ensure_app_user(name)
    yield name
    remove_app_user(name)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    out = tmp_path_factory.mktemp("artifacts")
    modes = {
        "r1": "ok",
        "r2": "ok",
        "r3": "ok",
        "r4": "ok",
        "crash": "crash",
        "sick": "unhealthy",
        "pm2crash": "crash-under-pm2",
    }
    built = {rid: build_release_tarball(out, rid, mode) for rid, mode in modes.items()}
    built["late"] = build_release_tarball(out, "late", "crash-loop-after", delayMs=4000)  # healthy, then a crash loop in the bake
    built["sleepy"] = build_release_tarball(out, "sleepy", "slow", delayMs=8000)
    return built


@pytest.fixture(scope="module")
def installed(app_user: str, artifacts: dict[str, tuple[Path, str]]) -> Iterator[tuple[ReleaseHost, Path]]:
    """One host with r1 and r2 installed (the slow part), and a snapshot of it."""
    with ReleaseHost(user=app_user) as h:
        for rid in ("r1", "r2"):
            h.install(rid, *artifacts[rid])
        snap = h.snapshot()
        try:
            yield h, snap
        finally:
            shutil.rmtree(snap, ignore_errors=True)


@pytest.fixture
def host(installed: tuple[ReleaseHost, Path]) -> ReleaseHost:
    """r1 and r2 installed, nothing activated, no PM2 daemon: the snapshot, restored for this test."""
    h, snap = installed
    h.restore(snap)
    return h


@pytest.fixture
def serving(host: ReleaseHost) -> ReleaseHost:
    """r1 activated (first deploy) and serving, one post in shared/data."""
    host.ok("activate", "r1")
    assert http_post(host.url("/data"), content="first", timeout=3).status_code == 201
    return host


@pytest.fixture
def switched(serving: ReleaseHost) -> ReleaseHost:
    """r2 activated after r1: current r2, previous r1."""
    serving.ok("activate", "r2")
    return serving


def hammer(h: ReleaseHost, stop: threading.Event, results: list[str]) -> None:
    """GET /health on the app port on a fresh connection each time; records 'ok' or the failure."""
    while not stop.is_set():
        try:
            r = http_get(h.url("/health"), timeout=5, headers={"connection": "close"})
            results.append("ok" if r.status_code == 200 else f"http {r.status_code}")
        except httpx.HTTPError as exc:
            results.append(f"error {type(exc).__name__}")
        time.sleep(0.02)


# ------------------------------------------------------------------------ command line


def test_the_app_user_runs_nothing_from_the_checkout(serving: ReleaseHost) -> None:
    """What the tool has the app user run (PM2's CLI with the ecosystem file, the app) comes from the
    host, and the tool is installed as provisioning installs it: a clone under a 0700 home or
    `mktemp -d` is out of the app user's reach, and nothing the tool runs needs it."""
    checkout = str(Path(__file__).resolve().parents[1])
    with UserCommandLines(serving.user) as seen:
        serving.ok("activate", "r2")
    assert [line for line in seen.lines if "pm2" in line.lower() or "dist/index.js" in line], seen.lines  # control: seen
    assert [line for line in seen.lines if checkout in line] == []  # (its working directory is the caller's, as over SSH)
    launcher = serving.installed_tool.resolve()
    assert not launcher.is_relative_to(checkout) and launcher.parent.parent.name == "cognivern-release"
    for path in [launcher, *launcher.parent.rglob("*")]:
        st = path.stat()
        assert st.st_uid == 0 and st.st_mode & 0o004 and not st.st_mode & 0o022, path  # root's, readable by anyone


def test_help_and_id_validation(host: ReleaseHost) -> None:
    proc = host.run("--help")
    assert proc.returncode == 0
    for text in ("install ID SOURCE SHA256", "activate [--force] ID", "prune [--keep N]", "restore BACKUP"):
        assert text in proc.stdout
    for bad in ("../etc", "-x", ".hidden", "a" * 65, "a b", "a/b"):
        proc = host.run("install", bad, "-", "-")
        assert proc.returncode == 2 and "invalid release id" in proc.stderr, (bad, proc.stderr)
    assert host.run("activate", "../etc").returncode == 2
    assert host.run("install", "r9", "http://example.invalid/x.tar.gz", "0" * 64).returncode == 2, "plain http is refused"


# ------------------------------------------------------------------------ install


def test_install_lays_out_release_with_the_build_accounts_store(host: ReleaseHost) -> None:
    rel = host.root / "releases" / "r1"
    uid = pwd.getpwnam(host.user).pw_uid
    assert (rel / "dist" / "index.js").is_file()
    assert not (rel / ".cognivern-unfinished").exists()
    for link, target in ((".env", "shared/.env"), ("data", "shared/data"), ("logs", "shared/logs")):
        assert os.readlink(rel / link) == f"../../{target}"
        assert (rel / link).resolve() == (host.root / target).resolve(), link
    assert rel.stat().st_uid == 0 and uid != 0  # root's, read-only to the app (tests/test_hardening.py)
    dep = rel / "node_modules" / "ms" / "index.js"
    assert dep.is_file()
    # pnpm (as the build account) copies package files from its own store: no release file is a store file
    assert dep.resolve().stat().st_nlink == 1 and dep.resolve().stat().st_uid == 0
    assert dep.resolve().stat().st_ino != (host.root / "releases" / "r2" / "node_modules" / "ms" / "index.js").resolve().stat().st_ino
    work = host.root / "cache" / "build" / "work"
    build = pwd.getpwnam(facts.build_user(host.user))
    assert (work.stat().st_uid, oct(work.stat().st_mode & 0o777)) == (build.pw_uid, "0o700"), "the build account's alone"
    assert any((work / "store").rglob("*")), "store is empty"
    assert not any((host.root / "cache" / "pnpm-store").iterdir()), "the app's old store is not used"


def test_reinstall_is_a_noop(host: ReleaseHost, artifacts: dict[str, tuple[Path, str]]) -> None:
    stamp = (host.root / "releases" / "r1" / "dist" / "index.js").stat().st_mtime_ns
    proc = host.install("r1", *artifacts["r1"])
    assert "already installed" in proc.stderr
    assert (host.root / "releases" / "r1" / "dist" / "index.js").stat().st_mtime_ns == stamp
    assert host.log_lines()[-1][1:3] == ["install", "r1"] and host.log_lines()[-1][5] == "noop"
    # the same id from a different artifact is refused, not silently ignored
    proc = host.run("install", "r1", str(host.upload(artifacts["r2"][0])), artifacts["r2"][1])
    assert proc.returncode == 1 and "different artifact" in proc.stderr


def test_half_installed_release_is_redone(host: ReleaseHost, artifacts: dict[str, tuple[Path, str]]) -> None:
    half = host.root / "releases" / "half"
    half.mkdir()
    (half / ".cognivern-unfinished").touch()
    (half / "junk.txt").write_text("left by an interrupted install")
    proc = host.install("half", *artifacts["r1"])
    assert "half installed" in proc.stderr
    assert not (half / "junk.txt").exists() and not (half / ".cognivern-unfinished").exists()
    assert (half / "node_modules" / "ms").is_dir()


def test_bad_checksum_and_corrupt_tarball_are_refused_before_unpacking(host: ReleaseHost, artifacts: dict[str, tuple[Path, str]]) -> None:
    tarball = host.upload(artifacts["r3"][0])
    proc = host.run("install", "badsum", str(tarball), "0" * 64)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr
    assert not (host.root / "releases" / "badsum").exists()
    corrupt = host.root / "incoming" / "corrupt.tar.gz"
    corrupt.write_bytes(tarball.read_bytes()[:200])
    proc = host.run("install", "corrupt", str(corrupt), sha256_file(corrupt))
    assert proc.returncode == 1 and "not a readable gzip tar" in proc.stderr
    assert not (host.root / "releases" / "corrupt").exists()
    assert host.log_lines()[-2][5].startswith("bad-checksum")


def test_tarball_with_dotdot_or_absolute_member_is_refused(host: ReleaseHost, tmp_path: Path) -> None:
    evil, sha = build_evil_tarball(tmp_path, "evil")
    proc = host.run("install", "evil", str(host.upload(evil)), sha)
    assert proc.returncode == 1 and "'..'" in proc.stderr
    assert not (host.root / "releases" / "evil").exists()
    assert not (host.root / "escaped.txt").exists() and not (host.root / "releases" / "escaped.txt").exists()
    target = tmp_path / "absolute-target.txt"
    evil, sha = build_evil_tarball(tmp_path, "evil-abs", member=str(target))
    proc = host.run("install", "evil-abs", str(host.upload(evil)), sha)
    assert proc.returncode == 1 and "absolute member paths" in proc.stderr
    assert not (host.root / "releases" / "evil-abs").exists() and not target.exists()


def test_ensure_installed_without_source(host: ReleaseHost) -> None:
    assert host.run("install", "r1", "-", "-").returncode == 0
    proc = host.run("install", "never-built", "-", "-")
    assert proc.returncode == 1
    assert "never-built is not installed" in proc.stderr
    assert "r1" in proc.stderr and "r2" in proc.stderr
    assert "scripts/build-artifact" in proc.stderr and "cognivern:release" in proc.stderr


# ------------------------------------------------------------------------ activate


def test_first_activation_serves_with_shared_env_and_data(host: ReleaseHost) -> None:
    proc = host.ok("activate", "r1")
    assert os.readlink(host.root / "current") == "releases/r1"
    status, body = host.get_json("/release")
    assert status == 200 and body["release"] == "r1"
    assert body["env"] == {"FIXTURE_ECHO": "hello-from-env", "NODE_ENV": "production", "AGENTS_ENABLED": "false"}
    assert host.get_json("/health")[1]["status"] == "ok"
    r = http_post(host.url("/data"), content="first", timeout=3)
    assert r.status_code == 201
    assert "first" in (host.root / "shared" / "data" / "posts.jsonl").read_text()
    assert SECRET_VALUE not in proc.stderr + proc.stdout
    assert host.log_lines()[-1][1:3] == ["activate", "r1"] and host.log_lines()[-1][5] == "activated"


def test_new_release_and_rollback_without_failed_requests_or_data_changes(serving: ReleaseHost) -> None:
    host = serving
    before = host.data_digest()
    assert before, "the serving fixture wrote shared/data"
    results: list[str] = []
    stop = threading.Event()
    load = threading.Thread(target=hammer, args=(host, stop, results))
    load.start()
    try:
        new = host.ok("activate", "r2")
        assert "starting r2 in slot green (cognivern-agent-green" in new.stderr and "bake: r2 stayed healthy" in new.stderr
        assert host.serving_release() == "r2"
        assert host.data_digest() == before
        back = host.ok("activate", "r1")  # rollback to the first release: a cold start (keepPreviousWarm is off)
        assert "starting r1 in slot blue" in back.stderr
        assert host.serving_release() == "r1"
    finally:
        stop.set()
        load.join()
    assert host.data_digest() == before
    failures = [r for r in results if r != "ok"]
    assert len(results) > 50 and not failures, failures[:5]
    listing = host.list_json()
    assert listing["current"] == "r1" and listing["previous"] == "r2"


def app_pids(host: ReleaseHost) -> dict[str, list[tuple[int, int]]]:
    """PM2 app -> (pid, restart count) of each of its processes."""
    out: dict[str, list[tuple[int, int]]] = {}
    for p in json.loads(host.pm2("jlist").stdout):
        out.setdefault(p["name"], []).append((p["pid"], p["pm2_env"]["restart_time"]))
    return out


def test_reactivating_current_and_reload_are_idempotent(switched: ReleaseHost) -> None:
    host = switched
    backups = sorted((host.root / "backups" / "data").iterdir())
    assert backups, "switching to r2 backed up shared/data"
    pid = host.serving_pid()
    proc = host.ok("activate", "r2")
    assert "release r2 is already current and healthy; nothing to do" in proc.stderr
    assert "PM2" not in proc.stderr and host.serving_pid() == pid, "a healthy current release is not reloaded"
    assert host.current() == "r2" and host.serving_release() == "r2"
    assert sorted((host.root / "backups" / "data").iterdir()) == backups, "no backup for a no-op"
    assert host.list_json()["previous"] == "r1"
    assert host.log_lines()[-1][1:3] == ["activate", "r2"] and host.log_lines()[-1][5] == "already-current"
    host.ok("reload")
    assert host.serving_release() == "r2"


def test_reactivating_a_current_release_that_does_not_answer_healthy_reloads_it(switched: ReleaseHost) -> None:
    host = switched
    host.pm2("stop", "all")  # the live slot answers nothing now
    proc = host.ok("activate", "r2")
    assert "release r2 is already current but does not answer healthy from its release; reloading it" in proc.stderr
    assert "release r2 is current and healthy after the reload" in proc.stderr
    assert host.serving_release() == "r2"


def test_reload_hands_the_env_file_to_the_app_also_when_it_is_the_apps_own_copy(serving: ReleaseHost) -> None:
    """Hosts from before had .env as the app's (0600): its values are not trusted for masking, but
    they are the app's own environment, so an upgrade's first reload must not start it without them."""
    env = serving.root / "shared" / ".env"
    pw = pwd.getpwnam(serving.user)
    env.write_text(env.read_text().replace("FIXTURE_ECHO=hello-from-env", "FIXTURE_ECHO=from-the-apps-copy"))
    os.chown(env, pw.pw_uid, pw.pw_gid)
    env.chmod(0o600)
    proc = serving.ok("reload")
    app_env = serving.get_json("/release")[1]["env"]
    assert isinstance(app_env, dict) and app_env["FIXTURE_ECHO"] == "from-the-apps-copy", proc.stderr


def test_deploy_is_install_activate_prune_and_the_list_in_one_command(
    switched: ReleaseHost, artifacts: dict[str, tuple[Path, str]]
) -> None:
    """`pulumi up` runs one command per server and release; prune keeps the last --keep it was given
    (in the JSON state), so deploy's prune follows keepReleases without naming it."""
    host = switched
    host.ok("prune", "--keep", "2")
    assert host.state()["keep_releases"] == 2
    tarball, sha = artifacts["r3"]
    proc = host.ok("deploy", "r3", str(host.upload(tarball)), sha)
    assert proc.stdout.count("\n") == 1, "stdout is the list alone"
    state = json.loads(proc.stdout)
    assert state["current"] == "r3" and state["previous"] == "r2"
    assert host.serving_release() == "r3"
    assert sorted(p.name for p in (host.root / "releases").iterdir()) == ["r2", "r3"], "deploy's prune kept the 2 it remembers"
    assert [f[1] for f in host.log_lines()[-4:]] == ["prune", "install", "activate", "prune"]
    # an installed release without a source: the whole rollback is this one command
    rollback = host.ok("deploy", "r2", "-", "-")
    assert json.loads(rollback.stdout)["current"] == "r2" and host.serving_release() == "r2"
    # a release that is not here: refused by the install step, nothing switches
    missing = host.run("deploy", "r9", "-", "-")
    assert missing.returncode == 1 and "r9 is not installed" in missing.stderr and missing.stdout == ""
    assert host.serving_release() == "r2" and host.log_lines()[-1][1:3] == ["install", "r9"]


def daemon_environ(host: ReleaseHost) -> tuple[int, list[bytes]]:
    """The PM2 daemon's pid (pm2.pid, waited for with a deadline) and environment."""
    pid_file = host.pm2_home / "pm2.pid"
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=15))
    return pid, Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def round_robin_daemon(host: ReleaseHost) -> int:
    """Replace the host's PM2 daemon by one started without NODE_CLUSTER_SCHED_POLICY (before the fix, or by hand)."""
    host.pm2("kill")
    ping = host.pm2("ping")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    pid, environ = daemon_environ(host)
    assert b"NODE_CLUSTER_SCHED_POLICY=none" not in environ
    return pid


def test_pm2_from_a_directory_the_app_user_cannot_enter_still_starts_the_daemon(
    host: ReleaseHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PM2 spawns its daemon in the caller's cwd: from root's 0700 home (a fresh clone there) that was EACCES."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.chdir(private)
    ping = host.pm2("ping")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    pid, _ = daemon_environ(host)
    assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")


def test_pm2_daemon_lets_workers_accept_connections_themselves(serving: ReleaseHost) -> None:
    """Round-robin in PM2's daemon (the cluster primary) stalls requests handed to exiting workers."""
    host = serving
    _, environ = daemon_environ(host)
    assert b"NODE_CLUSTER_SCHED_POLICY=none" in environ
    # a daemon started without it (before this fix, or by hand) is replaced once by the tool
    old_pid = round_robin_daemon(host)
    reload = host.ok("reload")
    assert "restarting the PM2 daemon once" in reload.stderr
    new_pid, environ = daemon_environ(host)
    assert new_pid != old_pid and b"NODE_CLUSTER_SCHED_POLICY=none" in environ
    assert host.get_json("/health")[0] == 200
    assert "restarting the PM2 daemon" not in host.ok("reload").stderr  # once only


@pytest.mark.parametrize("pid_file", ["missing", "stale"])
def test_round_robin_daemon_is_replaced_even_without_a_true_pid_file(serving: ReleaseHost, pid_file: str) -> None:
    """The tool finds the daemon by PM2_HOME in its environment, not only through pm2.pid (removed by
    any exiting daemon of that PM2_HOME, left stale by a SIGKILL)."""
    host = serving
    old_pid = round_robin_daemon(host)
    path = host.pm2_home / "pm2.pid"
    if pid_file == "missing":
        path.unlink()
    else:
        path.write_text(f"{os.getpid()}\n")  # a live process that is not the daemon (and not the app user's)
    reload = host.ok("reload")
    assert "restarting the PM2 daemon once" in reload.stderr
    new_pid, environ = daemon_environ(host)
    assert new_pid != old_pid and b"NODE_CLUSTER_SCHED_POLICY=none" in environ
    assert not Path(f"/proc/{old_pid}").exists() or b"God Daemon" not in Path(f"/proc/{old_pid}/cmdline").read_bytes()
    assert host.get_json("/health")[0] == 200


def test_activation_from_a_directory_the_app_user_cannot_enter_starts_a_plain_daemon(host: ReleaseHost, tmp_path: Path) -> None:
    """Over SSH the tool runs in root's 0700 home: the slot's start must still start a plain daemon,
    or `pm2 start` spawns it with the app's .env (secrets included) in its environment."""
    private = tmp_path / "root-home"
    private.mkdir(mode=0o700)
    proc = host.run("activate", "r1", cwd=private)
    assert proc.returncode == 0, proc.stderr
    _, environ = daemon_environ(host)
    assert b"NODE_CLUSTER_SCHED_POLICY=none" in environ
    assert not any(e.startswith((b"FIXTURE_SECRET=", b"FIXTURE_ECHO=")) for e in environ), "the app's env is not the daemon's"
    assert host.serving_release() == "r1"


@pytest.mark.parametrize(("rid", "output"), [("crash", "crashing at boot on purpose"), ("sick", "did not answer healthy")])
def test_broken_release_is_refused_at_its_start(
    serving: ReleaseHost, artifacts: dict[str, tuple[Path, str]], rid: str, output: str
) -> None:
    host = serving
    host.install(rid, *artifacts[rid])
    pid_before = host.get_json("/release")[1]["pid"]
    proc = host.run("activate", rid)
    assert proc.returncode == 1
    assert output in proc.stderr and "marked release" in proc.stderr
    assert host.current() == "r1"
    status, body = host.get_json("/release")
    assert status == 200 and body["release"] == "r1" and body["pid"] == pid_before, "the live app was not touched"
    assert host.bad(rid)
    again = host.run("activate", rid)
    assert again.returncode == 1 and "marked bad" in again.stderr
    assert host.log_lines()[-1][5].startswith("refused-bad")


def pm2_names(host: ReleaseHost) -> list[str]:
    return [str(p["name"]) for p in json.loads(host.pm2("jlist").stdout or "[]")]


def test_release_failing_only_under_pm2_is_refused_at_its_start_under_load(
    serving: ReleaseHost, artifacts: dict[str, tuple[Path, str]]
) -> None:
    """The idle slot starts under PM2 (as <APP_NAME>-green), so it sees what plain node cannot."""
    host = serving
    host.install("pm2crash", *artifacts["pm2crash"])
    host.set_conf(HEALTH_TIMEOUT="30")  # a crash loop must end the wait long before this
    pid_before = host.get_json("/release")[1]["pid"]
    results: list[str] = []
    stop = threading.Event()
    load = threading.Thread(target=hammer, args=(host, stop, results))
    load.start()
    try:
        started = time.monotonic()
        proc = host.run("activate", "pm2crash")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        load.join()
    assert proc.returncode == 1, proc.stderr
    assert "starting pm2crash in slot green (cognivern-agent-green" in proc.stderr
    assert "cognivern-agent-green crash-looping" in proc.stderr and "crashing at boot on purpose" in proc.stderr
    assert "switching current" not in proc.stderr
    limit = 30  # HEALTH_TIMEOUT here; the crash loop is seen in a few seconds (12 s once on a loaded machine)
    assert elapsed < limit, f"a crash loop is given up on early, not after HEALTH_TIMEOUT ({limit}s): {elapsed:.1f}s"
    assert host.current() == "r1"
    status, body = host.get_json("/release")
    assert status == 200 and body["release"] == "r1" and body["pid"] == pid_before, "the live app was not touched"
    failures = [r for r in results if r != "ok"]
    assert len(results) > 20 and not failures, failures[:5]
    assert pm2_names(host) == ["cognivern-agent-blue"], "the slot it was started in is deleted"
    assert host.slots() == {"live": "blue", "blue": "r1", "green": "", "agent": "r1"}
    assert host.bad("pm2crash")
    assert host.log_lines()[-1][1:3] == ["activate", "pm2crash"] and host.log_lines()[-1][5] == "start-failed(exit=1)"


def test_starting_slot_is_deleted_when_the_tool_is_killed(serving: ReleaseHost, artifacts: dict[str, tuple[Path, str]]) -> None:
    host = serving
    host.install("sleepy", *artifacts["sleepy"])  # listens only after 8 s: still starting when killed
    proc = host.popen("activate", "sleepy")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "cognivern-agent-green" not in pm2_names(host):
            time.sleep(0.2)
        green = next(p for p in json.loads(host.pm2("jlist").stdout) if p["name"] == "cognivern-agent-green")
        env = green["pm2_env"]
        # started the way the live slot is: cluster, one instance, the ecosystem's wait_ready and timeouts
        assert (env["exec_mode"], env["instances"], env["wait_ready"]) == ("cluster_mode", 1, True), env
        assert (env["listen_timeout"], env["kill_timeout"]) == (4000, 3000)
        assert env["pm_cwd"] == str(host.root / "releases" / "sleepy")
        assert env["pm_out_log_path"] == str(host.root / "shared" / "logs" / "out.log")
        assert env["env"]["FIXTURE_ECHO"] == "hello-from-env" and env["env"]["NODE_ENV"] == "production"
        assert env["env"]["PORT"] == str(host.port + 1), "the green slot's port wins over shared/.env's PORT"
        _, environ = daemon_environ(host)
        assert f"PORT={host.port + 1}".encode() not in environ, "only the app's env"
    finally:
        proc.terminate()  # SIGTERM: the EXIT trap runs
        proc.communicate(timeout=150)  # a deadline: PM2 may still be waiting for the slow app when SIGTERM comes
    assert pm2_names(host) == ["cognivern-agent-blue"], "the EXIT trap deletes the slot being started"
    assert host.current() == "r1" and host.serving_release() == "r1"
    host.ok("reload")
    dump = json.loads((host.pm2_home / "dump.pm2").read_text())
    assert [p["name"] for p in dump] == ["cognivern-agent-blue"], "never saved into PM2's dump"


def test_release_failing_only_after_the_switch_is_rolled_back(switched: ReleaseHost, artifacts: dict[str, tuple[Path, str]]) -> None:
    host = switched
    host.install("late", *artifacts["late"])
    host.set_conf(BAKE_SECONDS="12")  # the first boot lives 4 s: its crash loop starts inside the bake
    proc = host.run("activate", "late")
    assert proc.returncode == 1, proc.stderr
    assert "switching current: r2 -> late (slot green -> blue)" in proc.stderr and "late failed its bake" in proc.stderr
    assert "switching back to r2 (slot green, still warm)" in proc.stderr and "rolled back" in proc.stderr
    # The bake may stop at the first crash (after boot) or at a restart's (at boot): either is in the tail.
    assert "on purpose (mode=crash-loop-after)" in proc.stderr, "the tail of shared/logs/error.log is shown"
    assert os.readlink(host.root / "current") == "releases/r2"
    assert host.serving_release() == "r2"
    listing = host.list_json()
    assert listing["current"] == "r2" and listing["previous"] == "r1"
    assert host.bad("late")
    assert pm2_names(host) == ["cognivern-agent-green"]
    assert host.log_lines()[-1][1:3] == ["activate", "late"] and host.log_lines()[-1][5] == "rolled-back(exit=1)"


def test_second_activation_fails_fast_naming_the_holder(serving: ReleaseHost) -> None:
    host = serving
    first = host.popen("activate", "r2")
    lock = host.root / ".deploy" / "lock"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "action=activate id=r2" not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.02)
    started = time.monotonic()
    second = host.run("activate", "r1")
    elapsed = time.monotonic() - started
    _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 3
    assert elapsed < 2, elapsed
    # the holder is the activation's worker (detached from the caller, so it outlives an SSH drop)
    assert re.search(r"pid=\d+ ", second.stderr) and "action=activate id=r2" in second.stderr and "since=" in second.stderr
    assert host.serving_release() == "r2"
    assert any(f[1:3] == ["activate", "r1"] and f[5] == "locked(exit=3)" for f in host.log_lines())


def test_the_same_activation_asked_again_waits_for_the_running_one_and_converges(serving: ReleaseHost) -> None:
    """A re-run after a lost connection (or a killed `pulumi up`) meets its own detached worker."""
    host = serving
    first = host.popen("activate", "r2")
    lock = host.root / ".deploy" / "lock"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "action=activate id=r2" not in (lock.read_text() if lock.exists() else ""):
        time.sleep(0.02)
    second = host.run("activate", "r2")
    _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 0, second.stderr
    assert "the activation of r2 is already under way" in second.stderr and "waiting for it to finish" in second.stderr
    assert "already current" in second.stderr, second.stderr
    assert host.serving_release() == "r2"


# ------------------------------------------------------------------------ data


def test_backup_and_restore(serving: ReleaseHost) -> None:
    host = serving
    assert http_post(host.url("/data"), content="kept", timeout=3).status_code == 201
    proc = host.ok("backup")
    backup = Path(proc.stdout.strip())
    assert backup.is_file() and backup.parent == host.root / "backups" / "data"
    saved = host.data_digest()
    assert http_post(host.url("/data"), content="after-backup", timeout=3).status_code == 201
    assert host.data_digest() != saved
    host.ok("restore", backup.name)
    assert host.data_digest() == saved
    posts = host.root / "shared" / "data" / "posts.jsonl"
    assert posts.stat().st_uid == pwd.getpwnam(host.user).pw_uid
    assert host.serving_release() == "r1"
    # the app writes to the restored directory, through the release's data link
    assert http_post(host.url("/data"), content="after-restore", timeout=3).status_code == 201
    assert "after-restore" in posts.read_text()
    assert any("before-restore" in p.name for p in backup.parent.iterdir())
    assert len(list(backup.parent.glob("data-*.tar.gz"))) <= 3, "DATA_BACKUPS_KEEP=3"


# ------------------------------------------------------------------------ list, status, prune, log


def test_list_json_states_and_status(switched: ReleaseHost, artifacts: dict[str, tuple[Path, str]]) -> None:
    host = switched
    host.install("crash", *artifacts["crash"])
    assert host.run("activate", "crash").returncode == 1  # refused at its start: marked bad
    host.install("r3", *artifacts["r3"])
    (host.root / "releases" / "stale").mkdir()
    (host.root / "releases" / "stale" / ".cognivern-unfinished").touch()
    listing = host.list_json()
    assert listing["current"] == "r2" and listing["previous"] == "r1"
    states = {r["id"]: r["state"] for r in listing["releases"]}
    assert states == {"r1": "previous", "r2": "current", "crash": "bad", "r3": "installed", "stale": "unfinished"}
    releases = listing["releases"]
    assert isinstance(releases, list)
    times = [r["installed_at"] for r in releases]
    assert all(ISO.match(t) for t in times) and times == sorted(times, reverse=True)
    assert all(isinstance(r["size_bytes"], int) and r["size_bytes"] > 0 for r in releases)
    text = host.ok("list").stdout + host.ok("status").stdout
    assert "current:  r2" in text and '"status":"ok"' in text and "online" in text
    assert SECRET_VALUE not in text + str(listing)


def test_prune_keeps_current_previous_and_installs_in_progress(switched: ReleaseHost, artifacts: dict[str, tuple[Path, str]]) -> None:
    host = switched
    assert host.run("prune", "--keep", "1").returncode == 2
    host.install("crash", *artifacts["crash"])
    assert host.run("activate", "crash").returncode == 1  # marked bad
    host.install("half", *artifacts["r1"])
    for rid in ("r3", "r4"):
        host.install(rid, *artifacts[rid])
    busy = host.root / "releases" / "busy"
    busy.mkdir()
    (busy / ".cognivern-unfinished").touch()
    (host.root / ".deploy" / "locks").mkdir(exist_ok=True)
    with open(host.root / ".deploy" / "locks" / "install-busy.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an install of "busy" is in progress
        proc = host.ok("prune", "--keep", "2")
    assert "being installed" in proc.stderr
    left = sorted(p.name for p in (host.root / "releases").iterdir())
    assert left == ["busy", "r1", "r2", "r3", "r4"]
    assert host.serving_release() == "r2"
    assert not host.bad("crash")
    assert not (host.root / "incoming" / "cognivern-crash.tar.gz").exists(), "pruned releases' uploads go too"
    assert (host.root / "incoming" / "cognivern-r3.tar.gz").exists()


def test_a_prune_waits_for_the_deploy_lock_another_process_holds(serving: ReleaseHost) -> None:
    """A killed `pulumi up` leaves its deploy running on the server; the re-run's deploy reaches its
    prune while that one holds the lock for its own. Housekeeping waits (bounded by the longest an
    activation holds the lock) instead of failing the re-run with "another deploy is in progress"."""
    host = serving
    with open(host.root / ".deploy" / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)  # the holder's line, as the tool writes it
        lock.write("pid=1 user=root action=prune id=- since=2026-12-05T00:00:00Z\n")
        lock.flush()
        waiting = host.popen("prune", "--keep", "2")
        time.sleep(1.5)
        assert waiting.poll() is None, waiting.communicate()
    _out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "the deploy lock is held (pid=1 user=root action=prune" in err and "waiting up to" in err
    assert host.log_lines()[-1][1] == "prune" and host.log_lines()[-1][5] != "locked(exit=3)"


def test_release_log_has_one_line_per_action(serving: ReleaseHost) -> None:
    host = serving
    backup = Path(host.ok("backup").stdout.strip())
    host.ok("restore", backup.name)
    host.ok("reload")
    host.ok("prune", "--keep", "2")
    lines = host.log_lines()
    assert all(len(fields) == 6 for fields in lines), lines
    assert all(ISO.match(fields[0]) for fields in lines)
    assert [f[1] for f in lines] == ["install", "install", "activate", "backup", "restore", "reload", "prune"], lines
    installs = [f for f in lines if f[1] == "install" and f[2] == "r2"]
    assert re.match(r"^[0-9a-f]{64}$", installs[0][4]) and installs[0][5] == "installed"
    assert installs[0][3] in ("root", os.environ.get("SUDO_USER", "root"))
    assert lines[2][2] == "r1" and lines[2][5] == "activated"
    assert SECRET_VALUE not in (host.root / ".deploy" / "releases.log").read_text()


# ------------------------------------------------------------------------ first deploy


def test_failed_first_deploy_leaves_no_current(host: ReleaseHost, artifacts: dict[str, tuple[Path, str]]) -> None:
    host.install("late", *artifacts["late"])
    host.set_conf(BAKE_SECONDS="12")  # the first boot lives 4 s: its crash loop starts inside the bake
    proc = host.run("activate", "late")
    assert proc.returncode == 1
    assert "first deploy" in proc.stderr
    assert not os.path.lexists(host.root / "current")
    assert "cognivern-agent" not in host.pm2("jlist").stdout, "the app's PM2 processes are gone"
    for port in (host.port, host.port + 1):  # neither slot listens (nginx in front answers 502)
        with pytest.raises(httpx.ConnectError):
            http_get(f"http://127.0.0.1:{port}/health", timeout=2)
    listing = host.list_json()
    assert listing["current"] is None and listing["previous"] is None
    assert {r["id"]: r["state"] for r in listing["releases"]} == {"late": "bad", "r1": "installed", "r2": "installed"}
