"""evaluate: perplexity of a model on the batch's datasets, cached by (model content, evaluation spec)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from infra.hashing import fingerprint
from infra.settings import Settings
from pruning_core.data import read_rows
from pruning_core.job import evaluate_perplexities
from pruning_core.modeling import load_model


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    perplexity: list[str] = Field(min_length=1, description="dataset specs scored for perplexity")
    seq_len: int = Field(default=2048, ge=8, le=131072)
    max_tokens: int | None = Field(default=None, ge=16, description="score only the first N tokens of each")


class Evaluation(BaseModel):
    perplexity: dict[str, float]  # dataset label -> perplexity
    tokens_scored: dict[str, int]
    datasets: dict[str, str]  # dataset label -> spec
    seq_len: int
    seconds: float


def dataset_label(spec: str) -> str:
    """A short name usable as an MLflow metric name: 'wikitext-2-raw-v1-test', 'wiki', 'c4-validation'."""
    if spec.startswith("hf://"):
        name, split = spec.removeprefix("hf://").split(":")[:2]
        label = f"{name.split('/')[-1]}-{split}"
    elif spec.startswith("jsonl:"):
        label = Path(spec.removeprefix("jsonl:").rpartition(":")[0]).name.split(".")[0]
    else:
        label = Path(spec).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "data"


def _cache_key(context, parameters: dict) -> str:
    return "evaluate-" + fingerprint(
        {"model": parameters["model_fingerprint"], "spec": parameters["spec"].model_dump()}
    )


def evaluate_folder(model_path: str, spec: EvaluationSpec, settings: Settings, progress: bool = False) -> Evaluation:
    started = time.perf_counter()
    labels = {dataset_label(s): s for s in spec.perplexity}
    rows = {label: read_rows(s) for label, s in labels.items()}  # a bad spec fails before the model loads
    model, tokenizer = load_model(model_path)
    model.to(settings.device)
    results = evaluate_perplexities(model, tokenizer, rows, spec.seq_len, spec.max_tokens, settings.device, progress)
    return Evaluation(
        perplexity={label: r.perplexity for label, r in results.items()},
        tokens_scored={label: r.tokens_scored for label, r in results.items()},
        datasets=labels,
        seq_len=spec.seq_len,
        seconds=time.perf_counter() - started,
    )


@task(name="evaluate", cache_key_fn=_cache_key, persist_result=True)
def evaluate(model_path: str, model_fingerprint: str, spec: EvaluationSpec) -> Evaluation:
    """Keyed on the model's fingerprint, not its path: the dense baseline is computed once per model."""
    return evaluate_folder(model_path, spec, Settings())
