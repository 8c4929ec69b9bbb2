"""Export to a vLLM ``DeciLMForCausalLM`` (model type ``nemotron-nas``) directory.

Read from vLLM 0.34.0 (``vllm/model_executor/models/nemotron_nas.py``, ``models/llama.py``,
``layers/rotary_embedding``, ``transformers_utils/config.py``), what that class builds from
``config.json``:

* one query-head count (``num_attention_heads``) and one head width (``head_dim``) for the
  model; per layer ``block_configs[i].attention.n_heads_in_group``, the layer's KV heads being
  ``num_attention_heads // n_heads_in_group`` with query head j on KV head j // n_heads_in_group;
  scores scaled by ``head_dim ** -0.5`` (the source scale is folded into ``q_proj`` at pruning);
* per layer the MLP width: ``ffn.intermediate_size`` as given when the block has no
  ``ffn_mult`` (which vLLM would round up to a multiple of 256), SiLU only;
* q/k/v biases from ``qkv_bias`` when present, the o_proj bias from ``attention_bias``; MLP
  biases from ``mlp_bias`` on gate, up and down together;
* the RoPE of ``rope_parameters`` over the whole head, rotate-half (neox) style. Kept pairs that
  are not the standard frequencies at width r travel as ``rope_type: longrope`` with
  short = long factors and ``original_max_position_embeddings = max_position_embeddings``:
  vLLM's ``Phi3LongRoPEScaledRotaryEmbedding`` computes inv_freq_i = 1 / (f_i * base^(2i/r))
  in float32, the expression of transformers' that :func:`.stock_hf.longrope_factors` solves,
  with cos/sin scale 1 unless ``short_mscale``/``long_mscale`` say otherwise (a source whose
  RoPE scales cos/sin, e.g. yarn, passes its factor there).

Neither transformers nor vLLM registers a config class for ``nemotron-nas``: the directory
carries its own (``configuration_decilm.py``, named in ``auto_map``), so it is served with
``vllm serve DIR --trust-remote-code``. Tensor names are the Llama ones vLLM's loader maps
(``q_proj``/``k_proj``/``v_proj`` into ``qkv_proj``, ``gate_proj``/``up_proj`` into
``gate_up_proj``); the weight files are copied byte for byte.

A model fits when pruned with ``--deploy vllm`` (every layer's attention kept whole, the MLP
widths per layer) or ``--deploy stock``; any other is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import IntraSliceError
from ..models import config_dtype
from .common import check_deployable, kept_pairs, load_pruned_config
from .stock_hf import COPIED_SUFFIXES, NOT_COPIED, stock_rope_parameters

FORMAT = "vllm"
TARGET = "--deploy vllm"
ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
#: The config class the directory carries (``trust_remote_code``).
CONFIG_MODULE = Path(__file__).with_name("configuration_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig"}


def vllm_rope_parameters(config: Any, pairs: list[int], width: int) -> dict[str, Any]:
    """``rope_parameters`` for the kept ``pairs`` at head width ``width`` (see module docstring).

    The stock export's longrope factors, with what vLLM's longrope reads beside them: an
    explicit ``factor`` of 1 and the source's cos/sin scale as ``short_mscale``/``long_mscale``.
    """
    h = int(config.head_dim)
    if width == h and pairs == list(range(h // 2)):
        return dict(config.rope_parameters)  # every frequency kept: vLLM computes the source's own RoPE
    out = stock_rope_parameters(config, pairs, width, fmt=FORMAT)
    out["factor"] = 1.0
    if "attention_factor" in out:
        out["short_mscale"] = out["long_mscale"] = out.pop("attention_factor")
    return out


def vllm_config_dict(config: Any) -> dict[str, Any]:
    """config.json of the vLLM directory for a pruned config (refused in one line if not expressible)."""
    shapes = check_deployable(config, FORMAT, uniform=False, target=TARGET)
    heads = [s.num_heads for s in shapes]
    if len(set(heads)) > 1:
        raise IntraSliceError(
            f"cannot export to {FORMAT}: layers keep different numbers of query heads {heads} and vLLM's "
            f"DeciLM takes one for the model; prune with {TARGET} (every layer's attention kept whole) "
            "or --deploy stock"
        )
    if config.hidden_act != "silu":
        raise IntraSliceError(f"cannot export to {FORMAT}: vLLM's DeciLM MLP runs SiLU only, not {config.hidden_act}")
    n, width = heads[0], shapes[0].head_dim
    rope = vllm_rope_parameters(config, kept_pairs(config), width)
    blocks = [
        {
            "attention": {"no_op": False, "n_heads_in_group": n // s.num_kv_heads},
            "ffn": {"no_op": False, "intermediate_size": s.intermediate_size},
        }
        for s in shapes
    ]
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": n,
        "head_dim": width,
        "hidden_act": "silu",
        "max_position_embeddings": int(config.max_position_embeddings),
        "rms_norm_eps": float(config.rms_norm_eps),
        "rope_parameters": rope,
        "attention_bias": bool(config.o_proj_bias),
        "qkv_bias": bool(config.attention_bias),
        "mlp_bias": False,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
        "block_configs": blocks,
    }
    original = getattr(config, "original_max_position_embeddings", None)
    if original is not None and rope == dict(config.rope_parameters):
        out["original_max_position_embeddings"] = int(original)  # the source's own scaled RoPE reads it
    dtype = config_dtype(config)
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def expected_tensors(cfg: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(the tensor names vLLM's loader needs, those it skips) for a config.json we wrote."""
    need = {"model.embed_tokens.weight", "model.norm.weight"}
    skipped = set()
    (skipped if cfg["tie_word_embeddings"] else need).add("lm_head.weight")
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}"
        need |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        for name in ("q_proj", "k_proj", "v_proj"):
            need.add(f"{p}.self_attn.{name}.weight")
            if cfg["qkv_bias"]:
                need.add(f"{p}.self_attn.{name}.bias")
        need.add(f"{p}.self_attn.o_proj.weight")
        if cfg["attention_bias"]:
            need.add(f"{p}.self_attn.o_proj.bias")
        need |= {f"{p}.mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}
    return need, skipped


def check_tensor_names(src: Path, cfg: dict[str, Any]) -> None:
    """The weight files hold exactly the tensors vLLM loads for ``cfg`` (headers only are read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            names |= set(fh.keys())
    need, skipped = expected_tensors(cfg)
    missing, extra = sorted(need - names), sorted(names - need - skipped)
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise IntraSliceError(f"cannot export to {FORMAT}: the weight files of {src} do not match the config ({what})")


def export_vllm(directory: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the vLLM ``DeciLMForCausalLM`` directory ``out`` from the pruned ``directory`` (atomically)."""
    from ..saving import atomic_directory

    src = Path(directory)
    config = load_pruned_config(src)
    cfg = vllm_config_dict(config)  # refuses before anything is written
    check_tensor_names(src, cfg)

    def write(tmp: Path) -> None:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name.endswith(COPIED_SUFFIXES) and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        shutil.copyfile(CONFIG_MODULE, tmp / CONFIG_MODULE.name)
        with open(tmp / "config.json", "w", encoding="utf-8") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)
            fh.write("\n")

    return atomic_directory(out, write, overwrite)
