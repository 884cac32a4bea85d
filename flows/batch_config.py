"""The batch file (a contract: scripts depend on it), validated before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.redact import has_credentials
from pruning_core.methods import STRUCTURED_METHODS
from pruning_core.modeling import ModelSource
from pruning_core.recipe import Recipe, read_yaml_file
from tasks.calibrate import CalibrationSpec
from tasks.evaluate import EvaluationSpec
from tasks.selection import SelectionSpec

# The batch's calibration section sets these for every recipe.
CALIBRATION_FIELDS = ("calibration_samples", "seq_len", "seed")


def _not_only_dots(name: str) -> str:
    if set(name) == {"."}:
        raise ValueError(f"name {name!r} is only dots")
    return name


# Names label MLflow runs, deployments and report rows: plain characters, bounded length.
RecipeName = Annotated[
    str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$"), AfterValidator(_not_only_dots)
]
BatchName = Annotated[
    str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$"), AfterValidator(_not_only_dots)
]


class SparsitySearch(BaseModel):
    """Bisection for the highest sparsity within the batch's budget: `steps` probes between low and high."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float = Field(gt=0.0, lt=1.0)
    high: float = Field(gt=0.0, lt=1.0)
    steps: int = Field(default=4, ge=1, le=12, description="probes; the answer is within (high - low) / 2^steps")

    @model_validator(mode="after")
    def _ordered(self) -> SparsitySearch:
        if self.low >= self.high:
            raise ValueError(f"search.low {self.low} must be below search.high {self.high}")
        return self


class BatchRecipe(Recipe):
    """A recipe with the name it has in the batch (the name is not part of its fingerprint); with `search`,
    a sparsity search whose probes are ordinary recipes at each probed sparsity."""

    name: RecipeName
    search: SparsitySearch | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_calibration_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field in CALIBRATION_FIELDS:
                if field in data:
                    raise ValueError(f"{field!r} is set by the batch's calibration section, not per recipe")
            if data.get("search") is not None:
                if any(data.get(field) is not None for field in ("sparsity", "pattern", "ratio")):
                    raise ValueError("a search recipe finds its sparsity: give search, not sparsity/pattern/ratio")
                if data.get("method") in STRUCTURED_METHODS:
                    raise ValueError(f"search finds an unstructured sparsity; {data['method']} is structured")
                search = data["search"]
                if isinstance(search, dict) and {"low", "high"} <= search.keys():
                    # Validated as a recipe at its lowest probe; every probe is validated again when it is made.
                    data = {**data, "sparsity": search["low"]}
        return data

    @model_validator(mode="after")
    def _searchable(self) -> BatchRecipe:
        if self.search is not None:
            # an OWL range that does not fit fails here, not in the middle of a batch
            Recipe.model_validate(self._recipe_fields(self.search.high))
        return self

    def _recipe_fields(self, sparsity: float | None = None) -> dict[str, Any]:
        fields = self.model_dump(exclude={"name", "search", *CALIBRATION_FIELDS})
        return fields if sparsity is None else {**fields, "sparsity": sparsity}

    def recipe(self, calibration: CalibrationSpec, sparsity: float | None = None) -> Recipe:
        """The recipe this entry runs (a search: the one at `sparsity`), with the batch's calibration."""
        fields = self._recipe_fields(sparsity)
        return Recipe(
            **fields, calibration_samples=calibration.samples, seq_len=calibration.seq_len, seed=calibration.seed
        )


def _model_exists(spec: str) -> str:
    if not spec.startswith("s3://"):
        ModelSource.parse(spec)  # a missing folder or file fails here, before any work
    return spec


ModelSpec = Annotated[str, AfterValidator(_model_exists)]


class BatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: BatchName
    models: list[ModelSpec] = Field(min_length=1)
    recipes: list[BatchRecipe] = Field(min_length=1)
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    selection: SelectionSpec | None = None

    @model_validator(mode="after")
    def _selection_measurable(self) -> BatchConfig:
        """The budget names only what the evaluation measures."""
        spec = self.selection
        if spec is None:
            return self
        datasets = list(self.evaluation.datasets())
        if spec.max_ppl_increase is not None and not datasets:
            raise ValueError("selection.max_ppl_increase needs evaluation.perplexity datasets")
        if spec.dataset is not None and spec.dataset not in datasets:
            raise ValueError(f"selection.dataset {spec.dataset!r} is not one of evaluation's: {', '.join(datasets)}")
        if spec.needs_tasks and not self.evaluation.tasks:
            raise ValueError("selection: min_accuracy_retained / max_task_drop need evaluation.tasks")
        if spec.objective == "latency" and (
            self.evaluation.speed is None or 1 not in self.evaluation.speed.batch_sizes
        ):
            raise ValueError("selection.objective latency needs evaluation.speed with batch size 1 (decode ms/token)")
        return self

    @model_validator(mode="after")
    def _search_has_budget(self) -> BatchConfig:
        searches = [r.name for r in self.recipes if r.search is not None]
        if searches and self.selection is None:
            raise ValueError(f"search recipe(s) {', '.join(searches)} need the batch's selection budget")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        """Batch files end up in Prefect parameters, MLflow params and reports: no secret may be in one."""

        def strings(value: Any) -> list[str]:
            if isinstance(value, dict):
                return [s for inner in value.values() for s in strings(inner)]
            if isinstance(value, list):
                return [s for inner in value for s in strings(inner)]
            return [value] if isinstance(value, str) else []

        if any(has_credentials(text) for text in strings(data)):
            raise ValueError(
                "a URL with credentials (user:password@ or a secret parameter) is not accepted in a batch file; "
                "give credentials through the environment (AWS_*, HF_TOKEN, MLFLOW_TRACKING_*)"
            )
        return data

    @field_validator("models")
    @classmethod
    def _models_unique(cls, models: list[str]) -> list[str]:
        if len(set(models)) != len(models):
            raise ValueError("a model is listed twice")
        return models

    @field_validator("recipes")
    @classmethod
    def _unique_names(cls, recipes: list[BatchRecipe]) -> list[BatchRecipe]:
        names = [r.name for r in recipes]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe names must be unique, got {names}")
        return recipes

    def pairs(self) -> list[tuple[str, BatchRecipe]]:
        """Every model x plain recipe (search recipes make their pairs as they go: `searches`)."""
        return [(model, recipe) for model in self.models for recipe in self.recipes if recipe.search is None]

    def searches(self) -> list[tuple[str, BatchRecipe]]:
        return [(model, recipe) for model in self.models for recipe in self.recipes if recipe.search is not None]

    @staticmethod
    def read_mapping(path: str | Path) -> dict[str, Any]:
        """The batch file's mapping as written (what Prefect stores as the flow parameter), not yet validated."""
        path = Path(path)
        data = read_yaml_file(path, "batch file")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a batch file is a mapping with name, models, recipes, calibration, evaluation")
        return data

    @classmethod
    def from_yaml(cls, path: str | Path) -> BatchConfig:
        return cls.model_validate(cls.read_mapping(path))
