"""fetch_model: a local snapshot of a model, identified by the sha256 of its files."""

from __future__ import annotations

import json
import posixpath
import re
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from infra.durable import read_json, write_atomic
from infra.hashing import fingerprint, sha256_file
from infra.settings import Settings, StatePath
from pruning_core.modeling import ModelSource, ModelSpecError
from tasks.common import retry_if_transient

# Files that decide what a model computes (weights, config, tokenizer); docs and licences do not.
MODEL_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.json", "*.model", "*.txt", "*.tiktoken")


class ModelSnapshot(BaseModel):
    spec: str
    path: StatePath  # what load_model takes: a folder or a .gguf file
    revision: str | None = None  # resolved commit of a hub model
    files: dict[str, str]  # file name -> sha256
    fingerprint: str
    slug: str
    seconds: float = 0.0


SLUG_LENGTH = 80


def slug_of(spec: str) -> str:
    """A readable folder name for the model: [a-z0-9._-], never '.' or '..', at most SLUG_LENGTH characters
    (a longer name keeps its start and gains a hash of the whole spec). It only labels paths; identity is
    the content fingerprint after it."""
    name = posixpath.normpath(spec.removeprefix("hf://").removeprefix("s3://").split("@")[0].replace("\\", "/"))
    name = name.replace("/", "--") if spec.startswith("hf://") else posixpath.basename(name).removesuffix(".gguf")
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"
    if len(slug) > SLUG_LENGTH:
        slug = f"{slug[: SLUG_LENGTH - 17].rstrip('-.')}-{fingerprint(spec)}"
    return slug


class _HashCache:
    """sha256 per (path, size, mtime): a large unchanged file is hashed once per state dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        entries = read_json(path)  # a torn or foreign file is rebuilt, never a permanent failure
        self.entries: dict[str, str] = entries if isinstance(entries, dict) else {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.entries:
            self.entries[key] = sha256_file(file)
            write_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True))
        return self.entries[key]


def _model_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file()})


def _from_hub(spec: str, settings: Settings) -> tuple[Path, str]:
    from huggingface_hub import HfApi, snapshot_download

    source = ModelSource.parse(spec)
    revision = HfApi().model_info(source.location, revision=source.revision or "main").sha
    folder = snapshot_download(source.location, revision=revision, allow_patterns=list(MODEL_FILES))
    return Path(folder), revision


def _from_s3(spec: str, settings: Settings) -> Path:
    from infra.s3 import S3Store, split_s3_uri

    bucket, prefix = split_s3_uri(spec)
    dest = settings.path("downloads", fingerprint(spec))
    S3Store(f"s3://{bucket}", settings.upload_attempts, settings.service_timeout_seconds).download_prefix(prefix, dest)
    return dest


def snapshot_model(spec: str, settings: Settings) -> ModelSnapshot:
    """Resolve a model spec to local files and hash them."""
    started = time.perf_counter()
    revision = None
    if spec.startswith("hf://"):
        folder, revision = _from_hub(spec, settings)
        path = folder
    elif spec.startswith("s3://"):
        path = folder = _from_s3(spec, settings)
    else:
        ModelSource.parse(spec)  # raises a clear error for a missing file or folder
        path = Path(spec).expanduser().resolve()
        folder = path.parent if path.suffix == ".gguf" else path
    files = [path] if path.suffix == ".gguf" else _model_files(folder)
    if not files:
        raise ModelSpecError(f"{spec}: no model files found")
    cache = _HashCache(settings.path("cache") / "file-sha256.json")
    hashes = {file.name: cache.sha256(file) for file in files}
    return ModelSnapshot(
        spec=spec,
        path=str(path),
        revision=revision,
        files=hashes,
        fingerprint=fingerprint({"files": hashes}),
        slug=slug_of(spec),
        seconds=time.perf_counter() - started,
    )


@task(name="fetch_model", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def fetch_model(spec: str, settings: Settings) -> ModelSnapshot:
    """Not cached by Prefect: the content hash is the identity, and it is cheap to recheck (hash cache).
    Retried as the settings say (`tasks.common.retried`)."""
    return snapshot_model(spec, settings)
