"""Prefect result storage in the artifact store, so task results and cache records are the pool's, not a disk's.

With `SECATEUR_SHARE_RESULTS` (every pool run), a task's persisted result -- the record Prefect's cache
finds by key -- is an object under `prefect-results/` in the artifact store (S3 or a shared folder):
a worker on another machine sees the cache hit. The block is saved on the Prefect server (records name
it; storage keys stay plain keys, not local file paths), and the results hold state-dir paths as
`$SECATEUR_HOME/...` (`infra.settings.StatePath`), so nothing in a record is one machine's path.
"""

from __future__ import annotations

import asyncio
import functools
from typing import ClassVar

from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import WritableFileSystem
from pydantic import Field

from infra.artifacts import ArtifactStore, open_store
from infra.hashing import fingerprint
from infra.settings import Settings

PREFIX = "prefect-results"


class ArtifactStoreResults(WritableFileSystem):
    """Read and write Prefect result records as objects of the artifact store at `location`."""

    _block_type_name: ClassVar[str] = "secateur artifact store results"
    location: str = Field(description="artifact store URI: s3://bucket/prefix or a shared folder")
    attempts: int = 5
    timeout_seconds: int = 10

    def _store(self) -> ArtifactStore:
        return open_store(self.location, self.attempts, self.timeout_seconds)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        text = self._store().read_text(f"{PREFIX}/{path}")
        if text is None:  # Prefect's cache lookup treats an error as "no record"
            raise FileNotFoundError(f"no result record {path!r} in {self.location}")
        return text.encode()

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        # JSON serializer only (tasks.stage.stage_task): records are text.
        self._store().write_text(f"{PREFIX}/{path}", content.decode())
        return path

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self.write_path, path, content)


def saved_result_storage(settings: Settings) -> ArtifactStoreResults:
    """The block for this store, saved on the Prefect server (tasks take only saved storage; records name it)."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    return _saved(settings.artifact_location, settings.upload_attempts, settings.service_timeout_seconds, api)


@functools.cache
def _saved(location: str, attempts: int, timeout_seconds: int, api: str | None) -> ArtifactStoreResults:
    """Saved once per process and Prefect API (`api` is part of the cache key only)."""
    block = ArtifactStoreResults(location=location, attempts=attempts, timeout_seconds=timeout_seconds)
    # One block document per store; every worker saves the same fields under the same name.
    name = f"secateur-results-{fingerprint({'location': location})}"
    try:
        block.save(name, overwrite=True)
    except ObjectAlreadyExists:  # another worker registered the block type (or saved it) at the same moment
        block.save(name, overwrite=True)
    return block
