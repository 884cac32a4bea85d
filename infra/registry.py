"""MLflow Model Registry: one registered model per source model, a version per shipped artifact, and an
alias (`champion`) that downstream jobs resolve to the current one. Earlier versions stay."""

from __future__ import annotations

import getpass
import os
import socket
from datetime import UTC, datetime

from pydantic import BaseModel

from infra.redact import redact
from infra.tracking import Tracker

CHAMPION = "champion"
FINGERPRINT_TAG = "run_fingerprint"
TAG_LIMIT = 5000  # MLflow's maximum tag value length (model version tags)


class RegisteredVersion(BaseModel):
    name: str
    version: str
    source: str
    run_id: str | None
    created: bool  # False: an existing version of the same artifact was reused


def who_and_when() -> dict[str, str]:
    """Who moved an alias by hand, from the environment, and when (UTC)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in a container
        user = os.environ.get("USER", "unknown")
    return {"by": f"{user}@{socket.gethostname()}", "at": datetime.now(UTC).isoformat(timespec="seconds")}


class Registry:
    def __init__(self, tracker: Tracker) -> None:
        self.client = tracker.client

    def _ensure_model(self, name: str, description: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, description=description)
            except MlflowException:  # another process created it since the lookup
                self.client.get_registered_model(name)

    def versions(self, name: str) -> list:
        from mlflow.exceptions import MlflowException

        quoted = name.replace("'", "")
        try:
            return sorted(
                self.client.search_model_versions(f"name = '{quoted}'", max_results=10000),
                key=lambda v: int(v.version),
            )
        except MlflowException:
            return []

    def register(
        self,
        name: str,
        source: str,
        run_id: str | None,
        run_fingerprint: str,
        tags: dict[str, str],
        description: str = "",
    ) -> RegisteredVersion:
        """The version of this artifact (made once: a rerun reuses it), with `tags` set on it."""
        self._ensure_model(name, description)
        existing = next(
            (
                v
                for v in reversed(self.versions(name))
                if v.source == source and v.tags.get(FINGERPRINT_TAG) == run_fingerprint
            ),
            None,
        )
        clean = {
            key: redact(str(value))[:TAG_LIMIT] for key, value in {**tags, FINGERPRINT_TAG: run_fingerprint}.items()
        }
        if existing is None:
            made = self.client.create_model_version(name, source, run_id=run_id, tags=clean)
            return RegisteredVersion(name=name, version=str(made.version), source=source, run_id=run_id, created=True)
        for key, value in clean.items():
            if existing.tags.get(key) != value:
                self.client.set_model_version_tag(name, existing.version, key, value)
        return RegisteredVersion(name=name, version=str(existing.version), source=source, run_id=run_id, created=False)

    def set_alias(self, name: str, version: str, alias: str = CHAMPION, tags: dict[str, str] | None = None) -> None:
        self.client.set_registered_model_alias(name, alias, version)
        for key, value in (tags or {}).items():
            self.client.set_model_version_tag(name, version, key, redact(str(value))[:TAG_LIMIT])
