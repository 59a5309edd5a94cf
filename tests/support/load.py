"""Clients hammering a URL in threads while something changes underneath (bounded: a pause per request).

    with Load([nginx.url("/release"), nginx.url("/health")], clients=8) as load:
        ...activate...
    assert load.failures == []

Each client keeps one HTTP/1.1 connection (httpx.Client) and cycles through the URLs; an answer is
"ok" (200, and for /release the serving release is recorded), "HTTP <code>" or "error <type>".

A kept-alive connection that the server closes before any byte of the answer (nginx closes idle
keep-alive connections when it reloads: a request sent at that moment meets a closed socket) is
retried once on a new connection, as HTTP/1.1 allows for idempotent requests and as browsers, curl
and most HTTP libraries do (RFC 9112 §9.3.1); such retries are counted in `retried`, never hidden.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence

import httpx


class Load:
    def __init__(self, urls: Sequence[str], clients: int = 8, pause: float = 0.02) -> None:
        self.urls = list(urls)
        self.pause = pause
        self.results: list[tuple[float, str]] = []
        self.retried = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def _client(self, n: int) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                url = self.urls[n % len(self.urls)]
                n += 1
                got = self._get(client, url)
                with self._lock:
                    self.results.append((time.monotonic(), got))
                time.sleep(self.pause)

    def _get(self, client: httpx.Client, url: str) -> str:
        for attempt in (1, 2):
            try:
                r = client.get(url)
                return f"HTTP {r.status_code}" if r.status_code != 200 else str(r.json().get("release", "ok"))
            except httpx.RemoteProtocolError as err:  # closed before any answer (a reused connection)
                if attempt == 2:
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
