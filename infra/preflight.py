"""Before a batch does any work: the artifact store and MLflow answer, or the batch stops at once.

Each check runs under the configured timeouts and retry budget (`SECATEUR_SERVICE_TIMEOUT_SECONDS`,
`SECATEUR_SERVICE_RETRIES`, `SECATEUR_UPLOAD_ATTEMPTS`), so an unreachable service fails the batch
in seconds with one line naming it by its redacted URL, and nothing already done is touched.
"""

from __future__ import annotations

import time

from infra.artifacts import ArtifactStoreError
from infra.redact import redact
from infra.settings import Settings


class ServiceUnavailable(RuntimeError):
    pass


def check_services(settings: Settings) -> None:
    started = time.monotonic()
    store = settings.artifact_store()
    try:
        store.check()
    except ArtifactStoreError as error:
        raise ServiceUnavailable(
            f"artifact store {redact(store.uri)} unusable after {time.monotonic() - started:.0f} s: {error}"
        ) from None
    started = time.monotonic()
    try:
        from infra.tracking import Tracker

        Tracker(settings).client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure to answer is this one message
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ServiceUnavailable(
            f"MLflow at {redact(settings.tracking_uri)} did not answer after {time.monotonic() - started:.0f} s: "
            f"{redact(reason)}"
        ) from None
