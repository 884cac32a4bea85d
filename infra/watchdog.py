"""A service the whole process depends on, watched: when it stops answering, the caller hears so in bounded time.

Prefect's client retries a lost API without end in places (state proposals, log shipping), so a batch
whose Prefect server died would hang for good. A daemon thread asks the service's health URL every few
seconds; after `lost_after` seconds without an answer it calls `on_lost` once with one line naming the
service (redacted), and the caller ends the process (what is on disk -- checkpoints, records -- stays).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import httpx

from infra.redact import redact

CHECK_EVERY_SECONDS = 2.0


@contextlib.contextmanager
def watched(
    name: str, health_url: str, timeout_seconds: float, lost_after_seconds: float, on_lost: Callable[[str], None]
) -> Iterator[None]:
    """While the block runs, `on_lost(line)` is called once `health_url` has failed to answer for
    `lost_after_seconds` (each request waits at most `timeout_seconds`)."""
    stop = threading.Event()

    def watch() -> None:
        answered = time.monotonic()
        with httpx.Client(timeout=timeout_seconds) as client:
            while not stop.wait(CHECK_EVERY_SECONDS):
                try:
                    alive = client.get(health_url).status_code < 500
                except httpx.HTTPError:
                    alive = False
                now = time.monotonic()
                if alive:
                    answered = now
                elif now - answered >= lost_after_seconds and not stop.is_set():
                    on_lost(
                        f"{name} at {redact(health_url)} stopped answering for {now - answered:.0f} s; "
                        "the batch stops here (its checkpoints are kept: run it again or `secateur retry` it)"
                    )
                    return

    thread = threading.Thread(target=watch, name=f"watch {name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
