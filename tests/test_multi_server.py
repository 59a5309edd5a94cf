"""Several servers, for real: a rolling release across two hosts behind a balancer, with no failed request.

Two NetnsHosts (own network and mount namespaces, own sshd, nginx, ROOT, PM2) form one
existing-hosts stack (`cognivern:hosts`), deployed by the real `pulumi up` of the program. In
front of them a private nginx in the root namespace plays the load balancer the way Hetzner's
does with its /health check: an upstream of both hosts' nginx with passive health (max_fails,
fail_timeout) that retries another server on a connection error, a timeout or a 502/503/504.
Eight clients poll /release through it during every rollout.

A stack's history, in five stages: both hosts go live on v1; v2 rolls out (server 1, then server
2) with zero failed requests; a v3 that dies under PM2 fails server 1's health gate, which reverts
itself, and the rollout stops there (server 2's activate never runs) while the balancer keeps
serving v2 with zero failures; config alone rolls both back to v1, in the same order; a new host
key pin for server 2 alone runs nothing on server 1 (not even a step) and changes nothing on 2. The
`history` fixture runs the stages in that order, once, as far as the test that asks needs, and
records what each stage saw; every test checks one stage's record, so any test runs alone and in
any order (test_05 alone runs all five stages). The rolling release's figures (failed requests,
seconds per server) are printed and written to reports/multi-server.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import http_get
from tests.support.load import Load
from tests.support.netns_host import SITE_PORT, NetnsHosts
from tests.support.nginx import PrivateNginx
from tests.support.program import REPO
from tests.support.real_engine import RunReport, Step
from tests.support.release_host import FIXTURE_APP
from tests.support.stack import DeployStack

V1, V2, V3 = "ms-v1", "ms-v2", "ms-v3"
NODES = ("cognivern-test-1", "cognivern-test-2")
CLIENTS = 8
FIGURES: dict[str, Any] = {}


def balancer_site(addresses: list[str], port: int) -> str:
    servers = "\n".join(f"    server {a}:{SITE_PORT} max_fails=1 fail_timeout=3s;" for a in addresses)
    return f"""upstream cognivern_pool {{
{servers}
    keepalive 16;
}}
server {{
    listen 127.0.0.1:{port};
    location / {{
        proxy_pass http://cognivern_pool;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_connect_timeout 2s;
        proxy_read_timeout 10s;
        proxy_next_upstream error timeout http_502 http_503 http_504;
        proxy_next_upstream_tries {len(addresses)};
    }}
}}
"""


class Stack(DeployStack):
    def __init__(self, pool: NetnsHosts, balancer: PrivateNginx, tmp: Path) -> None:
        super().__init__(pool.config, tmp, secretEnv={"FIXTURE_ECHO": "multi"})
        self.pool = pool
        self.balancer = balancer

    def through_balancer(self) -> str:
        response = http_get(self.balancer.url("/release"), timeout=5)
        assert response.status_code == 200, response.text
        return str(response.json()["release"])

    def currents(self) -> list[str | None]:
        return [h.current() for h in self.pool.hosts]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with NetnsHosts(2) as pool, PrivateNginx(autostart=False) as balancer:
        (balancer.sites_enabled / "balancer.conf").write_text(balancer_site([h.address for h in pool.hosts], balancer.port))
        balancer.start()
        pool.seed_pnpm_store(FIXTURE_APP)  # the hosts have no route off the machine
        yield Stack(pool, balancer, tmp_path_factory.mktemp("multi"))


def step(report: RunReport, name: str) -> Step:
    """The resource's operation in this run (not the deletion of a replaced resource's old copy)."""
    found = [s for s in report.steps if s.name == name and s.op != "delete"]
    assert len(found) == 1, report.summary()
    return found[0]


def index_of(report: RunReport, name: str) -> int:
    return step(report, name).index


def assert_rolled_in_order(report: RunReport) -> None:
    """Every install before the first activation; server 1's activation before server 2's."""
    installs = [index_of(report, f"{n}-release-install") for n in NODES]
    activations = [index_of(report, f"{n}-release-activate") for n in NODES]
    assert max(installs) < activations[0] < activations[1], report.summary()


class History:
    """The stack's stages, run in order on demand (`reach(n)`), each one's observations kept."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.stages: list[dict[str, Any]] = []
        self._runs = [self._v1, self._v2, self._v3_broken, self._back_to_v1, self._repin_server_2]

    def reach(self, n: int) -> dict[str, Any]:
        while len(self.stages) < n:
            self.stages.append(self._runs[len(self.stages)]())
        return self.stages[n - 1]

    def _v1(self) -> dict[str, Any]:
        stack = self.stack
        report = stack.up(release=V1, artifact=stack.artifact(V1))
        health = [http_get(h.url("/health"), timeout=5).json()["status"] for h in stack.pool.hosts]
        pid_files = [(h.home / ".pm2" / "pm2.pid").exists() for h in stack.pool.hosts]
        seen = {"report": report, "currents": stack.currents(), "health": health, "pid_files": pid_files}
        return {**seen, "balancer": stack.through_balancer()}

    def _v2(self) -> dict[str, Any]:
        stack = self.stack
        artifact = stack.artifact(V2)
        with Load([stack.balancer.url("/release")], clients=CLIENTS, retry=False) as load:
            started = time.monotonic()
            report = stack.up(release=V2, artifact=artifact)
            elapsed = time.monotonic() - started
        return {"report": report, "load": load, "elapsed": elapsed, "currents": stack.currents(), "balancer": stack.through_balancer()}

    def _v3_broken(self) -> dict[str, Any]:
        stack = self.stack
        # starts healthy, is switched, then crashes inside the bake (3 s here): server 1 reverts to its warm slot
        artifact = stack.artifact(V3, mode="crash-after", delayMs=1500)
        log_before = stack.balancer.error_log.read_text() if stack.balancer.error_log.exists() else ""
        with Load([stack.balancer.url("/release")], clients=CLIENTS, retry=False) as load:
            report = stack.up(release=V3, artifact=artifact, check=False)
        log = stack.balancer.error_log.read_text()[len(log_before) :]
        state = stack.engine.resources()
        releases = [h.releases() for h in stack.pool.hosts]
        seen = {"report": report, "load": load, "log": log, "state": state, "releases": releases, "currents": stack.currents()}
        return {**seen, "balancer": stack.through_balancer()}

    def _back_to_v1(self) -> dict[str, Any]:
        stack = self.stack
        with Load([stack.balancer.url("/release")], clients=CLIENTS, retry=False) as load:
            report = stack.up(release=V1, artifact=None)
        return {"report": report, "load": load, "currents": stack.currents(), "balancer": stack.through_balancer()}

    def _repin_server_2(self) -> dict[str, Any]:
        """Server 2's host key pinned anew (its comment changed): only server 2's commands are concerned."""
        stack = self.stack
        second = stack.pool.hosts[1]
        assert second.sshd is not None
        pins = {h.address: h.sshd.host_key for h in stack.pool.hosts if h.sshd is not None}
        pins[second.address] = f"{second.sshd.host_key} re-pinned"
        logs = [(h.root / ".deploy" / "releases.log").read_text() for h in stack.pool.hosts]
        with Load([stack.balancer.url("/release")], clients=CLIENTS, retry=False) as load:
            report = stack.up(hostKeys=pins)
        new_logs = [(h.root / ".deploy" / "releases.log").read_text()[len(old) :] for h, old in zip(stack.pool.hosts, logs, strict=True)]
        return {"report": report, "load": load, "logs": new_logs, "currents": stack.currents()}


@pytest.fixture(scope="module")
def history(stack: Stack) -> History:
    return History(stack)


def test_01_both_hosts_go_live_on_v1(history: History) -> None:
    stack, seen = history.stack, history.reach(1)
    report = seen["report"]
    assert set(report.ops().values()) == {"create"}, report.summary()
    assert_rolled_in_order(report)
    assert seen["currents"] == [V1, V1]
    assert [s["activeRelease"] for s in report.outputs["servers"]] == [V1, V1]
    assert [s["address"] for s in report.outputs["servers"]] == [h.address for h in stack.pool.hosts]
    # each host serves on its own (the binds give each its own ROOT and PM2)
    assert seen["health"] == ["ok", "ok"]
    assert seen["pid_files"] == [True, True]
    assert seen["balancer"] == V1


def test_02_a_rolling_release_fails_no_request(history: History) -> None:
    seen = history.reach(2)
    report, load = seen["report"], seen["load"]
    assert_rolled_in_order(report)
    assert seen["currents"] == [V2, V2]
    assert [s["activeRelease"] for s in report.outputs["servers"]] == [V2, V2]
    assert report.outputs["activeRelease"] == V2 and report.outputs["previousRelease"] == V1
    served = load.served()
    figures = {
        "clients": CLIENTS,
        "requests": len(load.results),
        "failed": len(load.failures),
        "served": dict(served),
        "run_seconds": round(seen["elapsed"], 2),
        "per_server": {
            n: {
                "upload_install_seconds": round(
                    step(report, f"{n}-release-upload").seconds + step(report, f"{n}-release-install").seconds, 2
                ),
                "activate_seconds": round(step(report, f"{n}-release-activate").seconds, 2),
            }
            for n in NODES
        },
    }
    FIGURES["rolling_release"] = figures
    print("\nrolling release:", json.dumps(figures))
    write_figures()
    assert load.failures == [], figures
    assert served[V1] > 0 and served[V2] > 0 and set(served) == {V1, V2}, figures
    # once server 2 switched, nothing old is served any more
    assert seen["balancer"] == V2


def test_03_a_broken_release_stops_at_the_first_server(history: History) -> None:
    stack, seen = history.stack, history.reach(3)
    report, load = seen["report"], seen["load"]
    assert not report.ok and [s.name for s in report.failed] == [f"{NODES[0]}-release-activate"], report.summary()
    ops = report.ops()
    assert [ops[f"{n}-release-install"] for n in NODES] == ["replace", "replace"]  # installed everywhere first
    assert ops[f"{NODES[0]}-release-activate"] == "failed"
    assert ops.get(f"{NODES[1]}-release-activate") in (None, "skipped"), report.summary()  # never ran
    assert not [c for c in report.commands if "activate" in c and str(stack.pool.hosts[1].address) in c]
    # server 1 reverted itself; server 2 never switched: both serve v2
    assert seen["currents"] == [V2, V2]
    first, second = seen["releases"]
    assert first[V3] == "bad" and second[V3] == "installed"
    retried = sum(1 for line in seen["log"].splitlines() if stack.pool.hosts[0].address in line)
    FIGURES["broken_release"] = {
        "requests": len(load.results),
        "failed": len(load.failures),
        "served": dict(load.served()),
        "balancer_log_lines_about_server_1": retried,  # 502s from server 1 the balancer retried on server 2
    }
    print("\nbroken release:", json.dumps(FIGURES["broken_release"]))
    write_figures()
    # v3 answered while it baked on server 1 (until it crashed): no request failed, and both serve v2 again
    assert load.failures == [] and set(load.served()) <= {V2, V3}, FIGURES["broken_release"]
    assert seen["balancer"] == V2  # observed at this stage: a later stage may already have run
    # the state keeps server 2's old activation: the next run activates both again, in order
    assert seen["state"][f"{NODES[1]}-release-activate"]["inputs"]["triggers"][0] == V2


def test_04_config_alone_rolls_every_server_back_in_order(history: History) -> None:
    seen = history.reach(4)
    report, load = seen["report"], seen["load"]
    assert_rolled_in_order(report)
    assert seen["currents"] == [V1, V1]
    assert [s["activeRelease"] for s in report.outputs["servers"]] == [V1, V1]
    FIGURES["rollback"] = {
        "requests": len(load.results),
        "failed": len(load.failures),
        "activate_seconds": {n: round(step(report, f"{n}-release-activate").seconds, 2) for n in NODES},
    }
    print("\nrollback:", json.dumps(FIGURES["rollback"]))
    write_figures()
    assert load.failures == [], FIGURES["rollback"]
    assert seen["balancer"] == V1


def test_05_a_pin_of_one_server_runs_nothing_on_the_others(history: History) -> None:
    seen = history.reach(5)
    report, load = seen["report"], seen["load"]
    ran = report.ops(include_same=False)
    assert ran and all(name.startswith(f"{NODES[1]}-") for name in ran), report.summary()
    assert set(ran.values()) == {"update"}
    assert not [s for s in report.steps if s.name.startswith(f"{NODES[0]}-") and s.op != "same"], "server 1 sees no step"
    # on server 2 nothing changes either: provisioning and prune run `true`, the activation lists its state
    assert report.step(f"{NODES[1]}-provision").commands == ["true"]
    assert report.step(f"{NODES[1]}-release-prune").commands == ["true"]
    assert seen["logs"] == ["", ""], "the tool did nothing it logs, on either server"
    assert seen["currents"] == [V1, V1] and load.failures == []


def write_figures() -> None:
    """reports/multi-server.json: the figures of the stages whose tests ran (kept by each test, in any order)."""
    out = REPO / "reports" / "multi-server.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(FIGURES, indent=1) + "\n")
