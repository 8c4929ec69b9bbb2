"""The compressed-model classes (self-contained files, copied next to every saved model)."""

from .configuration_intraslice import IntraSliceConfig
from .configuration_slicegpt import SliceGPTConfig
from .modeling_intraslice import IntraSliceAttention, IntraSliceForCausalLM, IntraSliceModel
from .modeling_slicegpt import SliceGPTForCausalLM

__all__ = [
    "IntraSliceAttention",
    "IntraSliceConfig",
    "IntraSliceForCausalLM",
    "IntraSliceModel",
    "SliceGPTConfig",
    "SliceGPTForCausalLM",
]
