"""Architecture mappings: where things live in a Hugging Face model, by name.

One small :class:`ArchSpec` per architecture (see ``llama.py``, ``mistral.py``,
``qwen2.py``), registered by ``config.model_type``. The pruning code never asks
``if model_type == ...``: it asks the spec.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import IntraSliceError


@dataclass(frozen=True)
class ArchSpec:
    """Names and layout facts of one decoder architecture (Llama-style module tree)."""

    name: str
    model_types: tuple[str, ...]
    #: False for layouts that can be evaluated but not pruned (an already pruned model).
    prunable: bool = True
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    #: Attention and MLP read the same norm and add to the residual together (Phi-2, GPT-J).
    parallel_block: bool = False
    #: Gated MLP (gate/up/down) or a plain one (up/down, e.g. Phi-2's fc1/fc2): gate_proj None.
    mlp_gated: bool = True
    #: "rms" (RMSNorm) or "layer" (LayerNorm with bias); kept as is in the pruned model.
    norm_type: str = "rms"
    #: Converts decoder layer ``i`` of a loaded model, in place and exactly, into the module
    #: layout the pruning code reads (separate q/k/v and gate/up linears, RoPE dims in
    #: rotate_half pairs); None if the Hugging Face layout already is that. Per layer, so a
    #: streamed model (``checkpoint.SourceCheckpoint``) converts each layer as it is read.
    #: Must be idempotent.
    convert_layer: Callable[[nn.Module, ArchSpec, int], None] | None = None
    #: The model-level part of that conversion (config checks, the rotary module of a partial
    #: rotary embedding). Must work while the decoder layers are still on the meta device,
    #: and be idempotent.
    convert_globals: Callable[[nn.Module, ArchSpec], None] | None = None
    #: A whole-model conversion for a layout that cannot be converted layer by layer (runs
    #: after the two hooks above; a streamed model refuses it). No built-in family needs it.
    prepare: Callable[[nn.Module, ArchSpec], None] | None = None
    #: Source state-dict prefixes renamed for the pruned model (e.g. Phi's final_layernorm).
    state_renames: tuple[tuple[str, str], ...] = ()
    #: Residual shortcut matrices inside each layer (SliceGPT-sliced models only); counted
    #: with the attention and MLP linears because they cost the same per token.
    attn_shortcut: str | None = None
    mlp_shortcut: str | None = None
    #: RoPE layout: "rotate_half" pairs dims j and j + head_dim/2 (HF Llama convention).
    rope_layout: str = "rotate_half"
    #: Whether q/k/v, o and the MLP linears carry biases, read from the HF config.
    qkv_bias: Callable[[Any], bool] = field(default=lambda c: bool(getattr(c, "attention_bias", False)))
    o_bias: Callable[[Any], bool] = field(default=lambda c: bool(getattr(c, "attention_bias", False)))
    mlp_bias: Callable[[Any], bool] = field(default=lambda c: bool(getattr(c, "mlp_bias", False)))
    lm_head_bias: Callable[[Any], bool] = field(default=lambda c: False)

    # -- module access -------------------------------------------------------------
    @staticmethod
    def _get(root: nn.Module, path: str) -> Any:
        return operator.attrgetter(path)(root)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._get(model, self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return self._get(layer, self.attn)

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        setattr(layer, self.attn, module)

    def qkvo(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        a = self.attention(layer)
        return (
            self._get(a, self.q_proj),
            self._get(a, self.k_proj),
            self._get(a, self.v_proj),
            self._get(a, self.o_proj),
        )

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return self._get(layer, self.mlp)

    def gate_up_down(self, layer: nn.Module) -> tuple[nn.Linear | None, nn.Linear, nn.Linear]:
        m = self.mlp_module(layer)
        # A pruned model of a plain-MLP family has no gate even under the generic mapping.
        gate = getattr(m, self.gate_proj, None) if self.mlp_gated else None
        return gate, self._get(m, self.up_proj), self._get(m, self.down_proj)

    def set_mlp_linears(self, layer: nn.Module, gate: nn.Linear | None, up: nn.Linear, down: nn.Linear) -> None:
        m = self.mlp_module(layer)
        if gate is not None:
            setattr(m, self.gate_proj, gate)
        setattr(m, self.up_proj, up)
        setattr(m, self.down_proj, down)
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = up.out_features

    @property
    def needs_prepare(self) -> bool:
        """Whether a loaded model must be converted before the pruning code can read it."""
        return any(h is not None for h in (self.convert_layer, self.convert_globals, self.prepare))

    def prepare_globals(self, model: nn.Module) -> None:
        """The model-level conversion only (works on a skeleton whose layers are on meta)."""
        if self.convert_globals is not None:
            self.convert_globals(model, self)

    def prepare_layer(self, model: nn.Module, index: int) -> None:
        """Convert decoder layer ``index`` once its weights are real (idempotent).

        A layer still on the meta device is left alone: there is nothing to convert yet, and
        the streamed loader converts it when it materialises it.
        """
        if self.convert_layer is None:
            if self.prepare is not None:
                raise IntraSliceError(f"{self.name} models can only be converted whole, not layer by layer")
            return
        layer = self.decoder_layers(model)[index]
        if any(p.is_meta for p in layer.parameters()):
            return
        self.convert_layer(model, self, index)

    def prepare_model(self, model: nn.Module) -> None:
        """Bring a freshly loaded model into the layout the pruning code reads (idempotent).

        The global part runs first, so a config check (e.g. Phi's qk_layernorm) fails
        before any layer is touched.
        """
        self.prepare_globals(model)
        if self.convert_layer is not None:
            for index in range(len(self.decoder_layers(model))):
                self.prepare_layer(model, index)
        if self.prepare is not None:
            self.prepare(model, self)

    def shortcuts(self, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        """(attention, MLP) shortcut linears of a layer, or None where the layout has none."""
        return tuple(self._get(layer, name) if name else None for name in (self.attn_shortcut, self.mlp_shortcut))

    def mlp_input_module(self, layer: nn.Module) -> nn.Module:
        """The module whose input is the residual stream right after the attention block."""
        return self._get(layer, self.post_attn_norm)

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices per MLP channel (3 gated, 2 plain): what one removed channel saves."""
        return 3 if self.mlp_gated else 2

    def attention_residual(self, layer: nn.Module, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention block of a pre-norm layer: ``h + attn``.

        ``attn_out`` is the attention block's output (after o_proj). Lets a method that
        already holds that output build the MLP block's input without running the layer's
        attention again. A parallel block has no such point: its MLP reads the layer input.
        """
        if self.parallel_block:
            raise IntraSliceError(f"{self.name} layers run attention and MLP in parallel: no residual between them")
        return hidden + attn_out

    def mlp_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Second half of a pre-norm decoder layer: ``h + mlp(norm(h))``.

        Lets the runner finish a layer from the residual after attention without running
        the attention again. A parallel-block architecture overrides this.
        """
        norm = self._get(layer, self.post_attn_norm)
        return hidden + self.mlp_module(layer)(norm(hidden))

    # -- shapes --------------------------------------------------------------------
    @staticmethod
    def dims(config: Any) -> dict[str, int]:
        """hidden size d, query heads, KV heads, head dim h, MLP width m, layers L."""
        n_h = int(config.num_attention_heads)
        h = int(getattr(config, "head_dim", None) or config.hidden_size // n_h)
        return {
            "d": int(config.hidden_size),
            "n_heads": n_h,
            "n_kv": int(getattr(config, "num_key_value_heads", None) or n_h),
            "head_dim": h,
            "m": int(config.intermediate_size),
            "n_layers": int(config.num_hidden_layers),
        }

    def pruned_config_kwargs(self, config: Any) -> dict[str, Any]:
        """Global (residual-stream) fields of the pruned model's config, from the source config."""
        dims = self.dims(config)
        rope = getattr(config, "rope_parameters", None)
        if not rope:
            rope = {"rope_type": "default", "rope_theta": float(getattr(config, "rope_theta", 10000.0))}
        extra = {}
        if getattr(config, "original_max_position_embeddings", None):  # read by longrope/yarn initialisers
            extra["original_max_position_embeddings"] = int(config.original_max_position_embeddings)
        return {
            **extra,
            "vocab_size": int(config.vocab_size),
            "hidden_size": dims["d"],
            "num_hidden_layers": dims["n_layers"],
            "num_attention_heads": dims["n_heads"],
            "num_key_value_heads": dims["n_kv"],
            "head_dim": dims["head_dim"],
            "intermediate_size": dims["m"],
            "hidden_act": str(config.hidden_act),
            "max_position_embeddings": int(config.max_position_embeddings),
            "rms_norm_eps": float(config.layer_norm_eps if self.norm_type == "layer" else config.rms_norm_eps),
            "rope_parameters": dict(rope),
            "attention_bias": self.qkv_bias(config),
            "o_proj_bias": self.o_bias(config),
            "mlp_bias": self.mlp_bias(config),
            "mlp_gated": self.mlp_gated,
            "parallel_block": self.parallel_block,
            "norm_type": self.norm_type,
            "lm_head_bias": self.lm_head_bias(config),
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "source_model_type": str(config.model_type),
            "pad_token_id": getattr(config, "pad_token_id", None),
            "bos_token_id": getattr(config, "bos_token_id", None),
            "eos_token_id": getattr(config, "eos_token_id", None),
        }


ARCHITECTURES: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Register an architecture spec under each of its ``config.model_type`` names."""
    for model_type in spec.model_types:
        ARCHITECTURES[model_type] = spec
    return spec


def get_arch(config_or_type: Any) -> ArchSpec:
    """The spec for a config (or a model_type string); a clear error if unsupported.

    Given a config, its RoPE is checked too (:func:`check_rope`), so an unsupported one is
    refused before any work.
    """
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    try:
        spec = ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(k for k, v in ARCHITECTURES.items() if v.prunable))
        raise IntraSliceError(f"unsupported architecture {model_type!r}: intraslice supports {supported}") from None
    if not isinstance(config_or_type, str):
        check_rope(config_or_type)
    return spec


#: RoPE types the pruned model reproduces exactly (``modeling_intraslice.IntraSliceRotaryEmbedding``):
#: every type ``transformers.modeling_rope_utils`` defines, including the sequence-length-dependent
#: ``dynamic`` (NTK) and ``longrope`` (short/long factor switch).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")


def check_rope(config: Any) -> None:
    """Refuse a RoPE configuration the pruned model would not reproduce (one line, exit 2)."""
    rope = getattr(config, "rope_parameters", None)
    if not rope:
        return
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise IntraSliceError(
            "per-layer-type rope_parameters are not supported: the pruned model has one RoPE for all layers"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise IntraSliceError(
            f"rope_type {rope_type!r} is not supported: the pruned model reproduces {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
