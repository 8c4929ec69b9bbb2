"""The memory a heal needs, from shapes alone (the student, its optimizer, LoRA, activations, the cache).

Counted in bytes, w = the training dtype's bytes (float32 here; bfloat16 halves the
weights and activations on a GPU), T = ``--seqlen``, L layers, d hidden, m the MLP width,
V the vocabulary, r the LoRA rank:

* student weights: every parameter, w each;
* trainable tensors: LoRA (r (in + out) per linear projection) or, in full fine-tuning,
  the decoder layers; each has a gradient (w) and AdamW's two moments (2 x 4 bytes)
* activations under per-layer checkpointing: every layer's input (L T d w), one layer's
  recomputed inside with its gradient (2 T (4d + q + kv + 3m) w), and one chunk of 128
  positions of logits with their softmax and gradient (3 x 128 V x 4); in bfloat16 the
  trainable tensors also keep a float32 master copy (4 bytes);
* the teacher pass (before training; the student is not loaded yet): one teacher layer,
  one shard's hidden states (64 T d w) and one chunk of logits;
* the teacher cache on disk: windows x T x (8k + 4) bytes (top-k), or T x V x 4 (full).
"""

from __future__ import annotations

from typing import Any

from .config import HealConfig
from .teacher import cache_bytes

GiB = 2**30
SHARD_WINDOWS = 64


def heal_memory(
    shape: dict[str, Any], cfg: HealConfig, w: int = 4, decoder_params: int | None = None
) -> dict[str, int]:
    """Peak bytes of the training step and of the teacher pass, and the cache's size on disk.

    ``shape``: :func:`intraslice.plan.model_shape` of the source (the pruned student is
    smaller; ``decoder_params`` gives its real decoder size when known).
    """
    L, d, m, V, T = shape["n_layers"], shape["d"], shape["m"], shape["vocab"], cfg.seqlen
    q = shape["n_heads"] * shape["head_dim"]
    kv = shape["n_kv"] * shape["head_dim"]
    dec = decoder_params if decoder_params is not None else L * shape["layer_params"]
    params = shape["params"] - L * shape["layer_params"] + dec
    if cfg.method == "lora":
        per_layer = cfg.lora_rank * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + m) + (m + d))
        trainable = L * per_layer
        lora = trainable * w
    else:
        trainable, lora = dec, 0
    weights = params * w
    optimizer = trainable * (w + 8 + (4 if w < 4 else 0))  # gradient, AdamW moments, float32 master copy
    acts = L * T * d * w + 2 * T * (4 * d + q + kv + 3 * m) * w + 3 * 128 * V * 4
    teacher = shape["layer_bytes"] + SHARD_WINDOWS * T * d * shape["dtype_bytes"] + 256 * V * 4 * 3
    windows = cfg.steps() * cfg.batch
    return {
        "train": weights + lora + optimizer + acts,
        "weights": weights,
        "trainable_params": trainable,
        "optimizer": optimizer,
        "activations": acts,
        "teacher_pass": teacher,
        "teacher_cache_disk": cache_bytes(windows, T, cfg.topk, V),
    }


def describe(mem: dict[str, int]) -> str:
    g = {k: v / GiB for k, v in mem.items()}
    return (
        f"heal plan: training {g['train']:.2f} GiB (weights {g['weights']:.2f}, {mem['trainable_params'] / 1e6:.1f}M "
        f"trainable with gradients and AdamW {g['optimizer']:.2f}, activations {g['activations']:.2f}); "
        f"teacher pass {g['teacher_pass']:.2f} GiB; teacher cache {g['teacher_cache_disk']:.2f} GiB on disk"
    )
