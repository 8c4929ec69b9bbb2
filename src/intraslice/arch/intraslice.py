"""The pruned model itself (``model_type == "intraslice"``): Llama-style names, so
parameter counting and evaluation use the same mapping as for the source models."""

from .base import ArchSpec, register

INTRASLICE = register(ArchSpec(name="intraslice", model_types=("intraslice",), prunable=False))
