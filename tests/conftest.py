"""Shared fixtures: tiny float64 models built in-process from a config, and a tiny tokenizer."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2

import intraslice  # noqa: F401  (registers the auto classes)

VOCAB = 320

# Tests never use the network. With `datasets` installed (lm-eval, in the dev extra, pulls
# it in) the WikiText-2 loaders would otherwise retry the hub for ~30 s per call offline.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rmsnorm_keep_float64(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """HF RMSNorms compute in float32 even for float64 inputs; for exactness references we
    need them in float64, as the pruned model's norm does for float64 inputs."""
    if hidden_states.dtype != torch.float64:
        return self._orig_forward(hidden_states)
    var = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(var + self.variance_epsilon))


@pytest.fixture(autouse=True, scope="session")
def float64_reference_norms() -> None:
    norms = (modeling_llama.LlamaRMSNorm, modeling_mistral.MistralRMSNorm, modeling_qwen2.Qwen2RMSNorm)
    for mod in (*norms, modeling_phi3.Phi3RMSNorm):
        if not hasattr(mod, "_orig_forward"):
            mod._orig_forward = mod.forward
            mod.forward = _rmsnorm_keep_float64


COMMON = dict(
    vocab_size=VOCAB, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6
)

ARCHS = {
    "llama-mha": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    ),
    "llama-gqa": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None),
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    ),
    "phi3": (
        Phi3Config,
        Phi3ForCausalLM,
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, pad_token_id=0),
    ),
    "phi3-gqa-partial": (
        Phi3Config,
        Phi3ForCausalLM,
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        ),
    ),
    "phi": (
        PhiConfig,
        PhiForCausalLM,
        dict(
            hidden_size=80,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
        ),
    ),
}


def make_tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float64, n_layers: int = 2) -> torch.nn.Module:
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = cfg_cls(**{**COMMON, "num_hidden_layers": n_layers}, **extra)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    with torch.no_grad():
        # Non-trivial norms and biases so that every fused transform is exercised.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def calib_tokens(n: int = 8, t: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


@pytest.fixture(params=list(ARCHS))
def arch_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_copy():
    def _make(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        m = make_tiny(arch)
        return m, copy.deepcopy(m)

    return _make


def build_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers import decoders as dec

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = dec.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["the quick brown fox jumps over the lazy dog " * 4, "pruning makes models smaller and faster"]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A saved tiny float32 Llama with its tokenizer, for CLI tests."""
    d = tmp_path / "tiny-llama"
    model = make_tiny("llama-gqa", dtype=torch.float32)
    tok = build_tokenizer(d)
    model.config.vocab_size = VOCAB
    assert len(tok) <= VOCAB
    model.save_pretrained(d)
    return d


def assert_loads_without_package(out: Path, ids: torch.Tensor, ref: torch.Tensor, tmp_path: Path) -> str:
    """Load ``out`` with ``trust_remote_code=True`` in a subprocess where ``intraslice`` cannot
    be imported, and check it reproduces ``ref`` to float64 rounding; returns the loaded class name."""
    import os
    import subprocess
    import sys

    torch.save(ids, tmp_path / "ids.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code = (
        "import sys, torch\n"
        "sys.modules['intraslice'] = None  # make the package unimportable\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        # Another process may pick other BLAS kernels under load: equal to rounding, not bitwise.
        "assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9), (out - ref).abs().max()\n"
        "print('OK', type(m).__name__)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout.split()[-1]


def dense_rotated_qk(dense: torch.nn.Module, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per dense layer, (q, k) after RoPE, each (b, t, n_heads, h) (k repeated over its group).

    Independent of the pruning code: hooks on the Hugging Face q/k projections, the model's
    own rotary tables, an explicit rotate_half.
    """
    from intraslice.modeling.modeling_intraslice import rotate_half

    c = dense.config
    n_h, n_kv, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    out: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for li, layer in enumerate(dense.model.layers):
        for name in ("q_proj", "k_proj"):

            def hook(_m, _i, y, li=li, name=name):
                out.setdefault(li, {})[name] = y

            handles.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            dense(input_ids=tokens, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    b, t = tokens.shape
    cos, sin = dense.model.rotary_emb(torch.zeros(1, dtype=torch.float64), torch.arange(t)[None])
    cos, sin = cos[:, :, None], sin[:, :, None]
    result = []
    for li in range(len(dense.model.layers)):
        q = out[li]["q_proj"].view(b, t, n_h, h)
        k = out[li]["k_proj"].view(b, t, n_kv, h).repeat_interleave(n_h // n_kv, dim=2)
        result.append((q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin))
    return result


# -- a 4-layer tiny Llama and a calibration text, shared by the module (resume, engine tests) --
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resume") / "tiny4"
    model = make_tiny("llama-gqa", dtype=torch.float32, n_layers=4)
    build_tokenizer(d)
    model.config.vocab_size = VOCAB
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    from .test_errors_and_cli import TEXT

    p.write_text(TEXT, encoding="utf-8")
    return p
