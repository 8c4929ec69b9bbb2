"""The pruned-model classes (self-contained files, copied next to every saved model)."""

from .configuration_intraslice import IntraSliceConfig
from .modeling_intraslice import IntraSliceAttention, IntraSliceForCausalLM, IntraSliceModel

__all__ = ["IntraSliceAttention", "IntraSliceConfig", "IntraSliceForCausalLM", "IntraSliceModel"]
