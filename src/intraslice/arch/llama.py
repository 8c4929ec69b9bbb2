"""Llama 2 (MHA), Llama 3 (GQA), SmolLM/SmolLM2: the reference layout."""

from .base import ArchSpec, register

LLAMA = register(ArchSpec(name="llama", model_types=("llama",)))
