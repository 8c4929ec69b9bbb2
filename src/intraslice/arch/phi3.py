"""Phi-3 (mini: MHA, head dim 96; medium: GQA, head dim 128): fused qkv_proj and gate_up_proj.

``prepare`` (layer by layer: ``convert_phi3_layer``) splits the fused projections into
Llama-style q/k/v and gate/up linears (exact: rows are copied). **Decision**: the pruned
model keeps them split (our per-KV-head RoPE-pair selection gives Q, K and V different
widths per head group, which a fused matrix would only hide); it is saved as an
``intraslice`` model, not re-fused into Phi-3's layout. A partial rotary embedding
(Phi-4-mini style) goes through the same zero-frequency pairing as Phi-2.
"""

from __future__ import annotations

from torch import nn

from .base import ArchSpec, register
from .convert import (
    install_rotary,
    install_split_attention,
    install_split_mlp,
    intraslice_config,
    is_converted,
    weight_bias,
)


def convert_phi3_layer(model: nn.Module, arch: ArchSpec, li: int) -> None:
    """Split layer ``li``'s fused qkv_proj and gate_up_proj (rows copied: exact)."""
    layer = arch.decoder_layers(model)[li]
    if is_converted(layer):
        return
    cfg = intraslice_config(model, arch)
    dims = arch.dims(model.config)
    q_rows = dims["n_heads"] * dims["head_dim"]
    kv_rows = dims["n_kv"] * dims["head_dim"]
    m = dims["m"]
    w, b = weight_bias(layer.self_attn.qkv_proj)
    cut = (q_rows, q_rows + kv_rows)
    parts = [(w[:q_rows], w[cut[0] : cut[1]], w[cut[1] :]), (None, None, None)]
    if b is not None:
        parts[1] = (b[:q_rows], b[cut[0] : cut[1]], b[cut[1] :])
    q, k, v = ((parts[0][i], parts[1][i]) for i in range(3))
    install_split_attention(layer, cfg, li, q, k, v, weight_bias(layer.self_attn.o_proj))
    gw, gb = weight_bias(layer.mlp.gate_up_proj)
    gate = (gw[:m], None if gb is None else gb[:m])
    up = (gw[m:], None if gb is None else gb[m:])
    install_split_mlp(layer, cfg, gate, up, weight_bias(layer.mlp.down_proj))


def convert_phi3_globals(model: nn.Module, arch: ArchSpec) -> None:
    """A partial rotary embedding: the rotary module with zero-frequency tail pairs."""
    install_rotary(model, intraslice_config(model, arch))


PHI3 = register(
    ArchSpec(name="phi3", model_types=("phi3",), convert_layer=convert_phi3_layer, convert_globals=convert_phi3_globals)
)
