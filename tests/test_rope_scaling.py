"""RoPE scaling: the pruned model reproduces transformers' RoPE for every ``rope_type`` the
supported architectures can carry, beyond ``original_max_position_embeddings`` too.

Static types (linear, llama3, yarn, proportional) are a scaled frequency vector and an attention
factor; ``longrope`` switches from its short to its long factors past
``original_max_position_embeddings``; ``dynamic`` (NTK) recomputes its base past
``max_position_embeddings`` and keeps a state across calls. Each case is a tiny float64
model whose thresholds (32 positions) are shorter than the sequences fed to it (up to 80).

The reference is the source model itself, run by ``transformers``: at ratio 0 the pruned
model's logits equal it to 1e-10 over a sequence of calls (the stateful types see the same
history); at ratio > 0 the (cos, sin) tables every pruned attention receives equal the
source model's rotary tables, and the rotation each kept head applies equals one computed by
hand from those tables and the head's kept pairs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import rotate_half

from intraslice import IntraSliceForCausalLM, PruneConfig, prune, save_pruned
from intraslice.arch import get_arch
from intraslice.errors import IntraSliceError

from .conftest import ARCHS, COMMON, assert_loads_without_package, calib_tokens

torch.set_num_threads(2)

SHORT = 32  # original_max_position_embeddings (longrope, yarn, llama3); max_position_embeddings of dynamic
LONG = 128  # max_position_embeddings of the long-context types


def _factors(n: int, scale: float) -> list[float]:
    return [1.0 + scale * j for j in range(n)]


def rope_case(arch: str, rope_type: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rope_parameters, extra config kwargs) of ``rope_type`` for the tiny ``arch``."""
    _, _, extra = ARCHS[arch]
    head_dim = extra.get("head_dim") or extra["hidden_size"] // extra["num_attention_heads"]
    partial = float((extra.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    rope: dict[str, Any] = {"rope_type": rope_type, "rope_theta": 10000.0}
    if partial != 1.0:
        rope["partial_rotary_factor"] = partial
    kw: dict[str, Any] = {"max_position_embeddings": LONG}
    if rope_type == "linear":
        rope["factor"] = 2.5
    elif rope_type == "dynamic":
        rope["factor"] = 3.0
        kw["max_position_embeddings"] = SHORT
    elif rope_type == "yarn":
        rope.update(factor=4.0, original_max_position_embeddings=SHORT)
    elif rope_type == "llama3":
        # wavelengths 2*pi/inv_freq of a 16-dim head span the low/medium/high bands of this context
        rope.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=SHORT)
    elif rope_type == "longrope":
        half = int(head_dim * partial) // 2
        rope.update(short_factor=_factors(half, 0.05), long_factor=_factors(half, 0.7))
        rope["original_max_position_embeddings"] = SHORT
        if arch.startswith("phi3"):
            kw["original_max_position_embeddings"] = SHORT  # Phi-3 keeps it outside rope_parameters too
    elif rope_type == "proportional":
        rope["partial_rotary_factor"] = 0.5
    return rope, kw


# Every rope_type transformers 5 lets each family carry (Phi-3 validates default and longrope only).
CASES = [
    *[("llama-gqa", t) for t in ("linear", "dynamic", "yarn", "llama3", "longrope", "proportional")],
    *[("mistral", t) for t in ("dynamic", "yarn")],
    *[("qwen2", t) for t in ("yarn", "dynamic", "linear")],
    ("phi3", "longrope"),
    ("phi3-gqa-partial", "longrope"),  # Phi-4-mini: longrope with a partial rotary embedding
    # Phi-2 with proportional RoPE fails in transformers itself (its tables span the whole head).
    *[("phi", t) for t in ("linear", "dynamic", "yarn", "llama3", "longrope")],
]
IDS = [f"{a}-{t}" for a, t in CASES]


def make_model(arch: str, rope_type: str, seed: int = 0) -> torch.nn.Module:
    cfg_cls, model_cls, extra = ARCHS[arch]
    rope, kw = rope_case(arch, rope_type)
    cfg = cfg_cls(**{**COMMON, **extra, **kw, "rope_parameters": rope})
    assert cfg.rope_parameters["rope_type"] == rope_type
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def ids_of(t: int, seed: int = 11) -> torch.Tensor:
    return calib_tokens(1, t, seed=seed)


# A history of calls: short, past the threshold, between, and short again (the stateful
# types switch, grow, keep, reset).
LENGTHS = (20, 80, 48, 20, 64)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def scaled_differently(model: torch.nn.Module, t: int) -> bool:
    """Whether the source's RoPE at length ``t`` differs from its RoPE at length 16 (the case is not vacuous)."""
    rot = copy.deepcopy(model.model.rotary_emb)
    x = torch.zeros(1, dtype=torch.float64)
    pos = torch.arange(16)[None]
    short = rot(x, pos)[0]
    rot(x, torch.arange(t)[None])
    again = rot(x, pos)[0]
    long = rot(x, torch.arange(t)[None])[0][:, :16]
    return not torch.equal(short, long) or not torch.equal(short, again)


@pytest.mark.parametrize(("arch", "rope_type"), CASES, ids=IDS)
def test_ratio_zero_reproduces_the_source_past_the_original_length(arch: str, rope_type: str, tmp_path: Path) -> None:
    source = make_model(arch, rope_type)
    work = copy.deepcopy(source)
    result = prune(work, calib_tokens(4, 16), PruneConfig(ratio=0.0), progress=False)
    pruned = result.model
    assert pruned.config.rope_parameters["rope_type"] == rope_type
    refs = []
    for t in LENGTHS:
        ids = ids_of(t)
        ref = logits(source, ids)
        refs.append(ref)
        torch.testing.assert_close(logits(pruned, ids), ref, atol=1e-10, rtol=0, msg=f"length {t}")
    if rope_type in ("longrope", "dynamic", "yarn"):
        assert scaled_differently(make_model(arch, rope_type), 80) == (rope_type != "yarn")

    # The saved config carries what from_pretrained needs (a fresh model: a fresh RoPE state).
    out = save_pruned(pruned, None, tmp_path / "m")
    saved = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == rope_type
    loaded = AutoModelForCausalLM.from_pretrained(out)
    fresh = make_model(arch, rope_type)
    for t in LENGTHS:
        ids = ids_of(t)
        torch.testing.assert_close(logits(loaded, ids), logits(fresh, ids), atol=1e-10, rtol=0, msg=f"length {t}")


def source_tables(source: torch.nn.Module, pos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The source model's (cos, sin) over all head_dim/2 frequencies, in the pruned layout.

    A partial rotary embedding (Phi) rotates the first ``rot`` dims; the pruned layout pairs
    the pass-through dims as frequency-0 pairs that neither rotate nor scale.
    """
    x = torch.zeros(1, dtype=torch.float64)
    cos, sin = source.model.rotary_emb(x, pos)
    half = cos.shape[-1] // 2
    pad = head_dim // 2 - half
    cos, sin = cos[..., :half], sin[..., :half]
    if pad:
        cos = torch.cat([cos, cos.new_ones(*cos.shape[:-1], pad)], dim=-1)
        sin = torch.cat([sin, sin.new_zeros(*sin.shape[:-1], pad)], dim=-1)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def captured_tables(pruned: IntraSliceForCausalLM, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (cos, sin) every attention layer of ``pruned`` receives in a forward of ``ids``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["position_embeddings"])

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in pruned.model.layers]
    try:
        logits(pruned, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def rotation_by_hand(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: list[list[int]], kv_of: list[int]
) -> torch.Tensor:
    """RoPE of (B, heads, T, r) ``x``: head i rotates with KV head kv_of[i]'s kept source frequencies."""
    half = cos.shape[-1] // 2
    out = torch.empty_like(x)
    for i, kv in enumerate(kv_of):
        idx = torch.tensor(pairs[kv])
        c = cos[..., :half][..., idx]
        s = sin[..., :half][..., idx]
        c, s = torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)
        out[:, i] = x[:, i] * c + rotate_half(x[:, i]) * s
    return out


@pytest.mark.parametrize(
    ("arch", "rope_type"),
    [c for c in CASES if c[0] in ("llama-gqa", "phi3-gqa-partial", "phi")],
    ids=[i for c, i in zip(CASES, IDS, strict=True) if c[0] in ("llama-gqa", "phi3-gqa-partial", "phi")],
)
def test_pruned_heads_rotate_with_the_source_frequencies(arch: str, rope_type: str) -> None:
    source = make_model(arch, rope_type)
    work = copy.deepcopy(source)
    cfg = PruneConfig(ratio=0.5, min_head_width=0.5, allocation="uniform")
    pruned = prune(work, calib_tokens(4, 16), cfg, progress=False).model
    head_dim = pruned.config.head_dim
    specs = pruned.config.layers
    # The selection is not trivial: some KV head dropped pairs, and KV heads differ in what they kept.
    assert any(len(p) < head_dim // 2 for s in specs for p in s["rope_pairs"])
    if arch != "phi":  # phi's 4 MHA heads: one pair set per head anyway
        assert any(len({tuple(p) for p in s["rope_pairs"]}) > 1 for s in specs)

    g = torch.Generator().manual_seed(3)
    for t in LENGTHS:
        pos = torch.arange(t)[None]
        want_cos, want_sin = source_tables(source, pos, head_dim)
        for li, (cos, sin) in enumerate(captured_tables(pruned, ids_of(t))):
            torch.testing.assert_close(cos, want_cos, atol=0, rtol=0, msg=f"length {t}, layer {li}")
            torch.testing.assert_close(sin, want_sin, atol=0, rtol=0, msg=f"length {t}, layer {li}")
            attn, spec = pruned.model.layers[li].self_attn, specs[li]
            q = torch.randn(1, attn.num_heads, t, attn.head_dim, generator=g, dtype=torch.float64)
            k = torch.randn(1, attn.num_kv_heads, t, attn.head_dim, generator=g, dtype=torch.float64)
            q_rot, k_rot = attn._apply_rope(q, k, cos, sin)
            kv_of = [int(i) for i in spec["kv_index"]]
            want_q = rotation_by_hand(q, want_cos, want_sin, spec["rope_pairs"], kv_of)
            want_k = rotation_by_hand(k, want_cos, want_sin, spec["rope_pairs"], list(range(attn.num_kv_heads)))
            torch.testing.assert_close(q_rot, want_q, atol=1e-12, rtol=0)
            torch.testing.assert_close(k_rot, want_k, atol=1e-12, rtol=0)


def test_longrope_survives_trust_remote_code(tmp_path: Path) -> None:
    """The copied modeling file alone (no intraslice) reproduces the long-context switch."""
    model = make_model("phi3-gqa-partial", "longrope")
    result = prune(model, calib_tokens(4, 16), PruneConfig(ratio=0.3, allocation="uniform"), progress=False)
    ids = ids_of(80)
    ref = logits(result.model, ids)
    out = save_pruned(result.model, None, tmp_path / "m")
    assert assert_loads_without_package(out, ids, ref, tmp_path) == "IntraSliceForCausalLM"


def test_unknown_rope_types_are_refused_up_front() -> None:
    model = make_model("llama-gqa", "linear")
    model.config.rope_parameters = {"rope_type": "mrope", "rope_theta": 10000.0}
    with pytest.raises(IntraSliceError, match="rope_type 'mrope' is not supported") as info:
        prune(model, calib_tokens(4, 16), PruneConfig(ratio=0.3, allocation="uniform"), progress=False)
    assert "\n" not in str(info.value)
    # The model was not touched: the refusal comes before any conversion.
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    with pytest.raises(IntraSliceError, match="per-layer-type"):
        get_arch(type("C", (), {"model_type": "llama", "rope_parameters": {"full_attention": {"rope_type": "x"}}}))


def test_cli_refuses_an_unknown_rope_type_with_exit_2(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from intraslice.cli import main

    cfg_path = tiny_model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = {"rope_type": "su", "rope_theta": 10000.0}
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code = main(["prune", "--model", str(tiny_model_dir), "--ratio", "0.3", "--out", str(out), "--no-progress"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("intraslice: error:")]
    assert code == 2
    assert len(err) == 1 and "rope_type 'su' is not supported" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic", "yarn"])
def test_slicegpt_baseline_at_zero_slicing_reproduces_the_source(rope_type: str) -> None:
    """The SliceGPT model class shares the rotary module: the same RoPE past the original length."""
    source = make_model("llama-gqa", rope_type)
    cfg = PruneConfig(method="slicegpt", ratio=0.0, slice_dim=source.config.hidden_size)
    sliced = prune(copy.deepcopy(source), calib_tokens(4, 16), cfg, progress=False).model
    assert type(sliced).__name__ == "SliceGPTForCausalLM"
    for t in LENGTHS:
        ids = ids_of(t)
        torch.testing.assert_close(logits(sliced, ids), logits(source, ids), atol=1e-10, rtol=0, msg=f"length {t}")
