"""The batch file (a contract: scripts depend on it), validated before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from pruning_core.modeling import ModelSource
from pruning_core.recipe import Recipe
from tasks.calibrate import CalibrationSpec
from tasks.evaluate import EvaluationSpec

# The batch's calibration section sets these for every recipe.
CALIBRATION_FIELDS = ("calibration_samples", "seq_len", "seed")


class BatchRecipe(Recipe):
    """A recipe with the name it has in the batch (the name is not part of its fingerprint)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")

    @model_validator(mode="before")
    @classmethod
    def _no_calibration_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field in CALIBRATION_FIELDS:
                if field in data:
                    raise ValueError(f"{field!r} is set by the batch's calibration section, not per recipe")
        return data

    def recipe(self, calibration: CalibrationSpec) -> Recipe:
        fields = self.model_dump(exclude={"name", *CALIBRATION_FIELDS})
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

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    models: list[ModelSpec] = Field(min_length=1)
    recipes: list[BatchRecipe] = Field(min_length=1)
    calibration: CalibrationSpec
    evaluation: EvaluationSpec

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
        return [(model, recipe) for model in self.models for recipe in self.recipes]

    @classmethod
    def from_yaml(cls, path: str | Path) -> BatchConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"batch file not found: {path}")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a batch file is a mapping with name, models, recipes, calibration, evaluation")
        return cls.model_validate(data)
