"""Configuration of a ``nemotron-nas`` (``DeciLMForCausalLM``) model directory written by IntraSlice.

This file is self-contained (it imports only ``transformers``): ``intraslice export --format
vllm`` copies it next to the weights, and ``config.json`` names it in ``auto_map``, so
``trust_remote_code=True`` (``vllm serve DIR --trust-remote-code``) loads the config
without the ``intraslice`` package. Neither transformers nor vLLM registers a config class
for model type ``nemotron-nas``; vLLM's ``DeciLMForCausalLM`` reads ``block_configs[i]`` by
attribute (``.attention.no_op``, ``.attention.n_heads_in_group``, ``.ffn.no_op``, and
``.ffn.intermediate_size`` when the block has no ``ffn_mult``), which this class provides:
each block section holds exactly the keys its JSON has, nothing defaulted.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class BlockSection:
    """One section (``attention`` or ``ffn``) of a block: its JSON keys as attributes."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"BlockSection({self.__dict__!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockSection) and other.__dict__ == self.__dict__


class BlockConfig:
    """``attention`` and ``ffn`` of one decoder layer."""

    def __init__(self, attention: Any, ffn: Any) -> None:
        self.attention = attention if isinstance(attention, BlockSection) else BlockSection(**attention)
        self.ffn = ffn if isinstance(ffn, BlockSection) else BlockSection(**ffn)

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockConfig) and other.to_dict() == self.to_dict()


class DeciLMConfig(PretrainedConfig):
    """A Llama-style decoder whose layers differ in KV heads and MLP width (``block_configs``)."""

    model_type = "nemotron-nas"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict[str, Any] | None = None,
        attention_bias: bool = False,
        qkv_bias: bool | None = None,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = False,
        block_configs: list[Any] | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        if qkv_bias is not None:  # vLLM reads it when present: q/k/v biases, attention_bias the o_proj's
            self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.use_cache = use_cache
        blocks = block_configs or [{"attention": {"n_heads_in_group": 1}, "ffn": {}} for _ in range(num_hidden_layers)]
        if len(blocks) != num_hidden_layers:
            raise ValueError(f"block_configs has {len(blocks)} entries, num_hidden_layers is {num_hidden_layers}")
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in blocks]
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() if isinstance(b, BlockConfig) else b for b in self.block_configs]
        return out
