"""The activation state machine in-process: no SSH, no PM2, no nginx (issue 23's proof).

cognivern_release.activation.Machine runs on injected edges; here they are a small simulation
(`World`): PM2 apps with pids, restart counts and working directories, health by port, nginx's
upstream, `current`, and a virtual clock (sleep moves it; nothing waits). The state is the real
JSON store (cognivern_release.state) on a temp ROOT. Each test starts from a known state and checks
the end state: slots, current, previous, journal, bad marks, the upstream, what PM2 runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from components.release.cognivern_release import activation, state
from components.release.cognivern_release.activation import ActivationError, Machine
from components.release.cognivern_release.config import Config
from components.release.cognivern_release.proc import Account

PORT = 4000
BLUE, GREEN = "app-blue", "app-green"


@dataclass
class Behaviour:
    """How a release behaves in a slot: healthy from `healthy_after` s after its start until
    `dies_at` s after it (then down: PM2 restarts it, restarts +1 each `restart_every` s)."""

    healthy_after: float = 1.0
    dies_at: float | None = None
    never_healthy: bool = False
    crash_at_boot: bool = False  # PM2 restarts it at once, again and again
    restart_every: float = 0.5


@dataclass
class App:
    name: str
    release: str
    started: float
    pid: int
    restarts: int = 0
    runs_from: str | None = None  # a cwd other than the release's (PM2 changed behind the state)


@dataclass
class World:
    """Everything outside the machine, simulated. `releases`: id -> Behaviour."""

    root: Path
    releases: dict[str, Behaviour]
    clock: float = 1000.0
    apps: dict[str, App] = field(default_factory=dict)
    upstreams: list[tuple[int, int | None]] = field(default_factory=list)
    nginx_refuses: bool = False
    current_id: str | None = None
    said: list[str] = field(default_factory=list)
    backups: list[str] = field(default_factory=list)
    started: list[tuple[str, str]] = field(default_factory=list)  # (app, release) at each start
    recoveries: list[tuple[str, str]] = field(default_factory=list)
    next_pid: int = 100
    store: state.Store | None = None
    stop_at_phase: str | None = None  # raise KeyboardInterrupt (a SIGTERM) once the journal reaches it
    stop_after_start: bool = False  # raise KeyboardInterrupt right after an app is started
    agents: list[str] = field(default_factory=list)

    # -- clock
    def say(self, msg: str) -> None:
        self.said.append(msg)

    def now(self) -> float:
        return self.clock

    def sleep(self, seconds: float) -> None:
        self.clock += seconds

    # -- PM2
    def _age(self, app: App) -> float:
        return self.clock - app.started

    def _down(self, app: App) -> bool:
        b = self.releases[app.release]
        return b.crash_at_boot or (b.dies_at is not None and self._age(app) >= b.dies_at)

    def _restarts(self, app: App) -> int:
        b = self.releases[app.release]
        if b.crash_at_boot:
            return app.restarts + int(self._age(app) / b.restart_every) + 1
        if b.dies_at is not None and self._age(app) >= b.dies_at:
            return app.restarts + 1 + int((self._age(app) - b.dies_at) / b.restart_every)
        return app.restarts

    def pm2_list(self) -> list[dict[str, Any]] | None:
        return [
            {"name": a.name, "pid": a.pid, "pm_id": i, "pm2_env": {"status": "online", "restart_time": self._restarts(a)}}
            for i, a in enumerate(self.apps.values())
        ]

    def cwd(self, pid: int) -> str | None:
        for a in self.apps.values():
            if a.pid == pid:
                return a.runs_from or str(self.root / "releases" / a.release)
        return None

    def release_dir(self, rid: str) -> str | None:
        return str(self.root / "releases" / rid) if rid in self.releases else None

    def start_apps(self, only: str) -> bool:
        assert self.store is not None
        slots = self.store.read()["slots"]
        wanted = {BLUE: slots["blue"], GREEN: slots["green"], **dict.fromkeys(self.agents, slots["agent"])}
        for name in only.split(",") if only else wanted:
            release = wanted.get(name)
            if release and name not in self.apps:
                self.next_pid += 1
                self.apps[name] = App(name, release, self.clock, self.next_pid)
                self.started.append((name, release))
        if self.stop_after_start:
            self.stop_after_start = False
            raise KeyboardInterrupt
        return True

    def delete_app(self, name: str) -> None:
        self.apps.pop(name, None)

    def app_pids(self, name: str) -> list[int]:
        return [self.apps[name].pid] if name in self.apps else []

    def kill(self, pids: list[int]) -> None:
        raise AssertionError("a deleted app leaves no process here")

    def pm2_save(self) -> None:
        pass

    def delete_all_apps(self) -> None:
        self.apps.clear()

    # -- health, nginx, current
    def health(self, url: str) -> bool:
        port = int(url.split(":")[2].split("/")[0])
        name = BLUE if port == PORT else GREEN
        app = self.apps.get(name)
        if app is None:
            return False
        b = self.releases[app.release]
        return not b.never_healthy and not self._down(app) and self._age(app) >= b.healthy_after

    def upstream(self, live_port: int, backup_port: int | None) -> bool:
        if self.nginx_refuses:
            return False
        self.upstreams.append((live_port, backup_port))
        return True

    def current(self) -> str | None:
        return self.current_id

    def set_current(self, rid: str | None) -> None:
        self.current_id = rid

    def backup(self, label: str) -> str:
        self.backups.append(label)
        return f"/backups/{label}"

    def error_log(self) -> None:
        self.said.append("(error log)")

    def log_recovery(self, rid: str, phase: str) -> None:
        self.recoveries.append((rid, phase))


class InterruptingStore(state.Store):
    """The real store; raises KeyboardInterrupt (what SIGTERM does in the tool) once the journal
    reaches `world.stop_at_phase`: a worker stopped at that point."""

    def __init__(self, root_fd: int, world: World) -> None:
        super().__init__(root_fd)
        self.world = world

    def update(self) -> Any:
        outer = super().update()
        world = self.world

        class Wrapped:
            def __enter__(self) -> state.State:
                self.st: state.State = outer.__enter__()
                return self.st

            def __exit__(self, *exc: Any) -> Any:
                result = outer.__exit__(*exc)
                j = self.st.get("journal")
                if exc[0] is None and j and world.stop_at_phase == j["phase"]:
                    world.stop_at_phase = None
                    raise KeyboardInterrupt
                return result

        return Wrapped()


def config(**overrides: Any) -> Config:
    app = Account("app", 1001, 1001, "/home/app")
    values: dict[str, Any] = {
        "root": "/r",
        "app": app,
        "build": None,
        "build_user": "app-build",
        "app_name": "app",
        "port": PORT,
        "health_path": "/health",
        "health_timeout": 10,
        "keep_releases": 5,
        "data_backups_keep": 5,
        "bake_seconds": 10,
        "keep_previous_warm": False,
        "agent_apps": (),
        "nginx_conf": "/etc/nginx/nginx.conf",
        "nginx_prefix": "",
        "nginx_upstream": "/etc/nginx/sites-available/app.upstream",
        "upstream_name": "app_app",
        "pm2_home": "/home/app/.pm2",
        "secret_keys": (),
    }
    return Config(**{**values, **overrides})


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    (tmp_path / ".deploy").mkdir()
    (tmp_path / "config").mkdir()
    w = World(tmp_path, {"r1": Behaviour(), "r2": Behaviour(), "r3": Behaviour()})
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    w.store = InterruptingStore(fd, w)
    yield w
    os.close(fd)


def machine(world: World, **cfg: Any) -> Machine:
    assert world.store is not None
    return Machine(config(**cfg), world.store, world)


def st(world: World) -> state.State:
    assert world.store is not None
    return world.store.read()


def live_on(world: World, rid: str = "r1", **cfg: Any) -> None:
    """`rid` activated (first deploy): live in blue."""
    assert machine(world, **cfg).activate(rid, False, 1) == "activated"
    world.said.clear()
    world.upstreams.clear()


def bad(world: World, rid: str) -> str | None:
    meta: dict[str, Any] = st(world)["releases"].get(rid, {})
    return None if "bad" not in meta else str(meta["bad"]["reason"])


# ---------------------------------------------------------------------------- the switch and the bake
def test_a_first_deploy_starts_blue_switches_and_bakes(world: World) -> None:
    assert machine(world).activate("r1", False, 1) == "activated"
    s = st(world)
    assert s["slots"] == {"live": "blue", "blue": "r1", "green": None, "agent": "r1"}
    assert (world.current_id, s["previous"], s["journal"]) == ("r1", None, None)
    assert world.upstreams == [(PORT, None)] and world.backups == ["before-r1"] and set(world.apps) == {BLUE}
    assert world.said.index("switching current: none -> r1 (slot none -> blue)") < world.said.index("bake: r1 stayed healthy for 10s")


def test_a_good_release_goes_to_the_idle_slot_with_the_old_one_as_backup_then_the_old_stops(world: World) -> None:
    live_on(world)
    assert machine(world).activate("r2", False, 2) == "activated"
    s = st(world)
    assert s["slots"] == {"live": "green", "blue": None, "green": "r2", "agent": "r2"}
    assert (world.current_id, s["previous"]) == ("r2", "r1")
    assert world.upstreams == [(PORT + 1, PORT)], "one reload: the stopped slot stays as backup"
    assert set(world.apps) == {GREEN} and "stopping slot blue (r1)" in world.said


@pytest.mark.parametrize(
    ("behaviour", "said"),
    [
        (Behaviour(never_healthy=True), "app-green did not answer healthy at http://127.0.0.1:4001/health within 10s"),
        (Behaviour(crash_at_boot=True), "PM2 reports app-green crash-looping (restarts 0 -> 2, errored/stopped: 0, processes: 1)"),
    ],
)
def test_a_release_that_never_starts_healthy_never_reaches_nginx(world: World, behaviour: Behaviour, said: str) -> None:
    live_on(world)
    world.releases["bad"] = behaviour
    with pytest.raises(ActivationError) as failed:
        machine(world).activate("bad", False, 2)
    assert failed.value.result == "start-failed" and said in world.said
    s = st(world)
    assert s["slots"] == {"live": "blue", "blue": "r1", "green": None, "agent": "r1"}
    assert (world.current_id, s["previous"], s["journal"], world.upstreams) == ("r1", None, None, [])
    assert bad(world, "bad") == "did not start healthy in slot green" and set(world.apps) == {BLUE}


def test_a_release_that_dies_in_its_bake_is_switched_back_to_the_warm_old_slot(world: World) -> None:
    live_on(world)
    world.releases["late"] = Behaviour(dies_at=4.0)
    with pytest.raises(ActivationError) as failed:
        machine(world).activate("late", False, 2)
    assert failed.value.result == "rolled-back"
    s = st(world)
    assert s["slots"] == {"live": "blue", "blue": "r1", "green": None, "agent": "r1"}, "the agent never moved"
    assert (world.current_id, s["previous"], s["journal"]) == ("r1", None, None)
    assert world.upstreams == [(PORT + 1, PORT), (PORT, None)]
    assert str(bad(world, "late")).startswith("failed its bake: PM2 restarted or lost it (restarts 0 -> 1")
    assert set(world.apps) == {BLUE} and world.started[-1] == (GREEN, "late")
    assert "switching back to r1 (slot blue, still warm)" in world.said


def test_three_failed_health_checks_in_a_row_fail_the_bake(world: World) -> None:
    live_on(world)
    world.releases["sick"] = Behaviour(healthy_after=0.5)
    m = machine(world)
    original, sick_from = world.health, world.clock + 5  # healthy for its start, then 500 in the bake
    world.health = lambda url: original(url) if url.endswith(":4000/health") or world.clock < sick_from else False  # type: ignore[method-assign]
    with pytest.raises(ActivationError):
        m.activate("sick", False, 2)
    assert bad(world, "sick") == "failed its bake: http://127.0.0.1:4001/health did not answer ok three times in a row"


def test_a_first_deploy_that_fails_its_bake_leaves_nothing_running(world: World) -> None:
    world.releases["late"] = Behaviour(dies_at=4.0)
    with pytest.raises(ActivationError) as failed:
        machine(world).activate("late", False, 1)
    assert failed.value.result == "first-deploy-failed"
    s = st(world)
    assert (world.current_id, world.apps, s["slots"]["agent"], s["journal"]) == (None, {}, None, None)
    assert str(bad(world, "late")).startswith("failed its bake (first deploy)")


def test_nginx_refusing_the_switch_stops_the_new_slot_and_marks_nothing_bad(world: World) -> None:
    live_on(world)
    world.nginx_refuses = True
    with pytest.raises(ActivationError) as failed:
        machine(world).activate("r2", False, 2)
    assert failed.value.result == "nginx-refused"
    s = st(world)
    assert (world.current_id, s["previous"], s["journal"], bad(world, "r2")) == ("r1", None, None, None)
    assert s["slots"] == {"live": "blue", "blue": "r1", "green": None, "agent": "r1"} and set(world.apps) == {BLUE}


def test_a_warm_rollback_switches_without_a_start_or_a_backup(world: World) -> None:
    live_on(world, keep_previous_warm=True)
    machine(world, keep_previous_warm=True).activate("r2", False, 2)
    started, backups = list(world.started), list(world.backups)
    assert machine(world, keep_previous_warm=True).activate("r1", False, 3) == "activated"
    assert world.started == started and world.backups == backups, "nothing started, no backup"
    assert "release r1 is warm in slot blue: switching without a start" in world.said
    s = st(world)
    assert s["slots"] == {"live": "blue", "blue": "r1", "green": "r2", "agent": "r1"} and world.current_id == "r1"


def test_a_warm_slot_whose_workers_run_another_release_fails_its_first_bake_check(world: World) -> None:
    live_on(world, keep_previous_warm=True)
    machine(world, keep_previous_warm=True).activate("r2", False, 2)
    with world.store.update() as s:  # type: ignore[union-attr]
        s["slots"]["blue"] = "r3"  # the state says r3; blue's workers run r1
    with pytest.raises(ActivationError) as failed:
        machine(world, keep_previous_warm=True).activate("r3", False, 3)
    assert failed.value.result == "rolled-back"
    assert str(bad(world, "r3")).startswith("failed its bake: slot blue's workers do not run from releases/r3")
    assert world.current_id == "r2" and st(world)["slots"]["live"] == "green"


def test_the_agent_moves_only_after_the_bake(world: World) -> None:
    world.agents = ["agent"]
    live_on(world, agent_apps=("agent",))
    assert world.apps["agent"].release == "r1"
    seen: list[str] = []
    original = world.sleep
    world.sleep = lambda s: (seen.append(world.apps["agent"].release), original(s))[-1]  # type: ignore[assignment,func-returns-value,method-assign]
    machine(world, agent_apps=("agent",)).activate("r2", False, 2)
    assert set(seen) == {"r1"}, "on r1 while r2 started and baked"
    assert world.apps["agent"].release == "r2" and st(world)["slots"]["agent"] == "r2"


def test_activating_the_current_release_only_checks_it(world: World) -> None:
    live_on(world)
    assert machine(world).activate("r1", False, 2) == "already-current"
    assert world.upstreams == [] and world.started == [(BLUE, "r1")], "nothing reloaded"
    assert "release r1 is already current and healthy; nothing to do" in world.said


def test_activating_the_current_release_that_does_not_answer_reloads_it(world: World) -> None:
    live_on(world)
    world.apps.clear()  # the live slot answers nothing (PM2 stopped it)
    assert machine(world).activate("r1", False, 2) == "already-current-reloaded"
    assert world.started == [(BLUE, "r1"), (BLUE, "r1")] and world.upstreams == []


def test_force_clears_the_bad_mark_once_the_release_passes(world: World) -> None:
    live_on(world)
    machine(world).mark_bad("r2", "an earlier try")
    machine(world).activate("r2", True, 2)
    assert bad(world, "r2") is None


# ---------------------------------------------------------------------------- a worker stopped mid-way, and recovery
@pytest.mark.parametrize("phase", ["backup", "starting"])
def test_a_worker_stopped_before_the_switch_undoes_its_start(world: World, phase: str) -> None:
    live_on(world)
    world.stop_at_phase = phase
    with pytest.raises(KeyboardInterrupt):
        machine(world).activate("r2", False, 2)
    s = st(world)
    assert s["journal"] is None and s["slots"] == {"live": "blue", "blue": "r1", "green": None, "agent": "r1"}
    assert set(world.apps) == {BLUE} and world.current_id == "r1"


def killed_at(world: World, phase: str, rid: str = "r2") -> None:
    """A worker SIGKILLed right after writing `phase` (for "starting": once its slot started): the
    journal stays, nothing undone."""
    if phase == "starting":
        world.stop_after_start = True
    else:
        world.stop_at_phase = phase
    m = machine(world)
    original = m._undo_start
    m._undo_start = lambda: None  # type: ignore[method-assign]  # SIGKILL: no clean-up runs
    with pytest.raises(KeyboardInterrupt):
        m.activate(rid, False, 2)
    m._undo_start = original  # type: ignore[method-assign]
    assert st(world)["journal"]["phase"] == phase  # type: ignore[index]


def test_recovery_after_the_backup_changes_nothing(world: World) -> None:
    live_on(world)
    killed_at(world, "backup")
    machine(world).recover()
    assert "recovered: current (r1) was not switched" in world.said
    assert st(world)["journal"] is None and world.recoveries == [("r2", "backup")]


def test_recovery_while_starting_stops_the_half_started_slot(world: World) -> None:
    live_on(world)
    killed_at(world, "starting")
    assert GREEN in world.apps
    machine(world).recover()
    s = st(world)
    assert GREEN not in world.apps and s["slots"]["green"] is None and s["journal"] is None and world.current_id == "r1"


def test_recovery_of_an_interrupted_bake_goes_back_to_the_warm_old_slot_without_a_bad_mark(world: World) -> None:
    live_on(world)
    killed_at(world, "switched")
    world.sleep(3)
    machine(world).recover()
    s = st(world)
    assert (world.current_id, s["slots"]["live"], s["previous"], s["journal"], bad(world, "r2")) == ("r1", "blue", None, None, None)
    assert GREEN not in world.apps and world.upstreams[-1] == (PORT, None)
    assert world.recoveries == [("r2", "switched")]


def test_recovery_of_an_interrupted_first_deploy_keeps_it_when_healthy(world: World) -> None:
    killed_at(world, "switched", "r1")
    machine(world).recover()
    s = st(world)
    assert (world.current_id, s["slots"]["live"], s["slots"]["agent"], s["journal"]) == ("r1", "blue", "r1", None)


def test_recovery_of_an_interrupted_first_deploy_that_is_not_healthy_removes_it(world: World) -> None:
    killed_at(world, "switched", "r1")
    world.releases["r1"].dies_at = 0.0  # down now
    machine(world).recover()
    assert (world.current_id, world.apps, st(world)["journal"]) == (None, {}, None)


def test_recovery_of_an_interrupted_revert_finishes_it(world: World) -> None:
    live_on(world)
    world.releases["late"] = Behaviour(dies_at=4.0)
    killed_at(world, "reverting", "late")
    machine(world).recover()
    s = st(world)
    assert (world.current_id, s["slots"]["live"], s["journal"]) == ("r1", "blue", None) and GREEN not in world.apps


def test_recovery_of_an_interrupted_finish_moves_the_agent_and_stops_the_old_slot(world: World) -> None:
    live_on(world)
    killed_at(world, "finishing")
    machine(world).recover()
    s = st(world)
    assert s["slots"] == {"live": "green", "blue": None, "green": "r2", "agent": "r2"} and s["journal"] is None
    assert set(world.apps) == {GREEN} and world.current_id == "r2"


def test_no_journal_no_recovery(world: World) -> None:
    live_on(world)
    machine(world).recover()
    assert world.recoveries == [] and not [m for m in world.said if m.startswith("recover")]


def test_iso_now_is_utc_seconds() -> None:
    assert activation.iso_now(lambda: 0.0) == "1970-01-01T00:00:00Z"
