"""Pruning recipe: what to prune, how much, and with which method's settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from pruning_core.distill import DistillSpec
from pruning_core.masks import SparsityTarget
from pruning_core.method_settings import MethodSettings, NoSettings
from pruning_core.methods import method_settings
from pruning_core.reconstruct import BlockReconstruction
from pruning_core.recovery import RecoverySpec
from pruning_core.structured.depth import DepthSettings
from pruning_core.structured.llm_pruner import RatioOf, StructuredSettings

# The fields of the first fingerprinted recipes: always in the canonical JSON. Every field added since (a
# method's own, the target's later ones) is left out while it holds its default, so that existing recipes keep
# their fingerprints (and their cached results).
_FIRST_FIELDS = (
    "method",
    "sparsity",
    "pattern",
    "block_size",
    "damping",
    "calibration_samples",
    "seq_len",
    "seed",
    "layer_sparsity",
    "skip",
    "true_sequential",
)
# What a structured ratio means changed with them (uniform widths, ratios of the decoder): structured
# recipes always carry them, so none keeps the fingerprint of a result made under the old meaning.
_STRUCTURED_MEANING = ("widths", "ratio_of")
_OWL_FIELDS = ("owl_m", "owl_lambda")


def _recovery_kind(value: Any) -> str:
    return value.get("kind", "lora") if isinstance(value, dict) else getattr(value, "kind", "lora")


# `kind: distill` (from the dense model) or LoRA on next-token loss (`kind: lora`, the default: recipes before
# distillation had no kind).
Recovery = Annotated[
    Annotated[RecoverySpec, Tag("lora")] | Annotated[DistillSpec, Tag("distill")], Discriminator(_recovery_kind)
]


# Each registered method's own fields (declared next to the method), flat in a recipe as users write them.
_METHOD_SETTINGS = tuple(dict.fromkeys(s for s in method_settings().values() if s is not NoSettings))


class Recipe(*_METHOD_SETTINGS, BaseModel):
    """A validated pruning recipe; `fingerprint()` identifies it for caching and resume.

    Its fields: the method, the calibration, the target (an unstructured sparsity or N:M pattern with its
    allocation, or a structured ratio with its recovery), and each method's own settings (`MethodSettings`
    next to the method: a method refuses another's fields unless they keep their defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(description="pruning method: one of the registered methods")
    sparsity: float | None = Field(default=None, gt=0.0, lt=1.0, description="unstructured ratio in (0, 1)")
    pattern: str | None = Field(default=None, description="N:M semi-structured pattern, e.g. '2:4'")
    block_size: int = Field(default=128, ge=1, le=65536, description="columns per lazy update block")
    damping: float = Field(default=0.01, gt=0.0, le=10.0, description="Hessian damping λ (fraction of mean diag)")
    calibration_samples: int = Field(default=128, ge=1, le=100000)
    seq_len: int = Field(default=2048, ge=8, le=131072)
    seed: int = Field(default=0, ge=0)
    layer_sparsity: dict[str, float] = Field(
        default_factory=dict, description="per-layer ratio overrides: name or glob -> ratio in (0, 1)"
    )
    skip: list[str] = Field(default_factory=list, description="layer names or globs left dense")
    true_sequential: bool = Field(
        default=False, description="prune attn q/k/v -> o -> mlp in order, re-running the block"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="dtype the variant is saved in; auto: the source's (bfloat16 for a GGUF)"
    )
    # Structured pruning (llm_pruner: width, depth: whole blocks)
    ratio: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="llm_pruner, depth: fraction of the parameters removed"
    )
    ratio_of: RatioOf = Field(
        default="decoder",
        description="llm_pruner, depth: what `ratio` counts: decoder (the blocks, the default: the same meaning "
        "whatever the vocabulary) | all (embeddings included, as LLM-Pruner's paper counts)",
    )
    recovery: Recovery | None = Field(
        default=None, description="llm_pruner, depth: recovery after pruning (distill, or LoRA on next tokens)"
    )
    # Layer-wise allocation of an unstructured sparsity
    allocation: Literal["uniform", "owl"] = Field(default="uniform", description="uniform | owl")
    owl_m: float = Field(default=5.0, gt=0.0, description="OWL: outlier threshold, times the block's mean score")
    owl_lambda: float = Field(default=0.08, gt=0.0, lt=0.25, description="OWL: block sparsities spread over 2λ")
    block_reconstruction: BlockReconstruction | None = Field(
        default=None,
        description="unstructured methods: after each block's layer-wise prune, refit its kept weights to the "
        "dense block's outputs (masks fixed)",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from pruning_core.methods import METHODS, STRUCTURED_METHODS

        if value not in METHODS and value not in STRUCTURED_METHODS:
            allowed = ", ".join(sorted([*METHODS, *STRUCTURED_METHODS]))
            raise ValueError(f"unknown method {value!r}; allowed: {allowed}")
        return value

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            SparsityTarget.parse_pattern(value)
        return value

    @field_validator("layer_sparsity")
    @classmethod
    def _valid_overrides(cls, value: dict[str, float]) -> dict[str, float]:
        for name, ratio in value.items():
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"ratio for {name!r} must be in (0, 1), got {ratio}")
        return value

    @property
    def structured(self) -> bool:
        from pruning_core.methods import STRUCTURED_METHODS

        return self.method in STRUCTURED_METHODS

    @model_validator(mode="after")
    def _one_target(self) -> Recipe:
        if self.structured:
            if self.ratio is None or self.sparsity is not None or self.pattern is not None:
                raise ValueError(f"{self.method} takes 'ratio' (fraction of parameters removed), not sparsity/pattern")
            if self.allocation != "uniform":
                raise ValueError(f"allocation {self.allocation!r} is for unstructured methods, not {self.method}")
            if self.layer_sparsity or self.skip or self.true_sequential:
                raise ValueError(f"{self.method} prunes whole blocks: use keep_first/keep_last, not per-layer fields")
            self._only_defaults(_OWL_FIELDS, "allocation 'owl'")
            self._only_own_settings()
            if self.method == "llm_pruner":
                self.structured_settings()  # widths and kept blocks agree
            if self.block_reconstruction is not None:
                raise ValueError(f"block_reconstruction is for unstructured methods, not {self.method}")
            return self
        if self.ratio is not None or self.recovery is not None:
            raise ValueError("'ratio' and 'recovery' belong to structured methods (llm_pruner, depth)")
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of 'sparsity' (a ratio in (0, 1)) or 'pattern' (N:M such as '2:4')")
        if self.allocation == "owl":
            if self.sparsity is None:
                raise ValueError("allocation 'owl' spreads an unstructured 'sparsity'; N:M patterns are per group")
            if not 2 * self.owl_lambda < self.sparsity < 1 - 2 * self.owl_lambda:
                raise ValueError(f"with owl_lambda {self.owl_lambda} the sparsity must lie in (2λ, 1 - 2λ)")
        else:
            self._only_defaults(_OWL_FIELDS, "allocation 'owl'")
        self._only_own_settings()
        self._only_defaults(("ratio_of",), "structured methods (llm_pruner, depth)")
        method_settings()[self.method].check_settings(self)
        return self

    def _only_own_settings(self) -> None:
        own = method_settings()[self.method]
        for settings in _METHOD_SETTINGS:
            if settings is not own:
                self._only_defaults(tuple(settings.model_fields), settings.applies_to)

    def method_settings(self) -> MethodSettings:
        """The recipe's fields that its method declares as its own (what the method reads)."""
        settings = method_settings()[self.method]
        return settings.model_validate({name: getattr(self, name) for name in settings.model_fields})

    def _only_defaults(self, names: tuple[str, ...], owner: str) -> None:
        """Fields of another method would change the fingerprint without changing the result: refuse them."""
        for name in names:
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name!r} applies to {owner} only")

    def structured_settings(self) -> StructuredSettings:
        return StructuredSettings(
            ratio=self.ratio,
            ratio_of=self.ratio_of,
            widths=self.widths,
            importance=self.importance,
            aggregation=self.aggregation,
            keep_first=self.keep_first,
            keep_last=self.keep_last,
            attention_unit=self.attention_unit,
            refit=self.channel_refit,
        )

    def depth_settings(self) -> DepthSettings:
        return DepthSettings(ratio=self.ratio, ratio_of=self.ratio_of, importance=self.depth_importance)

    def without_recovery(self) -> Recipe:
        """The prune alone: recipes differing only in recovery share one structured prune."""
        return self.model_copy(update={"recovery": None})

    def describe(self) -> str:
        if self.structured:
            kind = "blocks" if self.method == "depth" else "width"
            return f"{self.ratio:.0%} of {'all' if self.ratio_of == 'all' else 'decoder'} parameters ({kind})"
        return self.target.describe() + (" (OWL)" if self.allocation == "owl" else "")

    @property
    def target(self) -> SparsityTarget:
        if self.structured:
            raise ValueError(f"{self.method} removes whole heads and channels; it has no sparsity target")
        if self.pattern is not None:
            return SparsityTarget.parse_pattern(self.pattern)
        return SparsityTarget(ratio=self.sparsity)

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            if name not in _FIRST_FIELDS and getattr(self, name) == field.default:
                if not (self.structured and name in _STRUCTURED_MEANING):
                    del data[name]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @staticmethod
    def read_yaml(path: str | Path) -> dict[str, Any]:
        path = Path(path)
        data = read_yaml_file(path, "recipe file") or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe must be a mapping of field: value")
        return data

    @classmethod
    def with_overrides(cls, base: dict[str, Any], overrides: dict[str, Any]) -> Recipe:
        """`base` updated with the overrides that are set; a sparsity, pattern or ratio replaces the others."""
        given = {k: v for k, v in overrides.items() if v is not None}
        merged = dict(base)
        targets = ("sparsity", "pattern", "ratio")
        if any(name in given for name in targets):
            for name in targets:
                merged.pop(name, None)
        merged.update(given)
        return cls.model_validate(merged)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return cls.model_validate(cls.read_yaml(path))


def describe_validation_error(error: Exception, what: str = "recipe") -> str:
    """One line naming each offending field and what is allowed."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    problems = error.errors()
    parts = []
    for item in problems[:MAX_LISTED_PROBLEMS]:
        field = ".".join(str(p) for p in _without_union_tags(item["loc"])) or "recipe"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(cut(f"{field}: {message}", MAX_PROBLEM_CHARS))
    more = len(problems) - len(parts)
    return f"invalid {what}: " + "; ".join(parts) + (f"; and {more:,} more problems" if more > 0 else "")


def _without_union_tags(loc: tuple) -> list:
    """`recovery.lora.data` -> `recovery.data`: the recovery kind is a union tag, not a field the user wrote."""
    return [part for i, part in enumerate(loc) if not (i and loc[i - 1] == "recovery" and part in ("lora", "distill"))]


# One error line stays readable: a batch of 10,000 bad recipes lists its first few problems, each cut short.
MAX_LISTED_PROBLEMS = 5
MAX_PROBLEM_CHARS = 300


def cut(text: str, limit: int) -> str:
    """`text` with at most `limit` characters kept, saying how many were left off."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more chars)"


# A hand-written batch of 10,000 recipes is ~0.5 MB and ~80,000 YAML nodes: larger files are refused.
MAX_YAML_BYTES = 4 * 2**20
MAX_YAML_NODES = 2_000_000  # after aliases are expanded
MAX_YAML_DEPTH = 32  # batch files nest 4 levels; PyYAML composes recursively, so depth is bounded too


def read_yaml_file(path: Path, what: str) -> Any:
    """A YAML file's value, with every refusal one line naming the file.

    Aliases (`*a`, merge keys) are counted as the nodes they stand for: a few lines of nested aliases
    expand into billions of nodes ("billion laughs") that validation would walk for good. An event pass
    bounds the expanded size (and the nesting) before any node is built; aliases that stay small, such as
    the ones `yaml.safe_dump` writes for a repeated value, still load.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ValueError(f"{path}: {size:,} bytes is more than a {what} may hold ({MAX_YAML_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: 4x faster
    try:
        _check_expanded_size(yaml.parse(text, Loader=loader), path)
        return yaml.load(text, Loader=loader)  # a safe loader, over a document of bounded expanded size
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None


def _check_expanded_size(events: Iterator[yaml.Event], path: Path) -> None:
    """Count the nodes the document has once every alias is replaced by its anchor's node."""
    nodes = 0
    anchored: dict[str, int] = {}  # anchor -> expanded nodes of its node
    open_collections: list[tuple[str | None, int]] = []  # (anchor, node count when it opened)
    for event in events:
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_collections):
                raise ValueError(f"{path}: alias *{event.anchor} refers to a node that contains it ({_where(event)})")
            nodes += anchored.get(event.anchor, 1)  # an unknown anchor: the composer reports it
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_collections.append((event.anchor, nodes))
            nodes += 1
            if len(open_collections) > MAX_YAML_DEPTH:
                raise ValueError(f"{path}: nested deeper than {MAX_YAML_DEPTH} levels ({_where(event)})")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, start = open_collections.pop()
            if anchor is not None:
                anchored[anchor] = nodes - start
        if nodes > MAX_YAML_NODES:
            raise ValueError(
                f"{path}: more than {MAX_YAML_NODES:,} YAML nodes once its aliases are expanded ({_where(event)}); "
                "write the values out instead of aliasing them"
            )


def _where(event: yaml.Event) -> str:
    return f"at line {event.start_mark.line + 1}, column {event.start_mark.column + 1}"
