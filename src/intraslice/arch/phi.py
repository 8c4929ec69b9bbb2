"""Phi-2 / Phi-1.5 (``phi``): parallel attention and MLP reading one LayerNorm (with bias),
a plain GELU MLP ``fc1``/``fc2`` with biases, biases on q/k/v/dense and the LM head, and a
partial rotary embedding (only the first ``rotary_dim`` dims of each head rotate).

``prepare`` (layer by layer: ``convert_phi_layer``) renames ``dense`` to ``o_proj`` and
``fc1``/``fc2`` to ``up_proj``/``down_proj`` and pairs the non-rotating q/k dims as
zero-frequency RoPE pairs (see ``convert.py``), so the RoPE-pair selection of method.md 2.B
also selects the non-rotating dims, in pairs. Every bias is carried through: q/k rows are
permuted with their biases, o_proj and down_proj keep theirs (the V/O and MLP corrections
fold into the weights only).
"""

from __future__ import annotations

from torch import nn

from ..errors import IntraSliceError
from .base import ArchSpec, register
from .convert import install_rotary, install_split_attention, install_split_mlp, intraslice_config, is_converted
from .convert import weight_bias as wb


def convert_phi_globals(model: nn.Module, arch: ArchSpec) -> None:
    """Refuse qk_layernorm, and give a partial rotary embedding its zero-frequency tail pairs."""
    if getattr(model.config, "qk_layernorm", False):
        raise IntraSliceError(
            "phi models with qk_layernorm are not supported: a LayerNorm over the whole head width does not "
            "commute with deleting q/k dims"
        )
    install_rotary(model, intraslice_config(model, arch))


def convert_phi_layer(model: nn.Module, arch: ArchSpec, li: int) -> None:
    """Llama names for layer ``li`` (dense -> o_proj, fc1/fc2 -> up/down), q/k rows re-paired."""
    layer = arch.decoder_layers(model)[li]
    if is_converted(layer):
        return
    cfg = intraslice_config(model, arch)
    a = layer.self_attn
    install_split_attention(layer, cfg, li, wb(a.q_proj), wb(a.k_proj), wb(a.v_proj), wb(a.dense))
    install_split_mlp(layer, cfg, None, wb(layer.mlp.fc1), wb(layer.mlp.fc2))


PHI = register(
    ArchSpec(
        name="phi",
        model_types=("phi",),
        parallel_block=True,
        mlp_gated=False,
        norm_type="layer",
        post_attn_norm="input_layernorm",  # the one norm both branches read
        final_norm="model.final_layernorm",
        state_renames=(("model.final_layernorm.", "model.norm."),),
        qkv_bias=lambda c: True,
        o_bias=lambda c: True,
        mlp_bias=lambda c: True,
        lm_head_bias=lambda c: True,
        convert_layer=convert_phi_layer,
        convert_globals=convert_phi_globals,
    )
)
