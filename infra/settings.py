"""One settings object for the whole pipeline (environment variables, optional `.env` file)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, BeforeValidator, Field, PlainSerializer
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """`SECATEUR_*` variables, plus MLflow's own `MLFLOW_TRACKING_URI`.

    S3 credentials and endpoint are not fields: boto3 reads them from the standard AWS chain
    (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, ...), so they never pass through here.
    """

    # Built once per process at its entry point (the CLI, a flow run) and passed down; never changed after.
    model_config = SettingsConfigDict(env_prefix="SECATEUR_", env_file=".env", extra="ignore", frozen=True)

    home: Path = Field(default=Path(".secateur"), description="state dir: work, checkpoints, caches, databases")
    artifacts: str | None = Field(default=None, description="artifact store: a folder or s3://bucket/prefix")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "SECATEUR_MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI (default: SQLite under the state dir)",
    )
    device: str = Field(default="cpu", description="where blocks are pruned and models evaluated: cpu or cuda")
    forward_budget_mib: int | None = Field(
        default=None,
        ge=16,
        description="activation memory of one batched block forward while pruning, MiB (default: 128 on CPU, "
        "4096 on CUDA)",
    )
    memory_limit_gib: float | None = Field(
        default=None,
        gt=0,
        description="RAM a run may use, GiB: its estimate (weights from config and weight headers, calibration "
        "windows, block activations, statistics, evaluation windows) is checked against it before any work "
        "(default: the RAM available when it starts; on cuda the device's free memory is checked too)",
    )
    trust_remote_code: bool = Field(
        default=False, description="let transformers run a model's own code (off unless turned on)"
    )
    mirror_checkpoints: bool = Field(default=False, description="copy block checkpoints to the artifact store")
    share_results: bool = Field(
        default=False,
        description="keep calibration sets, evaluations and pruned models in the artifact store for other machines",
    )
    prefect_port: int = Field(default=4200, ge=1, le=65535, description="port of `secateur stack up`'s Prefect server")
    mlflow_port: int = Field(default=5000, ge=1, le=65535, description="port of `secateur stack up`'s MLflow UI")
    postgres_port: int = Field(
        default=5433, ge=1, le=65535, description="port of `secateur stack up --postgres`'s PostgreSQL (loopback)"
    )
    task_retries: int = Field(default=2, ge=0, le=10, description="Prefect retries of fetch and publish")
    retry_delay_seconds: float = Field(default=10.0, ge=0, description="first retry delay; later ones grow x3")
    upload_attempts: int = Field(default=5, ge=1, le=20, description="S3 attempts per request (standard retry mode)")
    service_timeout_seconds: int = Field(
        default=10,
        ge=1,
        le=600,
        description="longest wait on S3, MLflow and the Prefect API: to connect, and for any answer (a silent "
        "endpoint fails after this x its attempts)",
    )
    service_retries: int = Field(default=2, ge=0, le=10, description="MLflow HTTP retries per request")
    heartbeat_seconds: float = Field(
        default=10.0, gt=0, description="on a pool: how often a running pair writes its heartbeat to the store"
    )
    stale_after_seconds: float = Field(
        default=90.0, gt=0, description="on a pool: a running pair silent this long is crashed and run again"
    )
    pair_attempts: int = Field(default=3, ge=1, le=10, description="on a pool: runs of a pair whose worker was lost")
    poll_seconds: float = Field(default=2.0, gt=0, description="on a pool: how often the batch looks at its pairs")

    @cached_property
    def root(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def artifact_location(self) -> str:
        return self.artifacts or str(self.root / "artifacts")

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> str:
        """MLflow's artifacts in the artifact store (`mlflow/` under it), never on one worker's disk."""
        location = self.artifact_location
        if location.startswith("s3://"):
            return location.rstrip("/") + "/mlflow"
        return (Path(location).expanduser().resolve() / "mlflow").as_uri()

    def on_pool(self) -> Settings:
        """These settings inside a pair run on a work pool: results shared and block checkpoints mirrored through
        the artifact store, the pool's one shared service, unless the worker's environment says otherwise."""
        pool = {"share_results": True, "mirror_checkpoints": True}
        return self.model_copy(update={k: v for k, v in pool.items() if k not in self.model_fields_set})

    def artifact_store(self):
        """The artifact store these settings name (with their attempts and timeout)."""
        from infra.artifacts import open_store

        return open_store(self.artifact_location, self.upload_attempts, self.service_timeout_seconds)

    def path(self, *parts: str) -> Path:
        """A folder under the state dir, created on first use."""
        folder = self.root.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


HOME_MARK = "$SECATEUR_HOME"
# The state dir that state paths are written relative to and read back under, while a stage runs.
_STATE_ROOT: ContextVar[Path | None] = ContextVar("secateur_state_root", default=None)


@contextlib.contextmanager
def state_paths_under(settings: Settings) -> Iterator[None]:
    """Within the block, `StatePath` values are written as `$SECATEUR_HOME/...` and read back under this
    process's state dir (Prefect serialises a task's result after the task returns, so a binding inside the
    task would be gone by then)."""
    token = _STATE_ROOT.set(settings.root)
    try:
        yield
    finally:
        _STATE_ROOT.reset(token)


def _portable(path: str) -> str:
    """A path under the bound state dir as `$SECATEUR_HOME/...`; any other path (or none bound) as it is."""
    root, local = _STATE_ROOT.get(), Path(path)
    if root is not None and local.is_absolute() and local.is_relative_to(root):
        return f"{HOME_MARK}/{local.relative_to(root).as_posix()}".rstrip("/")
    return path


def _local(value: object) -> object:
    """`$SECATEUR_HOME/...` under the bound state dir."""
    if isinstance(value, str) and (value == HOME_MARK or value.startswith(HOME_MARK + "/")):
        root = _STATE_ROOT.get()
        if root is None:
            raise ValueError(f"{value} is a state dir path, read outside `state_paths_under` (a bug)")
        return str(root / value[len(HOME_MARK) + 1 :])
    return value


# A path into the state dir that travels: in JSON (Prefect results, reports) it is relative to whichever
# machine's `$SECATEUR_HOME` reads it, so a record written by one worker is valid on another.
StatePath = Annotated[str, BeforeValidator(_local), PlainSerializer(_portable, when_used="json")]


def prepare_environment(settings: Settings) -> None:
    """At an entry point (the CLI, a flow run): defaults for Prefect's and MLflow's own variables, before they
    are imported (values the user set win), and the tracking URI's credentials where MLflow's client reads them."""
    from infra.tracking import credentials_environment

    os.environ.update(credentials_environment(settings.tracking_uri))
    os.environ.setdefault("PREFECT_HOME", str(settings.root / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # SQLite needs the folder
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # MLflow's client would retry an unreachable server for minutes by default; the batch fails in seconds.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.service_timeout_seconds))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.service_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
