"""The model class of an IntraSlice-pruned causal LM.

Self-contained (imports only ``torch`` and ``transformers``): this file is copied next to
every saved model so that ``trust_remote_code=True`` works without ``intraslice``.

What differs from a Llama decoder, and why:

* every layer has its own number of query heads, KV heads, head width r and MLP width,
  read from ``config.layers`` (no masks, no zero padding);
* query head i reads KV head ``kv_index[i]``: IntraSlice deletes whole query heads, so KV
  groups may end up of unequal size;
* Q/K keep whole RoPE pairs chosen *per KV head*, so each KV head (and the query heads that
  read it) rotates with its own subset of the source model's frequencies. The model
  computes the source model's full cos/sin tables once per forward and every attention
  gathers its kept columns;
* the softmax scale of the source model, 1/sqrt(h), is folded into the kept ``q_proj``
  rows at pruning time, so the attention kernel runs with its standard 1/sqrt(r).

The attention kernel comes from ``transformers``' attention-function registry (sdpa,
eager, flash, ...), not from copied model code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_intraslice import IntraSliceConfig


class IntraSliceRMSNorm(nn.Module):
    """RMSNorm computed in float32, as in the Llama family."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32) if input_dtype != torch.float64 else hidden_states
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class IntraSliceRotaryEmbedding(nn.Module):
    """cos/sin tables of the *source* model's RoPE (all head_dim/2 frequencies), as
    ``transformers`` computes them for every ``rope_type``.

    The attention layers gather their kept pairs from these tables, so a pruned pair keeps
    exactly the (scaled) frequency it had in the source model. Static types (default,
    linear, llama3, yarn, proportional) are one inverse-frequency vector and one attention
    factor, from ``transformers``' own initialisers. Two types depend on the sequence
    length and are reproduced step by step from ``transformers``' ``dynamic_rope_update``:

    * ``longrope`` (Phi-3 128k, Phi-3.5, Phi-4-mini) uses its ``short_factor`` table while
      the longest position of the batch is within ``original_max_position_embeddings``
      and its ``long_factor`` table beyond it;
    * ``dynamic`` (NTK) recomputes its base whenever the longest position grows past both
      ``max_position_embeddings`` and the longest seen so far, and goes back to the
      original table when a sequence shorter than ``max_position_embeddings`` follows (a
      state, as in ``transformers``).

    With a partial rotary embedding the pass-through dims are pairs of frequency 0 past the
    rotary part (``pad``); ``transformers`` leaves them alone, so the attention factor
    (yarn, longrope) is not applied to them.
    """

    def __init__(self, config: IntraSliceConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = str(config.rope_parameters.get("rope_type", "default"))
        if self.rope_type != "default" and self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_type {self.rope_type!r} is not known to this transformers version")
        for name, table in self.initial_tables().items():
            self.register_buffer(name, table, persistent=False)

    def initial_tables(self) -> dict[str, torch.Tensor]:
        """The inverse-frequency buffers at construction (also the state after a reset).

        Built on the CPU whatever the surrounding device context (the pruned model is
        assembled on the meta device; these buffers are not in the checkpoint).
        """
        self.max_seq_len_cached = self.original_max_seq_len = int(self.config.max_position_embeddings)
        inv_freq, self.attention_scaling = self.frequencies(self.config)
        tables = {"inv_freq": inv_freq, "original_inv_freq": inv_freq.clone()}
        if self.rope_type == "longrope":
            tables["long_inv_freq"] = self.frequencies(self.config, seq_len=self.long_threshold + 1)[0]
        return tables

    @property
    def long_threshold(self) -> int:
        """longrope: the longest sequence that still uses the short-factor table."""
        return int(self.config.rope_parameters["original_max_position_embeddings"])

    def frequencies(
        self, config: IntraSliceConfig, seq_len: int | torch.Tensor | None = None, device: Any = "cpu"
    ) -> tuple[torch.Tensor, float]:
        """head_dim/2 inverse frequencies (the tail past a partial rotary part is zero) and the
        attention factor, for a sequence of ``seq_len`` (None: at construction)."""
        partial = float(config.rope_parameters.get("partial_rotary_factor", 1.0) or 1.0)
        with torch.device(device):  # overrides a meta-device context
            if self.rope_type == "default":
                base = float(config.rope_parameters["rope_theta"])
                dim = int(config.head_dim * partial)
                exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
                inv_freq, scaling = 1.0 / (base**exponents), 1.0
            else:
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, device, seq_len=seq_len)
            inv_freq = inv_freq.to(device=device, dtype=torch.float32)
            self.pad = config.head_dim // 2 - inv_freq.shape[0]
            if self.pad > 0:
                inv_freq = torch.cat([inv_freq, inv_freq.new_zeros(self.pad)])
        return inv_freq, float(scaling)

    def reset_tables(self) -> None:
        """Refill the buffers from the config (``from_pretrained`` creates them empty)."""
        for name, table in self.initial_tables().items():
            getattr(self, name).copy_(table)

    def _update(self, position_ids: torch.Tensor, device: torch.device) -> None:
        """The sequence-length-dependent types, exactly as ``transformers.dynamic_rope_update``."""
        seq_len = torch.max(position_ids) + 1
        if self.rope_type == "longrope":
            long = self.long_inv_freq.to(device)
            self.inv_freq.copy_(torch.where(seq_len > self.long_threshold, long, self.original_inv_freq.to(device)))
            return
        # New buffers, not copies, as transformers does: a float32 table stays float32 in a
        # model cast to a lower precision.
        max_seq_len_cached = self.max_seq_len_cached
        if seq_len > max_seq_len_cached:  # growth
            inv_freq, self.attention_scaling = self.frequencies(self.config, seq_len=seq_len, device=device)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len and max_seq_len_cached > self.original_max_seq_len:  # reset
            self.register_buffer("inv_freq", self.original_inv_freq.to(device), persistent=False)
            self.max_seq_len_cached = self.original_max_seq_len

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_type == "longrope" or "dynamic" in self.rope_type:
            self._update(position_ids, x.device)
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq.to(x.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        if self.pad > 0 and self.attention_scaling != 1.0:  # pass-through pairs: unscaled identity
            half = emb.shape[-1] // 2
            rotating = (torch.arange(emb.shape[-1], device=emb.device) % half) < half - self.pad
            cos = torch.where(rotating, cos, torch.ones_like(cos))
            sin = torch.where(rotating, sin, torch.zeros_like(sin))
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, n_kv, t, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, t, d).reshape(b, n_kv * n_rep, t, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    else:
        t_q, t_k = query.shape[2], key.shape[2]
        causal = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device).tril(t_k - t_q)
        weights = weights.masked_fill(~causal, torch.finfo(weights.dtype).min)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class _GroupView:
    """What an attention kernel reads from its module, for one KV group of ``n`` query heads."""

    def __init__(self, n: int, config: IntraSliceConfig) -> None:
        self.num_key_value_groups = n
        self.is_causal = True
        self.training = False
        self.config = config


class IntraSliceAttention(nn.Module):
    """Attention with per-layer shapes and per-KV-head RoPE frequency subsets.

    ``forward`` takes the source model's (cos, sin) over all head_dim frequencies, so the
    same module also runs inside the *source* Hugging Face model while it is being
    pruned layer by layer.
    """

    def __init__(
        self,
        config: IntraSliceConfig,
        layer_idx: int,
        spec: dict[str, Any] | None = None,
        in_dim: int | None = None,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        spec = spec if spec is not None else config.layers[layer_idx]
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.num_heads = int(spec["num_heads"])
        self.num_kv_heads = int(spec["num_kv_heads"])
        self.head_dim = int(spec["head_dim"])
        if self.head_dim % 2 or self.num_heads < 1 or self.num_kv_heads < 1:
            raise ValueError(f"layer {layer_idx}: invalid attention shape {spec}")
        # in_dim/out_dim differ from hidden_size only in a sliced residual stream (SliceGPT baseline).
        d_in, d_out = in_dim or config.hidden_size, out_dim or config.hidden_size
        self.q_proj = nn.Linear(d_in, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(d_in, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(d_in, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d_out, bias=config.o_proj_bias)
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = 0.0

        kv_list = [int(i) for i in spec["kv_index"]]
        pair_lists = [[int(p) for p in ps] for ps in spec["rope_pairs"]]
        if (
            len(kv_list) != self.num_heads
            or len(pair_lists) != self.num_kv_heads
            or any(len(ps) != self.head_dim // 2 for ps in pair_lists)
        ):
            raise ValueError(f"layer {layer_idx}: kv_index/rope_pairs do not match the head counts")
        # Index buffers live on the CPU at construction (also under a meta-device context)
        # and follow the module on .to(device); they are derived from the config, not saved.
        self.register_buffer("kv_index", torch.tensor(kv_list, dtype=torch.long, device="cpu"), persistent=False)
        self.register_buffer("rope_pairs", torch.tensor(pair_lists, dtype=torch.long, device="cpu"), persistent=False)
        counts = [kv_list.count(j) for j in range(self.num_kv_heads)]
        uniform = len(set(counts)) == 1 and kv_list == sorted(kv_list)
        # With equal, ordered KV groups the kernels' native GQA path applies; otherwise the
        # keys/values are gathered per query head (the cache still stores KV heads only).
        self.num_key_value_groups = counts[0] if uniform else 1
        self._gather_kv = not uniform
        # Fast paths: every KV head kept every frequency (no gather at all), or equal groups
        # (query heads rotate with their KV head's tables by broadcasting, not by a gather).
        all_pairs = list(range(config.head_dim // 2))
        self._full_rope = self.head_dim == config.head_dim and all(ps == all_pairs for ps in pair_lists)
        self._groups = counts[0] if uniform else None
        # Unequal but contiguous groups: a decode step attends group by group (each group one
        # KV head, the kernels' GQA path) instead of copying the whole cache per query head.
        self._group_runs: list[tuple[int, int, Any]] = []
        if not uniform and kv_list == sorted(kv_list):
            start = 0
            for n in counts:
                self._group_runs.append((start, n, _GroupView(n, config)))
                start += n

    def _apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on (B, heads, T, r) q/k with each KV head's own kept frequencies."""
        if self._full_rope:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        half = cos.shape[-1] // 2
        idx = self.rope_pairs.to(cos.device)  # (n_kv, r/2)
        cos_kv = cos[..., :half][..., idx]  # (B, T, n_kv, r/2)
        sin_kv = sin[..., :half][..., idx]
        cos_kv = torch.cat((cos_kv, cos_kv), dim=-1).transpose(1, 2)  # (B, n_kv, T, r)
        sin_kv = torch.cat((sin_kv, sin_kv), dim=-1).transpose(1, 2)
        k = k * cos_kv + rotate_half(k) * sin_kv
        if self._groups is not None:
            b, _, t, r = q.shape
            qg = q.view(b, self.num_kv_heads, self._groups, t, r)
            c, s_ = cos_kv.unsqueeze(2), sin_kv.unsqueeze(2)
            return (qg * c + rotate_half(qg) * s_).view(b, self.num_heads, t, r), k
        q_idx = self.kv_index.to(cos.device)
        return q * cos_kv[:, q_idx] + rotate_half(q) * sin_kv[:, q_idx], k

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        bsz, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)

        q, k = self._apply_rope(q, k, *position_embeddings)

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        attention_interface: Callable = eager_attention_forward
        if impl != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        if self._gather_kv and q_len == 1 and self._group_runs:
            outs = [
                attention_interface(
                    proxy,
                    q[:, start : start + n],
                    k[:, j : j + 1],
                    v[:, j : j + 1],
                    attention_mask,
                    dropout=0.0,
                    scaling=self.scaling,
                    **kwargs,
                )[0]
                for j, (start, n, proxy) in enumerate(self._group_runs)
            ]
            out, weights = torch.cat(outs, dim=2), None
        else:
            if self._gather_kv:
                k, v = k[:, self.kv_index], v[:, self.kv_index]
            out, weights = attention_interface(
                self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
            )
        out = out.reshape(bsz, q_len, self.num_heads * self.head_dim).contiguous()
        return self.o_proj(out), weights


class IntraSliceMLP(nn.Module):
    """Gated MLP (gate/up/down), or plain (up/down) when ``config.mlp_gated`` is False, with
    this layer's own width.

    ``down_proj_bias`` adds a bias to ``down_proj`` alone: the channel baseline folds the
    mean contribution of removed channels into it (FLAP's bias compensation).
    """

    def __init__(
        self, config: IntraSliceConfig, width: int, in_dim: int | None = None, out_dim: int | None = None
    ) -> None:
        super().__init__()
        d_in, d_out = in_dim or config.hidden_size, out_dim or config.hidden_size
        down_bias = config.mlp_bias or getattr(config, "down_proj_bias", False)
        self.gated = getattr(config, "mlp_gated", True)
        if self.gated:
            self.gate_proj = nn.Linear(d_in, width, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d_in, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, d_out, bias=down_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def make_norm(config: IntraSliceConfig) -> nn.Module:
    """The source family's norm: RMSNorm, or LayerNorm with bias (Phi-2)."""
    if getattr(config, "norm_type", "rms") == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return IntraSliceRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class IntraSliceDecoderLayer(nn.Module):
    def __init__(self, config: IntraSliceConfig, layer_idx: int) -> None:
        super().__init__()
        spec = config.layers[layer_idx]
        self.self_attn = IntraSliceAttention(config, layer_idx)
        self.mlp = IntraSliceMLP(config, int(spec["intermediate_size"]))
        self.input_layernorm = make_norm(config)
        # A parallel block (Phi-2) feeds one norm to both attention and MLP.
        self.parallel = getattr(config, "parallel_block", False)
        if not self.parallel:
            self.post_attention_layernorm = make_norm(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        attn, _ = self.self_attn(
            normed,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        if self.parallel:
            return residual + attn + self.mlp(normed)
        hidden_states = residual + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class IntraSlicePreTrainedModel(PreTrainedModel):
    config_class = IntraSliceConfig
    config: IntraSliceConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["IntraSliceDecoderLayer"]  # noqa: RUF012 (transformers class attribute)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Standard init, plus the non-persistent buffers, which are derived from the config.

        ``from_pretrained`` re-creates non-persistent buffers empty and relies on this
        method to fill them (they are not in the checkpoint). The rotary tables are ours,
        not ``transformers``' generic RoPE init: theirs are unpadded, and only the rotary
        module knows its sequence-length state.
        """
        if isinstance(module, IntraSliceRotaryEmbedding):
            module.reset_tables()
            return
        super()._init_weights(module)
        if isinstance(module, IntraSliceAttention):
            spec = self.config.layers[module.layer_idx]
            module.kv_index.copy_(torch.tensor(spec["kv_index"], dtype=torch.long))
            module.rope_pairs.copy_(torch.tensor(spec["rope_pairs"], dtype=torch.long))


class IntraSliceModel(IntraSlicePreTrainedModel):
    def __init__(self, config: IntraSliceConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(self.make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.rotary_emb = IntraSliceRotaryEmbedding(config)
        self.post_init()

    @staticmethod
    def make_layer(config: IntraSliceConfig, layer_idx: int) -> nn.Module:
        """One decoder layer; a subclass with another layer layout overrides this."""
        return IntraSliceDecoderLayer(config, layer_idx)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                cache=cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class IntraSliceForCausalLM(IntraSlicePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 (transformers class attribute)

    def __init__(self, config: IntraSliceConfig) -> None:
        super().__init__(config)
        self.model = self.make_model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=getattr(config, "lm_head_bias", False))
        self.post_init()

    @staticmethod
    def make_model(config: IntraSliceConfig) -> nn.Module:
        return IntraSliceModel(config)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
