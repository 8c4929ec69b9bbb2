"""Configuration of a model pruned by IntraSlice.

This file is self-contained (it imports only ``transformers``): it is copied next to
every saved model so that ``trust_remote_code=True`` loads the model without the
``intraslice`` package installed.

The residual stream is never touched by IntraSlice, so the global shapes (vocabulary,
hidden size, number of layers, norms, RoPE parameters) are those of the source model.
What changes is *inside* each decoder layer, and every such shape lives in ``layers``.
Layout flags describe the source family: ``mlp_gated`` (gate/up/down, or up/down as
Phi-2's fc1/fc2), ``parallel_block`` (attention and MLP read one norm, Phi-2),
``norm_type`` ("rms" or "layer": LayerNorm with bias), ``lm_head_bias``. With a partial
rotary embedding (``rope_parameters["partial_rotary_factor"]`` < 1) the frequencies past the
rotary part are zero: the non-rotating q/k dims are pairs that never rotate. Scaled RoPE
(linear, llama3, yarn, longrope, dynamic, proportional) is reproduced as ``transformers``
computes it, from ``rope_parameters``, ``max_position_embeddings`` and
``original_max_position_embeddings`` (kept for that), including longrope's short/long
switch and dynamic NTK's recompute past those lengths.

``layers[l]`` is a dict with

    ``num_heads``          query heads kept in this layer
    ``num_kv_heads``       KV heads kept in this layer
    ``head_dim``           common width r of the kept heads (Q/K and V/O)
    ``kv_index``           for each kept query head, the index of the kept KV head it reads
    ``rope_pairs``         for each kept KV head, the r/2 RoPE frequency indices it kept
                           (indices into the source model's head_dim/2 frequencies)
    ``intermediate_size``  MLP width of this layer
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


def unpruned_layer(num_heads: int, num_kv_heads: int, head_dim: int, intermediate_size: int) -> dict[str, Any]:
    """The spec of a layer that keeps every head at full width with every RoPE pair."""
    g = num_heads // num_kv_heads
    return {
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "kv_index": [i // g for i in range(num_heads)],
        "rope_pairs": [list(range(head_dim // 2)) for _ in range(num_kv_heads)],
        "intermediate_size": intermediate_size,
    }


class IntraSliceConfig(PretrainedConfig):
    """Config of an IntraSlice-pruned decoder-only causal LM (Llama family layout)."""

    model_type = "intraslice"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # noqa: RUF012 (transformers class attribute)

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 11008,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict[str, Any] | None = None,
        attention_bias: bool = False,
        o_proj_bias: bool = False,
        mlp_bias: bool = False,
        down_proj_bias: bool = False,
        mlp_gated: bool = True,
        parallel_block: bool = False,
        norm_type: str = "rms",
        lm_head_bias: bool = False,
        tie_word_embeddings: bool = False,
        layers: list[dict[str, Any]] | None = None,
        source_model_type: str | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        # Source-model values: kept because RoPE initialisers (llama3, yarn, ...) read them.
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        self.o_proj_bias = o_proj_bias
        self.mlp_bias = mlp_bias
        self.down_proj_bias = down_proj_bias
        self.mlp_gated = mlp_gated
        self.parallel_block = parallel_block
        self.norm_type = norm_type
        self.lm_head_bias = lm_head_bias
        self.source_model_type = source_model_type
        self.use_cache = use_cache
        if layers is None:
            # An unpruned layout: handy for tests and for building a config by hand.
            n_h, n_kv, h = self.num_attention_heads, self.num_key_value_heads, self.head_dim
            layers = [unpruned_layer(n_h, n_kv, h, intermediate_size) for _ in range(num_hidden_layers)]
        if len(layers) != num_hidden_layers:
            raise ValueError(f"layers has {len(layers)} entries, num_hidden_layers is {num_hidden_layers}")
        self.layers = [dict(spec) for spec in layers]
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
