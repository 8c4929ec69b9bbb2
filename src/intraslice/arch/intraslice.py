"""The compressed models themselves (``intraslice``, and the ``slicegpt`` baseline):
Llama-style names, so parameter counting and evaluation use the same mapping as for the
source models."""

from .base import ArchSpec, register

INTRASLICE = register(ArchSpec(name="intraslice", model_types=("intraslice",), prunable=False))
SLICEGPT = register(
    ArchSpec(
        name="slicegpt",
        model_types=("slicegpt",),
        prunable=False,
        attn_shortcut="attn_shortcut",
        mlp_shortcut="mlp_shortcut",
    )
)
