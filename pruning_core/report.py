"""The report of a pruned model folder (`sparsity.json`): one typed model from the engine to the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

REPORT_FILE = "sparsity.json"  # written last into a pruned model folder: its presence means complete


class ParameterCounts(BaseModel):
    """Parameters of a model: the decoder (its blocks and norms), the embeddings (input and output, a tied
    head counted once), and all."""

    model_config = ConfigDict(extra="forbid")

    total: int
    decoder: int
    embeddings: int


class StructureReport(BaseModel):
    """What structured pruning changed: sizes, per-block widths or the blocks removed, CPU forward latency."""

    model_config = ConfigDict(extra="forbid")

    parameters_before: int
    parameters_after: int
    counts_before: ParameterCounts | None = None
    counts_after: ParameterCounts | None = None
    ratio_of: str = "all"  # what the recipe's ratio counted (reports before ratio_of counted all)
    block_share: float  # width: share of each pruned block's projections removed; depth: of the blocks
    block_shapes: dict[str, dict[str, int]]
    removed_blocks: list[int] = []  # depth pruning: indices in the dense model
    block_importance: list[float] = []  # depth pruning: per dense block, larger is more important
    latency_ms_before: float
    latency_ms_after: float
    latency_tokens: int
    loads_with_from_pretrained: bool

    def metrics(self) -> dict[str, float]:
        """The numeric fields tracked per run."""
        counts = {
            f"parameters_{part}_{when}": float(getattr(counted, part))
            for when, counted in (("before", self.counts_before), ("after", self.counts_after))
            if counted is not None
            for part in ("decoder", "embeddings")
        }
        return {
            "parameters_before": float(self.parameters_before),
            "parameters_after": float(self.parameters_after),
            **counts,
            "latency_ms_before": self.latency_ms_before,
            "latency_ms_after": self.latency_ms_after,
            "block_share": self.block_share,
            "blocks_removed": float(len(self.removed_blocks)),
            "loads_with_from_pretrained": float(self.loads_with_from_pretrained),
        }


class RecoveryReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict
    fingerprint: str
    losses: list[float]
    seconds: float
    resumed_from_step: int = 0
    heldout: dict[int, float] = {}  # distillation: step -> held-out perplexity
    precision: str = "float32"  # what the training's forward passes ran in


class Provenance(BaseModel):
    """Where a pruned folder came from; absent for an in-memory prune outside the pipeline."""

    model_config = ConfigDict(extra="forbid")

    model: str
    model_fingerprint: str
    run_fingerprint: str
    calibration_fingerprint: str


class ExpertUsage(BaseModel):
    """A fused experts weight of one block: calibration tokens routed to each expert, and the fallbacks."""

    tokens: list[int]
    fallback: list[int] = []  # experts pruned by magnitude: too few routed tokens for the method


class BlockReconstructionReport(BaseModel):
    """One block's refit to the dense block's outputs (`block_reconstruction`), errors on the calibration set."""

    error_before: float  # relative output error of the block after the layer-wise prune
    error_after: float  # ... after the refit (equal to error_before when it was undone)
    steps: int
    kept: bool  # False: the refit did not lower the error and the layer-wise weights were restored


class RunFacts(BaseModel):
    """What the runner of a prune knows of it besides what the engine measures: how and where it ran."""

    resumed_from_block: int = 0
    resumed_gradients: bool = False  # structured: gradient statistics came from a checkpoint
    environment: dict[str, str] = {}  # device, torch version, threads: results differ across them
    resumed_environment: dict[str, str] | None = None  # the earlier blocks' environment, where it differed
    dtype: str = ""  # of the saved weights


class ResumedBlocks(BaseModel):
    """What the checkpointed blocks of an interrupted prune measured (the engine goes on after them)."""

    errors: dict[str, float] = {}  # relative output error per linear
    experts: dict[str, ExpertUsage] = {}
    refits: dict[int, BlockReconstructionReport] = {}  # per block, with `block_reconstruction`


class FolderFacts(BaseModel):
    """What is known once a folder's files are written: their sizes and sha256, and what making it cost."""

    prune_seconds: float
    peak_rss_mib: float
    peak_gpu_mib: float
    files: dict[str, int]
    sha256: dict[str, str]


class PruneReport(BaseModel):
    """Built once by the job (`pruning_core.job`) from the engine's measurements and the runner's `RunFacts`;
    completed once, when its folder is committed, by `FolderFacts`."""

    model_config = ConfigDict(extra="forbid")

    total: float  # zero fraction over the prunable weights (structured: share of parameters removed)
    parameters: int
    zeros: int = 0
    layers: dict[str, float] = {}  # zero fraction per prunable weight
    recipe: dict
    recipe_fingerprint: str
    provenance: Provenance | None = None
    reconstruction_error: dict[str, float] = {}  # relative output error per linear
    block_errors: list[float] = []  # mean of the above per block
    block_sparsity: list[float] | None = None  # per block, when the recipe allocates it (OWL)
    block_reconstruction: dict[int, BlockReconstructionReport] = {}  # per block, with `block_reconstruction`
    experts: dict[str, ExpertUsage] = {}  # per fused experts weight (mixture-of-experts models)
    prune_seconds: float
    phase_seconds: dict[str, float] = {}  # statistics, solve, reconstruct, forward
    resumed_from_block: int = 0
    resumed_gradients: bool = False  # structured: gradient statistics came from a checkpoint
    environment: dict[str, str] = {}  # device, torch version, threads: results differ across them
    resumed_environment: dict[str, str] | None = None  # the earlier blocks' environment, where it differed
    dtype: str = ""  # of the saved weights
    structure: StructureReport | None = None
    recovery: RecoveryReport | None = None
    peak_rss_mib: float = 0.0
    peak_gpu_mib: float = 0.0
    files: dict[str, int] = {}  # every other file of the folder with its size in bytes
    sha256: dict[str, str] = {}  # every other file of the folder with its sha256, recorded when it was made

    def completed(self, facts: FolderFacts) -> PruneReport:
        return self.model_copy(update=dict(facts))

    def with_recovery(self, recovery: RecoveryReport) -> PruneReport:
        """The report of a recovered folder: its pruned model's, with the recovery's."""
        return self.model_copy(update={"recovery": recovery})

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / REPORT_FILE
        path.write_text(self.to_json())
        return path

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: str | Path) -> PruneReport | None:
        """The folder's report, or None where it is missing, torn or of another layout."""
        try:
            return cls.model_validate_json((Path(folder) / REPORT_FILE).read_bytes())
        except (OSError, ValidationError):
            return None
