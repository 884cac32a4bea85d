"""Registry of pruning methods: one file per method, one line here."""

from pruning_core.methods.apt import AptSettings, prune_apt
from pruning_core.methods.base import LayerProblem, Method, MethodSettings, StructuredMethod
from pruning_core.methods.magnitude import prune_magnitude
from pruning_core.methods.sparsegpt import prune_sparsegpt
from pruning_core.methods.wanda import prune_wanda
from pruning_core.structured.depth import DepthImportanceSettings
from pruning_core.structured.llm_pruner import WidthSettings

METHODS: dict[str, Method] = {
    "magnitude": Method(prune=prune_magnitude, needs="nothing"),
    "wanda": Method(prune=prune_wanda, needs="column_norms"),
    "sparsegpt": Method(prune=prune_sparsegpt, needs="hessian"),
    # 2: conjugate-gradient refit; 3: H^-1-preconditioned refit at 1e-5, ADMM mask refinement by default;
    # 4: ADMM from the removal updates, 14 steps x1.22 (the same final penalty as 20 x1.15, 30% less time)
    "apt": Method(prune=prune_apt, needs="hessian", version="5", settings=AptSettings),
}

# Structured methods remove whole heads and channels, or whole blocks, over the whole model (pruning_core.structured).
# llm_pruner 2: uniform widths and ratios of the decoder by default; 3: activation importance and the
# least-squares refit of down_proj/o_proj by default with uniform widths.
STRUCTURED_METHODS: dict[str, StructuredMethod] = {
    "llm_pruner": StructuredMethod(version="3", settings=WidthSettings),
    "depth": StructuredMethod(version="1", settings=DepthImportanceSettings),
}


def method_version(name: str) -> str:
    return STRUCTURED_METHODS[name].version if name in STRUCTURED_METHODS else METHODS[name].version


def method_settings() -> dict[str, type[MethodSettings]]:
    """Each method's own recipe fields, by method name."""
    return {name: method.settings for name, method in (*METHODS.items(), *STRUCTURED_METHODS.items())}


__all__ = [
    "METHODS",
    "STRUCTURED_METHODS",
    "LayerProblem",
    "Method",
    "MethodSettings",
    "method_settings",
    "method_version",
]
