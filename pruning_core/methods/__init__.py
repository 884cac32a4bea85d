"""Registry of pruning methods: one file per method, one line here."""

from pruning_core.methods.apt import prune_apt
from pruning_core.methods.base import LayerProblem, Method
from pruning_core.methods.magnitude import prune_magnitude
from pruning_core.methods.sparsegpt import prune_sparsegpt
from pruning_core.methods.wanda import prune_wanda

METHODS: dict[str, Method] = {
    "magnitude": Method(prune=prune_magnitude, needs="nothing"),
    "wanda": Method(prune=prune_wanda, needs="column_norms"),
    "sparsegpt": Method(prune=prune_sparsegpt, needs="hessian"),
    "apt": Method(prune=prune_apt, needs="hessian"),
}

__all__ = ["METHODS", "LayerProblem", "Method"]
