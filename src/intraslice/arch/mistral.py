"""Mistral: Llama layout, no biases. Sliding-window attention is not reproduced by the
pruned model (it attends over the full context); identical for contexts up to the
window (4096 tokens for Mistral-7B-v0.1, none for later releases)."""

from .base import ArchSpec, register

MISTRAL = register(
    ArchSpec(
        name="mistral",
        model_types=("mistral",),
        qkv_bias=lambda c: False,
        o_bias=lambda c: False,
        mlp_bias=lambda c: False,
    )
)
