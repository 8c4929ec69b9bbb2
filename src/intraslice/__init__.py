"""intraslice: structured pruning of LLMs with block-intra PCA (IntraSlice).

Quick start::

    from intraslice import PruneConfig, calibration_windows, load_model, prune, save_pruned
    src = load_model()                      # SmolLM2-135M-Instruct (GGUF) by default
    calib = calibration_windows(src.tokenizer, "c4", nsamples=32, seqlen=512)
    result = prune(src.model, calib.tokens, PruneConfig(ratio=0.3))
    save_pruned(result.model, src.tokenizer, "smollm2-pruned", report=result.report())
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .api import PruneResult, build_pruned_model, prune
from .config import PruneConfig
from .data import CalibrationSet, calibration_windows, with_repeated_spans
from .engine import RunConfig, run
from .errors import IntraSliceError, NonFiniteError
from .methods.registry import MethodSpec, register_method
from .modeling import IntraSliceConfig, IntraSliceForCausalLM, SliceGPTConfig, SliceGPTForCausalLM
from .models import load_model
from .saving import save_pruned

try:
    __version__ = version("intraslice")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_REGISTERED = False


def register_auto_classes() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(dir)`` load pruned models (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type, config_cls, model_cls in (
        ("intraslice", IntraSliceConfig, IntraSliceForCausalLM),
        ("slicegpt", SliceGPTConfig, SliceGPTForCausalLM),
    ):
        try:
            AutoConfig.register(model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered by another import path
            pass
        # Saved configs carry auto_map so trust_remote_code=True works without this package.
        config_cls.register_for_auto_class()
        model_cls.register_for_auto_class("AutoModelForCausalLM")
    _REGISTERED = True


register_auto_classes()

__all__ = [
    "CalibrationSet",
    "IntraSliceConfig",
    "IntraSliceError",
    "IntraSliceForCausalLM",
    "MethodSpec",
    "NonFiniteError",
    "PruneConfig",
    "PruneResult",
    "RunConfig",
    "SliceGPTConfig",
    "SliceGPTForCausalLM",
    "__version__",
    "build_pruned_model",
    "calibration_windows",
    "load_model",
    "prune",
    "register_auto_classes",
    "register_method",
    "run",
    "save_pruned",
    "with_repeated_spans",
]
