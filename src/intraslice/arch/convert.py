"""Exact, in-place layout conversions used by architecture ``prepare`` hooks.

Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are split, renamed
projections (Phi-2's ``dense``, ``fc1``/``fc2``) get Llama names, and a *partial* rotary
embedding (only the first ``rotary_dim`` dims of each q/k head rotate) is turned into a full
rotate_half one in which the non-rotating dims form pairs of frequency zero: the q and k
rows of every head are permuted alike (q.k is invariant under a common permutation), and
the model's rotary module is replaced by one whose tail frequencies are zero. After this,
the pruning code sees one layout for every family, and RoPE-pair selection (method.md
2.B) covers the non-rotating dims for free: a zero-frequency pair is a pair that never
rotates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import IntraSliceError


def rotate_half_permutation(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Order of source dims so that dims j and j + head_dim/2 form a (possibly static) pair.

    Source layout: rotating pairs (j, j + rotary_dim/2) for j < rotary_dim/2, then the
    pass-through dims; these are paired consecutively (rotary_dim + 2p, rotary_dim + 2p + 1).
    """
    if rotary_dim % 2 or (head_dim - rotary_dim) % 2:
        raise IntraSliceError(f"cannot pair a head of {head_dim} dims with {rotary_dim} rotating dims")
    half_rot = rotary_dim // 2
    passes = range(rotary_dim, head_dim, 2)
    first = [*range(half_rot), *passes]
    second = [*range(half_rot, rotary_dim), *(p + 1 for p in passes)]
    return torch.tensor(first + second, dtype=torch.long)


def head_rows(weight: torch.Tensor, n_heads: int, perm: torch.Tensor | None) -> torch.Tensor:
    """Permute the output rows (or a bias) of a per-head projection within every head."""
    if perm is None:
        return weight
    h = perm.numel()
    w = weight.reshape(n_heads, h, *weight.shape[1:])
    return w[:, perm].reshape(weight.shape)


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear holding copies of ``weight``/``bias``.

    Built on the meta device first: a random initialisation of a matrix about to be
    overwritten costs seconds per layer at 70B scale. Copies, not views, so the pieces of a
    fused matrix never share storage (safetensors refuses to save shared tensors).
    """
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format))
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(memory_format=torch.contiguous_format))
    return lin


def _check_materialised(module: nn.Module, what: str) -> None:
    """A module assembled on meta must have had every tensor replaced (else it is a bug here)."""
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left on the meta device: {left}")


def intraslice_config(model: nn.Module, arch: Any) -> Any:
    """An unpruned IntraSlice config of ``model`` (the layout its converted modules follow)."""
    from ..modeling import IntraSliceConfig

    cfg = IntraSliceConfig(**arch.pruned_config_kwargs(model.config))
    cfg._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return cfg


def rotary_perm(cfg: Any) -> torch.Tensor | None:
    partial = float(cfg.rope_parameters.get("partial_rotary_factor", 1.0) or 1.0)
    rot = int(cfg.head_dim * partial)
    return None if rot == cfg.head_dim else rotate_half_permutation(cfg.head_dim, rot)


def install_split_attention(
    layer: nn.Module,
    cfg: Any,
    li: int,
    q: tuple[torch.Tensor, torch.Tensor | None],
    k: tuple[torch.Tensor, torch.Tensor | None],
    v: tuple[torch.Tensor, torch.Tensor | None],
    o: tuple[torch.Tensor, torch.Tensor | None],
    attr: str = "self_attn",
) -> None:
    """Replace ``layer.<attr>`` by an (unpruned) IntraSliceAttention with these weights."""
    from ..modeling import IntraSliceAttention

    perm = rotary_perm(cfg)
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    ref = q[0]
    with torch.device("meta"):  # its linears are replaced below; its index buffers are built on the CPU
        attn = IntraSliceAttention(cfg, li)
    attn.q_proj = _linear_from(head_rows(q[0], n_h, perm), None if q[1] is None else head_rows(q[1], n_h, perm))
    attn.k_proj = _linear_from(head_rows(k[0], n_kv, perm), None if k[1] is None else head_rows(k[1], n_kv, perm))
    attn.v_proj = _linear_from(*v)
    attn.o_proj = _linear_from(*o)
    _check_materialised(attn, f"layer {li} attention")
    setattr(layer, attr, attn.to(device=ref.device, dtype=ref.dtype))


def install_split_mlp(
    layer: nn.Module,
    cfg: Any,
    gate: tuple[torch.Tensor, torch.Tensor | None] | None,
    up: tuple[torch.Tensor, torch.Tensor | None],
    down: tuple[torch.Tensor, torch.Tensor | None],
    attr: str = "mlp",
) -> None:
    """Replace ``layer.<attr>`` by an IntraSliceMLP (gated if ``gate`` is given) with these weights."""
    from ..modeling.modeling_intraslice import IntraSliceMLP

    with torch.device("meta"):  # every linear is replaced below
        mlp = IntraSliceMLP(cfg, up[0].shape[0])
    if gate is not None:
        mlp.gate_proj = _linear_from(*gate)
    mlp.up_proj = _linear_from(*up)
    mlp.down_proj = _linear_from(*down)
    _check_materialised(mlp, "MLP")
    setattr(layer, attr, mlp.to(device=up[0].device, dtype=up[0].dtype))


def install_rotary(model: nn.Module, cfg: Any, path: str = "model.rotary_emb") -> None:
    """With a partial rotary embedding: a rotary module whose non-rotating pairs have frequency 0."""
    if rotary_perm(cfg) is None:
        return
    from ..modeling.modeling_intraslice import IntraSliceRotaryEmbedding

    owner_path, name = path.rsplit(".", 1)
    owner = model.get_submodule(owner_path)
    old = getattr(owner, name)
    device = next((b.device for b in old.buffers()), torch.device("cpu"))
    setattr(owner, name, IntraSliceRotaryEmbedding(cfg).to(device))


def weight_bias(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return lin.weight.data, (lin.bias.data if lin.bias is not None else None)


def is_converted(layer: nn.Module, attr: str = "self_attn") -> bool:
    from ..modeling import IntraSliceAttention

    return isinstance(getattr(layer, attr), IntraSliceAttention)
