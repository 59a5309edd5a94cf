"""Blue/green activation as a journalled state machine, over injected edges (PM2, nginx, health).

The release starts for real in the idle slot while the live one serves; once healthy, nginx's
upstream and `current` switch to it with the old slot as nginx `backup`, and it bakes for
BAKE_SECONDS. A release that crashes, crash-loops or fails its health check in the bake is switched
back to the still-warm old slot and marked bad; one that never starts healthy never reaches nginx.

Every step writes its phase to the state's journal first (backup, starting, switched, reverting,
finishing), so whatever takes the deploy lock after a killed worker settles it (`recover`): a slot
still starting is stopped; an interrupted bake is not a passed one, so nginx goes back to the old
slot while it still answers healthy; a revert or finish is done again.

`Edges` is everything outside this module; the server's are in server.py, the unit tests bring
their own (tests/test_activation_machine.py), so the logic runs with no PM2, nginx or SSH.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

from . import facts, pm2
from .config import Config
from .proc import iso_now
from .state import State, Store

HEALTH_EVERY = 0.25  # seconds between health checks (the watcher's rhythm; PM2 is asked every 4th)


class ActivationError(Exception):
    """The command fails (exit 1) with this action result in releases.log; the message is said first."""

    def __init__(self, result: str, message: str | None = None) -> None:
        super().__init__(message or result)
        self.result = result
        self.message = message


class Edges(Protocol):
    def say(self, msg: str) -> None: ...
    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    def health(self, url: str) -> bool: ...
    def pm2_list(self) -> list[dict[str, Any]] | None: ...
    def cwd(self, pid: int) -> str | None: ...
    def release_dir(self, rid: str) -> str | None: ...
    def start_apps(self, only: str) -> bool: ...
    def delete_app(self, name: str) -> None: ...
    def app_pids(self, name: str) -> list[int]: ...
    def kill(self, pids: list[int]) -> None: ...
    def pm2_save(self) -> None: ...
    def delete_all_apps(self) -> None: ...
    def upstream(self, live_port: int, backup_port: int | None) -> bool: ...
    def current(self) -> str | None: ...
    def set_current(self, rid: str | None) -> None: ...
    def backup(self, label: str) -> str: ...
    def error_log(self) -> None: ...
    def log_recovery(self, rid: str, phase: str) -> None: ...


class Verdict(NamedTuple):
    """What a watch ended with: "ok", or why not (the tool's messages say it in words)."""

    kind: str  # healthy: ok, crash, timeout; bake: ok, stale, restarts, sick, unanswered
    numbers: tuple[int, ...] = ()


class Machine:
    def __init__(self, cfg: Config, store: Store, edges: Edges) -> None:
        self.cfg = cfg
        self.store = store
        self.e = edges
        self.journal: dict[str, Any] | None = None

    # ------------------------------------------------------------------ state
    @contextmanager
    def _state(self) -> Iterator[State]:
        with self.store.update() as st:
            yield st

    def slots(self) -> dict[str, Any]:
        slots: dict[str, Any] = self.store.read()["slots"]
        return slots

    def _set_slot(self, slot: str, rid: str | None) -> None:
        with self._state() as st:
            st["slots"][slot] = rid

    def _phase(self, phase: str) -> None:
        assert self.journal is not None
        self.journal["phase"] = phase
        with self._state() as st:
            st["journal"] = dict(self.journal)

    def _clear_journal(self) -> None:
        self.journal = None
        with self._state() as st:
            st["journal"] = None

    def _record_previous(self, rid: str | None) -> None:
        with self._state() as st:
            st["previous"] = rid

    def mark_bad(self, rid: str, reason: str) -> None:
        with self._state() as st:
            st["releases"].setdefault(rid, {})["bad"] = {"marked_at": iso_now(), "reason": reason}
        self.e.say(f"marked release {rid} bad ({reason}); deploy a fixed build under a new id (or activate --force {rid})")

    # ------------------------------------------------------------------ watching a slot
    def _served_from(self, plist: list[dict[str, Any]] | None, app: str, directory: str) -> bool:
        pids = pm2.online_pids(plist or [], app)
        return bool(pids) and all(self.e.cwd(pid) == directory for pid in pids)

    def watch_healthy(self, slot: str, directory: str, seconds: float, base: int | None) -> Verdict:
        """Until the slot answers healthy from `directory` (ok), PM2 shows a crash loop (crash: 2
        restarts more than `base`, a process errored or stopped, or none), or `seconds` pass
        (timeout). `base` None: PM2's restart count now."""
        app, url = self.cfg.slot_app(slot), self.cfg.slot_url(slot)
        deadline = self.e.now() + seconds
        if base is None:
            plist = self.e.pm2_list()
            base = pm2.restarts_of(plist, app)[0] if plist else 0
        n = 0
        while self.e.now() < deadline:
            n += 1
            if self.e.health(url) and self._served_from(self.e.pm2_list(), app, directory):
                return Verdict("ok")
            if n % 4 == 0:
                plist = self.e.pm2_list()
                if plist is not None:
                    restarts, down, count = pm2.restarts_of(plist, app)
                    if count == 0 or down > 0 or restarts >= base + 2:
                        return Verdict("crash", (base, restarts, down, count))
            self.e.sleep(HEALTH_EVERY)
        return Verdict("timeout")

    def watch_bake(self, slot: str, directory: str, seconds: float) -> Verdict:
        """PM2's counters only grow and its statuses stay, so asking once a second (every 4th turn)
        misses nothing; the health check every 250 ms sees a dead slot sooner (nginx sends its
        requests to the backup meanwhile). One slow answer on a busy host is not a failure; a sick
        app answers 500 at once: three failures in a row are."""
        app, url = self.cfg.slot_app(slot), self.cfg.slot_url(slot)
        first = self.e.pm2_list() or self.e.pm2_list() or self.e.pm2_list()
        if first is None:
            return Verdict("unanswered")
        base = pm2.restarts_of(first, app)[0]
        end = self.e.now() + seconds
        if not self._served_from(first, app, directory):
            return Verdict("stale")
        fails, n = 0, 0
        while self.e.now() < end:
            if n % 4 == 0:
                plist = self.e.pm2_list()
                if plist is not None:
                    restarts, down, count = pm2.restarts_of(plist, app)
                    if count == 0 or down > 0 or restarts > base:
                        return Verdict("restarts", (base, restarts, down, count))
            n += 1
            fails = 0 if self.e.health(url) else fails + 1
            if fails >= 3:
                return Verdict("sick")
            self.e.sleep(HEALTH_EVERY)
        return Verdict("ok")

    def wait_slot_healthy(self, slot: str, rid: str, base: int | None = 0) -> bool:
        app = self.cfg.slot_app(slot)
        directory = self.e.release_dir(rid)
        if directory is None:
            self.e.say(f"release {rid} is not installed")
            return False
        v = self.watch_healthy(slot, directory, self.cfg.health_timeout, base)
        if v.kind == "ok":
            return True
        if v.kind == "crash":
            b, r, d, c = v.numbers
            self.e.say(f"PM2 reports {app} crash-looping (restarts {b} -> {r}, errored/stopped: {d}, processes: {c})")
        else:
            self.e.say(f"{app} did not answer healthy at {self.cfg.slot_url(slot)} within {self.cfg.health_timeout}s")
        return False

    def wait_healthy(self, rid: str) -> bool:
        """The live slot must serve `rid` (what `current` points to) healthy."""
        return self.wait_slot_healthy(self.slots()["live"], rid, None)

    def slot_warm(self, slot: str, rid: str) -> bool:
        """The state says the slot runs `rid` and it answers healthy. No PM2 query here: a warm
        rollback must reach its first request fast; the bake's first check proves that the slot's
        workers run from releases/<rid>."""
        return bool(self.slots()[slot] == rid and self.e.health(self.cfg.slot_url(slot)))

    def served_by(self, slot: str, rid: str) -> bool:
        directory = self.e.release_dir(rid)
        return directory is not None and self._served_from(self.e.pm2_list(), self.cfg.slot_app(slot), directory)

    # ------------------------------------------------------------------ slots
    def slot_stop(self, slot: str) -> None:
        """Stop the slot and empty it in the state. PM2 may have a restart of a crashing app under
        way when delete returns (seen: a worker booting 0.2 s later), so wait for its processes to
        be gone and end any that stay."""
        app = self.cfg.slot_app(slot)
        self._set_slot(slot, None)
        self.e.delete_app(app)
        pids = self.e.app_pids(app)
        for n in range(1, 31):
            if not pids:
                break
            if n == 10:
                self.e.delete_app(app)
            self.e.sleep(0.1)
            pids = self.e.app_pids(app)
        if pids:
            self.e.kill(pids)

    def slot_start(self, slot: str, rid: str) -> bool:
        """A real production start of `rid` in the idle slot: true once it answers healthy there."""
        app = self.cfg.slot_app(slot)
        self.e.delete_app(app)  # normally gone already; a leftover would reload in its old directory
        self._set_slot(slot, rid)
        self.e.say(f"starting {rid} in slot {slot} ({app} on 127.0.0.1:{self.cfg.slot_port(slot)})")
        if not self.e.start_apps(app):
            self.e.say(f"PM2 could not start {app}")
            return False
        return self.wait_slot_healthy(slot, rid, 0)

    # ------------------------------------------------------------------ the switch and back
    def switch_to(self, slot: str, rid: str, from_slot: str | None) -> bool:
        """nginx to `slot` with the one switched away from as backup while it runs; then current
        and the live slot follow, so current = what nginx serves."""
        backup = self.cfg.slot_port(from_slot) if from_slot and self.slots()[from_slot] else None
        if not self.e.upstream(self.cfg.slot_port(slot), backup):
            return False
        self.e.set_current(rid)
        with self._state() as st:
            st["slots"]["live"] = slot
        return True

    def revert(self, slot: str, rid: str, back_slot: str, back_id: str, prev: str | None) -> bool:
        """`rid` failed in `slot`: nginx, current and previous go back to `back_slot` (still warm),
        and the failed slot stops. True when `back_id` answers healthy."""
        self._phase("reverting")
        self.e.say(f"switching back to {back_id} (slot {back_slot}, still warm)")
        if not self.e.upstream(self.cfg.slot_port(back_slot), None):
            self.e.say(f"error: nginx still points at slot {slot} with {back_slot} as backup")
        self.e.set_current(back_id)
        with self._state() as st:
            st["previous"] = prev
            st["slots"]["live"] = back_slot
        self.slot_stop(slot)
        self.e.pm2_save()
        if self.wait_slot_healthy(back_slot, back_id):
            self.e.say(f"rolled back: {back_id} is serving and healthy again")
            return True
        self.e.say(f"error: rolled back to {back_id} but it is NOT healthy either; check: cognivern-release status")
        return False

    def first_deploy_failed(self, slot: str) -> None:
        """Nothing to go back to: stop every app, remove current."""
        self.e.say("this was the first deploy: stopping the app's PM2 processes and removing current")
        self.slot_stop(slot)
        with self._state() as st:
            st["slots"]["agent"] = None
        self.e.delete_all_apps()
        self.e.pm2_save()
        self.e.set_current(None)
        self.e.say("no release is running now; current does not exist")

    def bake(self, slot: str, rid: str) -> str | None:
        """None when `rid` stayed healthy for BAKE_SECONDS in `slot`, else why not."""
        secs = self.cfg.bake_seconds
        self.e.say(f"bake: watching {rid} in slot {slot} for {secs}s (health, PM2 restarts); the previous slot stays warm as nginx backup")
        directory = self.e.release_dir(rid) or ""
        v = self.watch_bake(slot, directory, secs)
        if v.kind == "ok":
            self.e.say(f"bake: {rid} stayed healthy for {secs}s")
            return None
        if v.kind == "stale":
            return f"slot {slot}'s workers do not run from releases/{rid} (PM2 changed behind the state?)"
        if v.kind == "restarts":
            b, r, d, c = v.numbers
            return f"PM2 restarted or lost it (restarts {b} -> {r}, errored/stopped: {d}, processes: {c})"
        if v.kind == "sick":
            return f"{self.cfg.slot_url(slot)} did not answer ok three times in a row"
        return "PM2 gave no readable answer (its daemon busy or hung), so the bake could not watch it"

    def finish(self, slot: str, rid: str, from_slot: str | None) -> None:
        """After the bake: the agent moves to `rid` (deleted, then started there: it never runs
        twice), and the old slot stops unless KEEP_PREVIOUS_WARM. Done again by recovery."""
        self._phase("finishing")
        with self._state() as st:
            st["slots"]["agent"] = rid
        if self.cfg.agent_apps:
            names = ",".join(self.cfg.agent_apps)
            self.e.say(f"agent: moving {names} to {rid} (the bake passed)")
            for agent in self.cfg.agent_apps:
                self.e.delete_app(agent)
            if not self.e.start_apps(names):
                self.e.say(f"warning: the agent did not start on {rid}; check: cognivern-release status")
        old = self.slots()[from_slot] if from_slot else None
        if from_slot and old:
            if self.cfg.keep_previous_warm:
                self.e.say(f"keeping {old} warm in slot {from_slot} (keepPreviousWarm): a rollback to it is a switch")
            else:
                # The upstream keeps the stopped slot's `backup` line: nginx only tries it when the
                # live slot fails, and every nginx reload closes idle client keep-alive connections (a
                # request sent at that instant meets a closed socket), so one reload per switch is all.
                self.e.say(f"stopping slot {from_slot} ({old})")
                self.slot_stop(from_slot)
        self.e.pm2_save()

    # ------------------------------------------------------------------ activate
    def activate(self, rid: str, force: bool, pid: int) -> str:
        """The whole activation (checks done, deploy lock held); the action's result, or ActivationError."""
        cur = self.e.current()
        slots = self.slots()
        live: str | None = slots["live"]
        if cur and live and slots[live] == cur:
            if cur == rid:
                return self.already_current(rid)
        else:
            live = None  # nothing serves: a first deploy (or one after a failed first deploy)
        idle = facts.other_slot(live) if live else facts.SLOTS[0]
        prev = self.store.read()["previous"]
        self.journal = {"id": rid, "from": cur, "prev": prev, "slot": idle, "from_slot": live, "pid": pid, "phase": None}
        started = self.e.now()
        if self.slot_warm(idle, rid):
            # no data backup: nothing new starts against shared/data (the warm slot runs on it already)
            self.e.say(f"release {rid} is warm in slot {idle}: switching without a start")
        else:
            self._start_cold(idle, rid, cur)
        self._phase("switched")
        self._record_previous(cur)
        self.e.say(f"switching current: {cur or 'none'} -> {rid} (slot {live or 'none'} -> {idle})")
        if not self.switch_to(idle, rid, live):
            self.slot_stop(idle)
            self.e.pm2_save()
            self._record_previous(prev)
            self._clear_journal()
            raise ActivationError(
                "nginx-refused",
                f"the switch to {rid} was refused by nginx; {cur or 'no release'} still serves (the release is not marked bad)",
            )
        why = self.bake(idle, rid)
        if why is not None:
            self._bake_failed(idle, rid, live, cur, prev, why)
        self.finish(idle, rid, live)
        with self._state() as st:
            meta = st["releases"].get(rid)
            if force and meta is not None:
                meta.pop("bad", None)
            if meta is not None and meta.get("installed_at"):  # a later rollback to it needs no pre-flight
                meta["served_healthy"] = iso_now()
            st["journal"] = None
        self.journal = None
        self.e.say(f"release {rid} is live and healthy after {int(self.e.now() - started)}s (previous: {cur or 'none'})")
        return "activated"

    def _start_cold(self, idle: str, rid: str, cur: str | None) -> None:
        """Back up shared/data, then start `rid` in the idle slot; stopped here (an error, SIGTERM):
        the slot being started is stopped, nothing else changed."""
        try:
            self._phase("backup")
            if self.cfg.data_backups_keep > 0:
                path = self.e.backup(f"before-{rid}")
                self.e.say(f"backed up shared/data to {path}")
            self._phase("starting")
            ok = self.slot_start(idle, rid)
        except BaseException:
            self._undo_start()
            raise
        if not ok:
            self.journal = None
            self.e.error_log()
            self.mark_bad(rid, f"did not start healthy in slot {idle}")
            self.slot_stop(idle)
            self.e.pm2_save()
            self._clear_journal()
            self.e.say(f"current ({cur or 'none'}) was not switched; nginx still serves it")
            raise ActivationError("start-failed")

    def _undo_start(self) -> None:
        if self.journal is None:
            return
        phase, slot = self.journal["phase"], self.journal["slot"]
        if phase == "starting":
            self.slot_stop(slot)
        if phase in ("backup", "starting"):
            self._clear_journal()

    def _bake_failed(self, slot: str, rid: str, live: str | None, cur: str | None, prev: str | None, why: str) -> None:
        self.e.say(f"release {rid} failed its bake: {why}")
        self.e.error_log()
        if live and cur:
            self.mark_bad(rid, f"failed its bake: {why}")
            result = "rolled-back" if self.revert(slot, rid, live, cur, prev) else "rollback-unhealthy"
        else:
            self.mark_bad(rid, f"failed its bake (first deploy): {why}")
            self.first_deploy_failed(slot)
            result = "first-deploy-failed"
        self._clear_journal()
        raise ActivationError(result)

    def already_current(self, rid: str) -> str:
        """Reloaded only when it does not answer healthy from its release: a PM2 reload of the only
        live slot is seamless only when the new worker is ready within listen_timeout (PM2 kills the
        old one then, ready or not), and a re-run of a deploy (a dropped connection, a killed `pulumi
        up`) must not risk that for nothing."""
        live = self.slots()["live"]
        if self.e.health(self.cfg.slot_url(live)) and self.served_by(live, rid):
            self.e.say(f"release {rid} is already current and healthy; nothing to do")
            return "already-current"
        self.e.say(f"release {rid} is already current but does not answer healthy from its release; reloading it")
        self.e.start_apps("")
        if self.wait_healthy(rid):
            self.e.say(f"release {rid} is current and healthy after the reload")
            return "already-current-reloaded"
        self.e.error_log()
        raise ActivationError("failed", f"release {rid} is current but not healthy at {self.cfg.slot_url(self.slots()['live'])}")

    # ------------------------------------------------------------------ recovery
    def recover(self) -> None:
        """Called with the deploy lock held: a journal means a worker died mid-activation (the lock
        is free only once it is gone). See the module docstring for what each phase gets."""
        j = self.store.read()["journal"]
        if j is None:
            return
        rid, slot, frm, from_slot, prev, phase = j["id"], j["slot"], j["from"], j["from_slot"], j["prev"], j["phase"]
        self.e.say(f"recovering the activation of {rid} that was interrupted ({phase}, pid {j['pid']})")
        self.journal = dict(j)
        slots = self.slots()
        if phase == "starting":
            if slots["live"] != slot or self.e.current() != rid:
                self.slot_stop(slot)
        elif phase in ("switched", "reverting"):
            if from_slot and frm and self.slot_warm(from_slot, frm) and self.served_by(from_slot, frm):
                self.revert(slot, rid, from_slot, frm, prev)
            elif self.wait_slot_healthy(slot, rid):
                # killed between the journal's "switched" and the switch itself: do the switch now
                if self.e.current() != rid and not self.switch_to(slot, rid, from_slot):
                    self.e.say(f"error: nginx refused the switch to {rid}; check: cognivern-release status")
                self.finish(slot, rid, from_slot)
            else:
                self.first_deploy_failed(slot)
        elif phase == "finishing":
            self.finish(slot, rid, from_slot)
        else:
            self.e.say(f"recovered: current ({self.e.current() or ''}) was not switched")
        self._clear_journal()
        self.e.log_recovery(rid, phase)


__all__ = ["ActivationError", "Edges", "Machine", "Verdict", "iso_now"]
