"""MLflow tracking: one parent run per batch, one nested run per (model, recipe)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from infra.locks import exclusive, process_alive
from infra.redact import redact
from infra.settings import Settings

log = logging.getLogger(__name__)

PARAM_LIMIT = 6000  # MLflow's maximum param value length
HOST_TAG, PID_TAG = "secateur.host", "secateur.pid"
_OPENED_SQLITE: set[str] = set()  # SQLite tracking stores this process has opened (schema migrated)
FLOW_RUN_TAG = "secateur.flow_run"  # the Prefect flow run that made an MLflow run


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = str(value)[:PARAM_LIMIT]


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    _flatten("", params, out)
    return out


def without_credentials(uri: str) -> str:
    """`uri` as MLflow's client is given it: without `user:password@` (`credentials_environment` carries those).

    MLflow prints and raises with the URI it was given (its "View run ... at: URL" line, request errors that
    end up in Prefect's state messages); given none with credentials, it has none to show.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def credentials_environment(uri: str) -> dict[str, str]:
    """The `user:password@` of a tracking URI as MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD (what its
    client reads; an entry point puts them in the environment), and its MLFLOW_TRACKING_URI without them."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return {}
    values = {
        "MLFLOW_TRACKING_USERNAME": unquote(parts.username or ""),
        "MLFLOW_TRACKING_PASSWORD": unquote(parts.password),
    }
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:  # what mlflow's own helpers read
        values["MLFLOW_TRACKING_URI"] = without_credentials(uri)
    return values


class Tracker:
    def __init__(self, settings: Settings) -> None:
        from mlflow.tracking import MlflowClient

        self.settings = settings
        self.uri = without_credentials(settings.tracking_uri)
        if self.uri.startswith("sqlite:///") and self.uri not in _OPENED_SQLITE:
            # Two processes opening a new SQLite store at once both run its schema migration and one fails;
            # once this process has opened it, later clients find the schema in place.
            with exclusive(settings.path("locks"), "mlflow-store"):
                self.client = MlflowClient(tracking_uri=self.uri)
                self.client.search_experiments(max_results=1)
            _OPENED_SQLITE.add(self.uri)
        else:
            self.client = MlflowClient(tracking_uri=self.uri)

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # MLflow's artifacts go to the artifact store every worker shares; with no store configured, a
        # tracking server decides for itself and the embedded default keeps them under the state dir.
        local = self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri
        location = self.settings.mlflow_artifact_root if local or self.settings.artifacts else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it since the lookup
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def start_run(
        self, experiment: str, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str:
        run_tags = {key: redact(str(value)) for key, value in (tags or {}).items()}
        # Who runs it: a later batch on this host ends the run as KILLED if this process dies first.
        run_tags.update({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=run_tags)
        return run.info.run_id

    def log(
        self,
        run_id: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        series: dict[str, list[float] | dict[int, float]] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Params (nested dicts flattened with dots), metrics, and series logged with step = index (a list)
        or step = key (a dict, e.g. training step -> held-out perplexity)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        metric_list = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        for key, values in (series or {}).items():
            steps = values.items() if isinstance(values, dict) else enumerate(values)
            metric_list.extend(Metric(key, float(v), now, int(step)) for step, v in steps)
        param_list = [Param(k, redact(v)) for k, v in flatten_params(params or {}).items()]
        tag_list = [RunTag(k, redact(str(v))) for k, v in (tags or {}).items()]
        # MLflow's per-request limits: 1000 metrics, 100 params, 100 tags.
        for start in range(0, len(metric_list), 900):
            self.client.log_batch(run_id, metrics=metric_list[start : start + 900])
        for start in range(0, len(param_list), 90):
            self.client.log_batch(run_id, params=param_list[start : start + 90])
        for start in range(0, len(tag_list), 90):
            self.client.log_batch(run_id, tags=tag_list[start : start + 90])

    def log_artifacts(self, run_id: str, folder: str | Path, path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), path)

    def find_batch_run(self, ref: str):
        """The parent run of a batch: by MLflow run id, Prefect flow run id or name, or batch name (latest)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(ref)
        except MlflowException:
            pass
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        quoted = ref.replace("'", "")
        for condition in (
            f"tags.prefect_flow_run_id = '{quoted}'",
            f"tags.prefect_flow_run_name = '{quoted}'",
            f"tags.batch = '{quoted}'",
        ):
            runs = self.client.search_runs(
                experiments, condition, order_by=["attributes.start_time DESC"], max_results=1
            )
            if runs:
                return runs[0]
        raise LookupError(
            f"no batch run {ref!r} in {self.uri} (give an MLflow run id, a flow run id or name, or a batch name)"
        )

    def child_runs(self, run) -> list:
        runs = self.client.search_runs(
            [run.info.experiment_id],
            f"tags.mlflow.parentRunId = '{run.info.run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=5000,
        )
        return list(runs)

    def series(self, run_id: str, key: str) -> list[float]:
        """A metric logged with steps, ordered by step."""
        return [m.value for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)]

    def end_abandoned_runs(self, experiment: str) -> list[str]:
        """RUNNING runs started on this host by a process that is gone (killed, crashed) end as KILLED."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        host = socket.gethostname().replace("'", "")
        runs = self.client.search_runs(
            [found.experiment_id],
            f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=1000,
        )
        ended = []
        for run in runs:
            pid = run.data.tags.get(PID_TAG, "")
            if pid.isdigit() and not process_alive(int(pid)):
                self.client.set_terminated(run.info.run_id, "KILLED")
                ended.append(run.info.run_id)
        if ended:
            log.warning("ended %d MLflow runs of processes that died as KILLED", len(ended))
        return ended

    def fail_runs_tagged(self, experiment: str, tag: str, value: str) -> list[str]:
        """RUNNING runs with `tag` = `value` (a lost flow run's) end as FAILED."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        quoted = value.replace("'", "")
        runs = self.client.search_runs(
            [found.experiment_id], f"attributes.status = 'RUNNING' and tags.`{tag}` = '{quoted}'", max_results=100
        )
        for run in runs:
            self.client.set_terminated(run.info.run_id, "FAILED")
        return [run.info.run_id for run in runs]

    def finish(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
