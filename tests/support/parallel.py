"""How `make test` spreads the suite over pytest-xdist workers (`-n 4 --dist loadfile`).

A test module is one unit of work: its tests run on one worker, in the seeded (pytest-randomly)
order, sharing the module's hosts, like a serial run of that module alone. Two exceptions, both
here so that the schedule is reproducible from the seed:

- SPLIT modules are divided into N units (the k-th test of the module in the seeded order goes
  to unit k mod N). Each unit builds the module's fixtures again on its worker; that is only
  correct for modules whose hosts take a unique app user, ROOT, ports and temp dirs (checked
  for every module listed), so two units can run at the same time.
- Units are queued slowest first (SECONDS: a module's worker seconds in a measured `make test`), so a long module
  never starts last while the other workers sit idle. Modules not listed keep the seeded order.

Which modules run at the same time on which worker depends on timing, not on the seed: the
modules share nothing (unique users, loopback ports from free_port, private temp dirs and
PM2 homes), so that order does not matter. A serial run (`-n 0` or `-p no:xdist`) keeps
pytest-randomly's full order and ignores all of this.
"""

from __future__ import annotations

from typing import Any

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadFileScheduling

SPLIT = {"test_release_tool": 2, "test_blue_green": 2}
SECONDS = {  # worker seconds per module in a `make test` run (junit sums, 2026-11-30), rounded
    # (the modules issue 21 moved onto the real engine: estimated from their alone times, 2026-12-04, until a measured run)
    "test_release_tool": 285,
    "test_blue_green": 200,
    "test_pristine_scenarios": 220,  # alone (2026-12): the real pulumi up on a pristine host, 3 reboots
    "test_pristine_provision": 150,  # alone, not yet from a `make test` run (2026-12): provisioning from nothing
    "test_newcomer": 130,
    "test_scenarios": 105,
    "test_boundaries": 150,  # not yet from a `make test` run: 2:01 alone at load average ~3
    "test_upgrade": 60,  # the same: 0:54 alone
    "test_hardening": 85,
    "test_backup_live": 85,
    "test_multi_server": 80,
    "test_engine": 70,
    "test_activation_kill": 65,
    "test_masking": 65,
    "test_host_scripts": 60,
    "test_preflight_contract": 50,
    "test_tls": 45,
    "test_tls_engine": 45,
    "test_host_keys": 35,
    "test_release_upgrade": 45,  # alone (2026-12): a host prepared by the old program, taken over
    "test_release_safety": 30,  # alone (2026-12)
    "test_pm2_rpc": 25,  # alone (2026-12)
    "test_project_defaults": 30,
    "test_real_cli": 20,
    "test_env_example": 15,
    "test_pristine_host": 30,  # alone (2026-12)
    "test_build_artifact": 12,
}


def _module(nodeid: str) -> str:
    """tests/test_x.py::test_y[z] -> test_x"""
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def weight(nodeid: str) -> float:
    """A unit's rough serial time: its module's, divided among the module's units."""
    name = _module(nodeid)
    return SECONDS.get(name, 0) / SPLIT.get(name, 1)


class SlowestFirst:
    """Plugin for xdist workers: queue the slowest modules first (a stable sort: the seeded order
    of tests within a module, and of modules of equal weight, is kept)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        items.sort(key=lambda item: -weight(item.nodeid))


class ModuleScheduling(LoadFileScheduling):  # type: ignore[misc]  # (untyped)
    """`--dist loadfile`, with the SPLIT modules divided into units (see the module docstring)."""

    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        # the queue keeps the workers' collection order (slowest first), not "most tests first"
        config.option.loadscopereorder = False
        self._units: dict[str, str] = {}

    def _split_scope(self, nodeid: str) -> str:
        scope = str(super()._split_scope(nodeid))
        parts = SPLIT.get(_module(nodeid), 1)
        if parts == 1:
            return scope
        if not self._units:
            seen: dict[str, int] = {}
            for other in self.collection or []:
                if SPLIT.get(_module(other), 1) > 1:
                    index = seen[_module(other)] = seen.get(_module(other), -1) + 1
                    self._units[other] = f"{super()._split_scope(other)}#{index % SPLIT[_module(other)] + 1}"
        return self._units[nodeid]


def register(config: pytest.Config) -> None:
    """From tests/conftest.py's pytest_configure: only when pytest-xdist is loaded (its hooks are xdist's)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    config.pluginmanager.register(Parallel(), "cognivern-parallel")
    if getattr(config, "workerinput", {}).get("cognivern_slowest_first"):  # (a worker's own "dist" is "no")
        config.pluginmanager.register(SlowestFirst(), "cognivern-slowest-first")


class Parallel:
    """The controller's side: ModuleScheduling for `--dist loadfile`."""

    @pytest.hookimpl
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Producer) -> ModuleScheduling | None:
        return ModuleScheduling(config, log) if config.getvalue("dist") == "loadfile" else None

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        """Tell each worker to queue its collection slowest first (loadfile only)."""
        node.workerinput["cognivern_slowest_first"] = node.config.getvalue("dist") == "loadfile"
