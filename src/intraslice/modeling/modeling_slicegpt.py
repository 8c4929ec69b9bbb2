"""The model class of a SliceGPT-sliced causal LM (the baseline, not IntraSlice).

Each decoder layer reads a residual stream of width ``a`` in one PCA basis, writes its
attention output in a second basis of width ``b`` and its MLP output in a third of width
``c``. The old residual is carried into each new basis by a *shortcut matrix* (a real
``nn.Linear`` without bias, counted as parameters): ``h = attn_shortcut(x) + attn(norm(x))``,
``y = mlp_shortcut(h) + mlp(norm(h))``. The norms have no weight (it was folded into the
next linears) and divide by the source model's hidden size, not by the sliced width, so that
at zero slicing the model is the source model exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from .configuration_slicegpt import SliceGPTConfig
from .modeling_intraslice import (
    IntraSliceAttention,
    IntraSliceForCausalLM,
    IntraSliceMLP,
    IntraSliceModel,
    IntraSlicePreTrainedModel,
)


class SlicedRMSNorm(nn.Module):
    """Weightless RMSNorm over a sliced vector, normalised by the *source* width."""

    def __init__(self, mean_dim: int, eps: float) -> None:
        super().__init__()
        self.mean_dim = mean_dim
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32) if input_dtype != torch.float64 else hidden_states
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.mean_dim + self.variance_epsilon)
        return x.to(input_dtype)


class SliceGPTDecoderLayer(nn.Module):
    def __init__(self, config: SliceGPTConfig, layer_idx: int) -> None:
        super().__init__()
        a, b, c = config.residual_dims[2 * layer_idx : 2 * layer_idx + 3]
        spec = config.layers[layer_idx]
        self.input_layernorm = SlicedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = IntraSliceAttention(config, layer_idx, in_dim=a, out_dim=b)
        self.attn_shortcut = nn.Linear(a, b, bias=False)
        self.post_attention_layernorm = SlicedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = IntraSliceMLP(config, int(spec["intermediate_size"]), in_dim=b, out_dim=c)
        self.mlp_shortcut = nn.Linear(b, c, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        attn, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = self.attn_shortcut(hidden_states) + attn
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))


class SliceGPTPreTrainedModel(IntraSlicePreTrainedModel):
    config_class = SliceGPTConfig
    config: SliceGPTConfig
    _no_split_modules = ["SliceGPTDecoderLayer"]  # noqa: RUF012 (transformers class attribute)


class SliceGPTModel(SliceGPTPreTrainedModel, IntraSliceModel):
    @staticmethod
    def make_layer(config: SliceGPTConfig, layer_idx: int) -> nn.Module:
        return SliceGPTDecoderLayer(config, layer_idx)


class SliceGPTForCausalLM(SliceGPTPreTrainedModel, IntraSliceForCausalLM):
    @staticmethod
    def make_model(config: SliceGPTConfig) -> nn.Module:
        return SliceGPTModel(config)
