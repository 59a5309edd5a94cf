"""Clients hammering a URL in threads while something changes underneath (bounded: a pause per request).

    with Load([nginx.url("/release"), nginx.url("/health")], clients=8) as load:
        ...activate...
    assert load.failures == []

The pause after each request is 50 ms by default: 8 clients make about 160 requests a second,
enough for every switch and reload to meet requests in flight, at 0.2 of a core (20 ms: 375 a
second at 0.45 of a core, which the suite's 4 workers on 2 cores could not spare; the benches
measure with their own, busier clients).

Each client keeps one HTTP/1.1 connection (httpx.Client) and cycles through the URLs; an answer is
"ok" (200, and for /release the serving release is recorded), "HTTP <code>" or "error <type>".

A kept-alive connection that the server closes before any byte of the answer (nginx closes idle
keep-alive connections when it reloads: a request sent at that moment meets a closed socket, seen
as a close (RemoteProtocolError) or, when the request's bytes arrive after it, a reset (ReadError,
WriteError)) is retried once on a new connection, as HTTP/1.1 allows for idempotent requests and as
browsers, curl and most HTTP libraries do (RFC 9112 §9.3.1; Chromium resends on a reused socket's
reset or close); such retries are counted in `retried`, never hidden. An error answer (a 502 from
nginx) is never retried.
`retry=False` where nothing in front of the clients reloads (test_multi_server's balancer): there a
closed connection is a failure like any other.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence

import httpx

from tests.support.helpers import http_client

# What a request on a kept-alive connection meets when the server closes it first (see above).
CLOSED_BEFORE_ANSWER = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class Load:
    def __init__(self, urls: Sequence[str], clients: int = 8, pause: float = 0.05, retry: bool = True) -> None:
        self.urls = list(urls)
        self.pause = pause
        self.attempts = (1, 2) if retry else (1,)
        self.results: list[tuple[float, str]] = []
        self.retried = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def _client(self, n: int) -> None:
        with http_client(timeout=10) as client:
            while not self._stop.is_set():
                url = self.urls[n % len(self.urls)]
                n += 1
                got = self._get(client, url)
                with self._lock:
                    self.results.append((time.monotonic(), got))
                time.sleep(self.pause)

    def _get(self, client: httpx.Client, url: str) -> str:
        for attempt in self.attempts:
            try:
                r = client.get(url)
                return f"HTTP {r.status_code}" if r.status_code != 200 else str(r.json().get("release", "ok"))
            except CLOSED_BEFORE_ANSWER as err:
                if attempt == self.attempts[-1]:
                    return f"error {type(err).__name__}"
                with self._lock:
                    self.retried += 1
            except (httpx.HTTPError, ValueError) as err:
                return f"error {type(err).__name__}"
        raise AssertionError("unreachable")

    @property
    def failures(self) -> list[str]:
        return [got for _, got in self.results if got.startswith(("HTTP", "error"))]

    def served(self) -> Counter[str]:
        return Counter(got for _, got in self.results)

    def first(self, release: str, since: float) -> float | None:
        """Seconds from `since` (time.monotonic()) to the first answer from `release`."""
        times = [t for t, got in self.results if got == release and t >= since]
        return min(times) - since if times else None

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)
