"""The sequential layer pipeline and its device policy (plumbing between data and ``algo``)."""

from .devices import ActivationStore, DevicePolicy
from .sequential import LayerContext, LayerReport, LayerResult, ModelLayers, PipelineOutcome, run_layers

__all__ = [
    "ActivationStore",
    "DevicePolicy",
    "LayerContext",
    "LayerReport",
    "LayerResult",
    "ModelLayers",
    "PipelineOutcome",
    "run_layers",
]
