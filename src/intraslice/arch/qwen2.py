"""Qwen2 / Qwen2.5: Llama layout with biases on q/k/v (none on o_proj or the MLP)."""

from .base import ArchSpec, register

QWEN2 = register(
    ArchSpec(
        name="qwen2", model_types=("qwen2",), qkv_bias=lambda c: True, o_bias=lambda c: False, mlp_bias=lambda c: False
    )
)
