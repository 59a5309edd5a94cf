"""The tool's state: one JSON document (facts.STATE_FILE, schema facts.STATE_SCHEMA).

Slots, the activation journal and the release metadata live in ROOT/config/state.json (root's,
world-readable: the ecosystem file reads the slots from it as the app user). Only this tool writes
it, whole, through a rename, under .deploy/state.lock, so an install (its own lock) and an
activation (the deploy lock) never lose each other's change.

A host from before the JSON state keeps it as text: config/slots, .deploy/previous, .deploy/journal,
.deploy/meta/<id>, .deploy/bad/<id>. `read` takes that in when state.json does not exist yet; the
first `update` writes the JSON and removes the text files.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

from . import facts, safefs

State = dict[str, Any]


def empty() -> State:
    return {
        "schema": facts.STATE_SCHEMA,
        "slots": {"live": facts.SLOTS[0], "blue": None, "green": None, "agent": None},
        "previous": None,
        "journal": None,
        "releases": {},
        # the last `prune --keep N` (None: none yet, KEEP_RELEASES applies): a prune without --keep
        # (deploy's) keeps what the stack asked for last, so keepReleases is one prune command of its own
        "keep_releases": None,
    }


def _id(value: Any) -> str | None:
    return value if isinstance(value, str) and facts.RELEASE_ID_RE.match(value) else None


def _slot(value: Any) -> str | None:
    return value if value in facts.SLOTS else None


def normalise(raw: Any) -> State:
    """Whatever the file holds, as a valid state: unknown or malformed parts are left out."""
    st = empty()
    if not isinstance(raw, dict):
        return st
    slots: dict[str, Any] = raw["slots"] if isinstance(raw.get("slots"), dict) else {}
    st["slots"] = {
        "live": _slot(slots.get("live")) or facts.SLOTS[0],
        **{key: _id(slots.get(key)) for key in (*facts.SLOTS, "agent")},
    }
    st["previous"] = _id(raw.get("previous"))
    keep = raw.get("keep_releases")
    st["keep_releases"] = keep if isinstance(keep, int) and not isinstance(keep, bool) and keep >= facts.MIN_KEEP_RELEASES else None
    j = raw.get("journal")
    if isinstance(j, dict) and _id(j.get("id")) and _slot(j.get("slot")) and j.get("phase") in facts.JOURNAL_PHASES:
        st["journal"] = {
            "id": j["id"],
            "from": _id(j.get("from")),
            "prev": _id(j.get("prev")),
            "slot": j["slot"],
            "from_slot": _slot(j.get("from_slot")),
            "pid": j.get("pid") if isinstance(j.get("pid"), int) else None,
            "phase": j["phase"],
        }
    releases: dict[str, Any] = raw["releases"] if isinstance(raw.get("releases"), dict) else {}
    for rid, meta in releases.items():
        if _id(rid) and isinstance(meta, dict):
            st["releases"][rid] = _meta(meta)
    return st


def _meta(meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("installed_at", "sha256", "source", "served_healthy"):
        if isinstance(meta.get(key), str):
            out[key] = meta[key]
    if isinstance(meta.get("installed_epoch"), int):
        out["installed_epoch"] = meta["installed_epoch"]
    bad = meta.get("bad")
    if isinstance(bad, dict) and isinstance(bad.get("reason"), str):
        out["bad"] = {"marked_at": str(bad.get("marked_at", "")), "reason": bad["reason"]}
    return out


# ---------------------------------------------------------------------------- the text state of older versions
def _text(dir_fd: int, name: str) -> str | None:
    try:
        data, _ = safefs.read_file(dir_fd, name, 1 << 16)
    except (OSError, safefs.RefusedError):
        return None
    return data.decode("utf-8", "replace")


def _kv(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep and key not in out:
            out[key] = value
    return out


def from_text(root_fd: int) -> State:
    """The state an older version left as text (none at all on a fresh host: the empty state)."""
    raw: dict[str, Any] = {"slots": {}, "releases": {}}
    with contextlib.ExitStack() as stack:
        config = _subdir(stack, root_fd, "config")
        deploy = _subdir(stack, root_fd, ".deploy")
        slots_text = _text(config, "slots") if config is not None else None
        if slots_text is not None:
            raw["slots"] = {k: (v or None) for k, v in _kv(slots_text).items()}
        previous = _text(deploy, "previous") if deploy is not None else None
        if previous is not None:
            raw["previous"] = previous.splitlines()[0] if previous.strip() else None
        journal = _kv(_text(deploy, "journal")) if deploy is not None else {}
        if journal:
            pid = journal.get("pid", "")
            raw["journal"] = {**{k: (v or None) for k, v in journal.items()}, "pid": int(pid) if pid.isdigit() else None}
        for sub, parse in (("meta", _meta_text), ("bad", _bad_text)):
            d = _subdir(stack, deploy, sub) if deploy is not None else None
            if d is None:
                continue
            for name, st in safefs.entries(d):
                if stat.S_ISREG(st.st_mode) and facts.RELEASE_ID_RE.match(name):
                    parse(raw["releases"].setdefault(name, {}), _kv(_text(d, name)))
    state = normalise(raw)
    if slots_text is None:
        # no slots file (a host prepared before the slots): blue runs current, and so does the agent
        current = current_id(root_fd)
        state["slots"].update(blue=current, agent=current)
    return state


def _meta_text(meta: dict[str, Any], kv: dict[str, str]) -> None:
    for key in ("installed_at", "sha256", "source", "served_healthy"):
        if kv.get(key):
            meta[key] = kv[key]
    if kv.get("installed_epoch", "").isdigit():
        meta["installed_epoch"] = int(kv["installed_epoch"])


def _bad_text(meta: dict[str, Any], kv: dict[str, str]) -> None:
    meta["bad"] = {"marked_at": kv.get("marked_at", ""), "reason": kv.get("reason", "")}


def _subdir(stack: contextlib.ExitStack, parent: int, name: str) -> int | None:
    try:
        return stack.enter_context(safefs.opened_dir(name, parent))
    except (OSError, safefs.RefusedError):
        return None


def _remove_text(root_fd: int) -> None:
    with contextlib.ExitStack() as stack:
        config = _subdir(stack, root_fd, "config")
        if config is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink("slots", dir_fd=config)
        deploy = _subdir(stack, root_fd, ".deploy")
        if deploy is None:
            return
        for name in ("previous", "journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=deploy)
        for sub in ("meta", "bad"):
            safefs.remove_tree(deploy, sub)


def current_id(root_fd: int) -> str | None:
    """The release `current` points at (releases/<id>), or None."""
    try:
        target = os.readlink("current", dir_fd=root_fd)
    except OSError:
        return None
    return _id(target.rsplit("/", 1)[-1])


# ---------------------------------------------------------------------------- reading and writing
class Store:
    """state.json under ROOT (`root_fd`); `update()` is the only way to change it."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd

    def read(self) -> State:
        with contextlib.ExitStack() as stack:
            config = _subdir(stack, self.root_fd, "config")
            text = _text(config, "state.json") if config is not None else None
        if text is not None:
            try:
                return normalise(json.loads(text))
            except ValueError:
                pass  # unreadable (never written half: it is renamed into place): start from what else there is
        return from_text(self.root_fd)

    @contextlib.contextmanager
    def update(self) -> Iterator[State]:
        """Read, let the caller change the state, write it back (only when changed), under the state lock."""
        with safefs.opened_dir(".deploy", self.root_fd) as deploy:
            lock = os.open("state.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=deploy)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                with safefs.opened_dir("config", self.root_fd) as config:
                    migrating = _text(config, "state.json") is None
                    state = self.read()
                    before = copy.deepcopy(state)
                    yield state
                    if state != before or migrating:
                        data = json.dumps(normalise(state), indent=1, sort_keys=True) + "\n"
                        safefs.write_atomic(config, "state.json", data.encode(), 0o644)
                        if migrating:
                            _remove_text(self.root_fd)
            finally:
                os.close(lock)
