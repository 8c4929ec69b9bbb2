"""SliceGPT baseline (Ashkboos et al. 2024, arXiv 2401.15024), written from the paper.

SliceGPT uses computational invariance: with the RMSNorm weights folded into the next
linears, an orthogonal rotation Q of the residual stream commutes with the (weightless)
norm, so every block can read and write the residual stream in its own basis. The basis is
the PCA of the residual signal at that point (eigenvectors of sum x x^T, float64), and the
residual stream is *sliced* to its leading ``dim`` principal components. Where two blocks'
bases differ, the residual connection needs a ``shortcut`` matrix Q_in^T Q_out, a real
parameter of the saved model: this is why SliceGPT's slicing ratio is not its parameter
reduction, and why :func:`widths_for_ratio` searches the width that removes a requested
fraction of the *real* decoder parameters.

Layers are processed in order on the outputs of the already sliced layers; every signal is
kept in the source model's basis, projected onto the kept subspace (``x B B^T``), which is
exactly what the sliced model computes (its norms divide by the source width).

Choices (documented, not the paper's defaults in every case):

* the embeddings and the LM head stay in the source basis and width: layer 0 reads the
  full-width stream and the last layer writes it (its shortcuts are d x b and b x d). This
  keeps tied embeddings tied (SmolLM2); the paper slices the embeddings too, which on a
  tied model would untie them and *add* vocab x dim parameters.
* one width for every sliced point (the paper's constant slicing), except that some
  boundaries may be one wider, to land on the requested real parameter count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..algo.linalg import eigh_desc
from ..arch import ArchSpec, get_arch
from ..errors import IntraSliceError
from ..modeling import SliceGPTConfig
from ..modeling.modeling_slicegpt import SliceGPTDecoderLayer
from ..params import layer_linear_params
from ..pipeline.hooks import gram
from ..pipeline.sequential import LayerContext, LayerReport, LayerResult

# -- pure math ----------------------------------------------------------------------------


def pca_basis(h: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``dim`` leading eigenvectors (columns, float64) of a second-moment matrix."""
    return eigh_desc(h)[1][:, :dim]


def residual_dims(d: int, n_layers: int, dim: int) -> list[int]:
    """Widths at the 2L+1 block boundaries: full at the embeddings and the head, ``dim`` inside."""
    return [d] + [dim] * (2 * n_layers - 1) + [d]


def layer_params(dims: dict[str, int], a: int, b: int, c: int, biases: dict[str, bool]) -> int:
    """Decoder-linear parameters of one sliced layer (q/k/v/o, gate/up/down, two shortcuts)."""
    qo, kv, m = dims["n_heads"] * dims["head_dim"], dims["n_kv"] * dims["head_dim"], dims["m"]
    att = (qo + 2 * kv) * a + qo * b + a * b
    att += (qo + 2 * kv) * biases["qkv"] + b * biases["o"]
    mlp = 2 * m * b + m * c + b * c + (2 * m + c) * biases["mlp"]
    return att + mlp


def sliced_decoder_params(dims: dict[str, int], widths: list[int], biases: dict[str, bool]) -> int:
    """Decoder-linear parameters for the residual widths ``widths`` (2L+1 entries)."""
    return sum(layer_params(dims, *widths[2 * i : 2 * i + 3], biases) for i in range(dims["n_layers"]))


def widths_for_ratio(dims: dict[str, int], dense_params: int, ratio: float, biases: dict[str, bool]) -> list[int]:
    """Residual widths whose *real* decoder-parameter reduction is closest to ``ratio``.

    The count is a closed-form increasing function of the widths, so this is an exact
    search, not a prune-and-measure loop. First the constant width ``w`` just below the
    target; then interior boundaries are widened to ``w + 1`` one at a time (from the last
    layer backwards) while that brings the count closer: one width step of a whole model
    is ~1/d of its parameters, too coarse to land within 0.5 points on small models.
    """
    d, n_layers = dims["d"], dims["n_layers"]
    target = dense_params * (1.0 - ratio)
    count = lambda ws: sliced_decoder_params(dims, ws, biases)  # noqa: E731
    w = max((w for w in range(1, d + 1) if count(residual_dims(d, n_layers, w)) <= target), default=1)
    widths = residual_dims(d, n_layers, w)
    if w == d:
        return widths
    for point in range(2 * n_layers - 1, 0, -1):
        wider = [*widths[:point], w + 1, *widths[point + 1 :]]
        if abs(count(wider) - target) >= abs(count(widths) - target):
            break
        widths = wider
    return widths


def fold_layer(
    w: dict[str, torch.Tensor | None],
    gamma_in: torch.Tensor,
    gamma_post: torch.Tensor,
    b_a: torch.Tensor | None,
    b_b: torch.Tensor,
    b_c: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """Rotate and slice one layer's weights (float64). ``None`` bases mean the source basis.

    Inputs read the stream in basis B_a (norm weight folded in), the attention writes in
    B_b, the MLP reads B_b and writes B_c; shortcuts map B_a -> B_b and B_b -> B_c.
    """

    def reads(weight: torch.Tensor, gamma: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
        folded = weight.to(torch.float64) * gamma.to(torch.float64)
        return folded if basis is None else folded @ basis

    def writes(weight: torch.Tensor | None, basis: torch.Tensor | None) -> torch.Tensor | None:
        if weight is None or basis is None:
            return None if weight is None else weight.to(torch.float64)
        return basis.T @ weight.to(torch.float64)

    def shortcut(src: torch.Tensor | None, dst: torch.Tensor | None) -> torch.Tensor:
        if src is None and dst is None:
            raise ValueError("a shortcut between two source bases is the identity")
        if src is None:
            return dst.T  # (b, d): x_full -> x_b
        if dst is None:
            return src  # (d, a): x_a -> x_full
        return dst.T @ src  # (b, a): weight of Linear(a, b)

    out: dict[str, torch.Tensor | None] = {
        "q": reads(w["q"], gamma_in, b_a),
        "k": reads(w["k"], gamma_in, b_a),
        "v": reads(w["v"], gamma_in, b_a),
        "q_bias": w.get("q_bias"),
        "k_bias": w.get("k_bias"),
        "v_bias": w.get("v_bias"),
        "o": writes(w["o"], b_b),
        "o_bias": writes(w.get("o_bias"), b_b),
        "attn_shortcut": shortcut(b_a, b_b),
        "gate": reads(w["gate"], gamma_post, b_b),
        "up": reads(w["up"], gamma_post, b_b),
        "gate_bias": w.get("gate_bias"),
        "up_bias": w.get("up_bias"),
        "down": writes(w["down"], b_c),
        "down_bias": writes(w.get("down_bias"), b_c),
        "mlp_shortcut": shortcut(b_b, b_c),
    }
    return out


# -- plumbing -----------------------------------------------------------------------------


def _project(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """x B B^T: the signal the sliced model carries, expressed in the source basis."""
    if basis is None:
        return x
    return ((x.to(torch.float64) @ basis) @ basis.T).to(x.dtype)


def _source_weights(ctx: LayerContext) -> dict[str, torch.Tensor | None]:
    q, k, v, o = ctx.arch.qkvo(ctx.layer)
    gate, up, down = ctx.arch.gate_up_down(ctx.layer)
    w: dict[str, torch.Tensor | None] = {}
    for name, lin in (("q", q), ("k", k), ("v", v), ("o", o), ("gate", gate), ("up", up), ("down", down)):
        w[name] = ctx.math(lin.weight)
        w[f"{name}_bias"] = ctx.math(lin.bias)
    return w


def _sliced_layer(
    config: SliceGPTConfig, li: int, folded: dict[str, torch.Tensor | None], dtype: torch.dtype, device: torch.device
) -> SliceGPTDecoderLayer:
    layer = SliceGPTDecoderLayer(config, li).to(device=device, dtype=dtype)
    attn, mlp = layer.self_attn, layer.mlp
    targets = {
        "q": attn.q_proj,
        "k": attn.k_proj,
        "v": attn.v_proj,
        "o": attn.o_proj,
        "gate": mlp.gate_proj,
        "up": mlp.up_proj,
        "down": mlp.down_proj,
        "attn_shortcut": layer.attn_shortcut,
        "mlp_shortcut": layer.mlp_shortcut,
    }
    for name, lin in targets.items():
        lin.weight.data.copy_(folded[name].to(device=device, dtype=dtype))
        bias = folded.get(f"{name}_bias")
        if lin.bias is not None:
            lin.bias.data.copy_(bias.to(device=device, dtype=dtype))
    return layer


class SliceGPTMethod:
    """Rotate and slice each layer; the residual basis of one layer's output is the next's input.

    Statistics (Grams of the residual signal) accumulate on the compute device; the PCA
    bases are computed on the math device and brought to the compute device once per layer
    for the projections.
    """

    name = "slicegpt"

    def __init__(self, config: SliceGPTConfig) -> None:
        self.config = config
        self.basis_in: torch.Tensor | None = None  # on the math device

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What the next layer reads (JSON, tensors): the residual basis of this layer's output."""
        tensors = {} if self.basis_in is None else {"basis_in": self.basis_in.detach().to("cpu").contiguous()}
        return {}, tensors

    def restore_state(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor], cfg: Any, arch: Any, n_layers: int
    ) -> None:
        """Continue after an interrupted run's last finished layer (see ``intraslice.resume``)."""
        basis = tensors.get("basis_in")
        self.basis_in = None if basis is None else cfg.policy().to_math(basis, float64=False)

    @torch.no_grad()
    def compress(self, ctx: LayerContext) -> LayerResult:
        li, layer, arch = ctx.index, ctx.layer, ctx.arch
        n_layers = ctx.dims["n_layers"]
        rd = self.config.residual_dims
        dense_att, dense_mlp = layer_linear_params(arch, layer)

        with ctx.timed("attention_stats"):
            mids = ctx.store("mids")
            h_mid: torch.Tensor | None = None
            for batch, kw in ctx.batches():
                mid = ctx.input_of(arch.mlp_input_module(layer), batch, kw)
                h_mid = gram(mid) if h_mid is None else h_mid + gram(mid)
                mids.append(mid)
            ctx.reduce(h_mid)
            ctx.check_finite(h_mid, "the residual signal after attention")
            basis_mid = pca_basis(ctx.math(h_mid), rd[2 * li + 1])
            mid_dev = ctx.policy.to_compute(basis_mid)

        with ctx.timed("mlp_stats"):
            outs = ctx.store("outputs")
            h_out: torch.Tensor | None = None
            for mid in mids:
                out = arch.mlp_block(layer, _project(mid, mid_dev))
                h_out = gram(out) if h_out is None else h_out + gram(out)
                outs.append(out)
            mids.clear()
            ctx.reduce(h_out)
            ctx.check_finite(h_out, "the outputs")
            basis_out = None if li == n_layers - 1 else pca_basis(ctx.math(h_out), rd[2 * li + 2])
            out_dev = None if basis_out is None else ctx.policy.to_compute(basis_out)
            nxt = ctx.store("outputs")
            for o in outs:
                nxt.append(_project(o, out_dev))
            outs.clear()

        with ctx.timed("fold"):
            gamma_in = ctx.math(ArchSpec._get(layer, arch.input_norm).weight)
            gamma_post = ctx.math(ArchSpec._get(layer, arch.post_attn_norm).weight)
            folded = fold_layer(_source_weights(ctx), gamma_in, gamma_post, self.basis_in, basis_mid, basis_out)
            new_layer = _sliced_layer(self.config, li, folded, ctx.dtype, ctx.device)
            self.basis_in = basis_out
        att, mlp = layer_linear_params(get_arch("slicegpt"), new_layer)
        spec = self.config.layers[li]
        report = LayerReport(
            li,
            1.0 - att / dense_att,
            1.0 - mlp / dense_mlp,
            int(spec["num_heads"]),
            int(spec["num_kv_heads"]),
            int(spec["head_dim"]),
            int(spec["intermediate_size"]),
        )
        return LayerResult(new_layer, report, nxt)


def slicegpt_config(model: nn.Module, ratio: float, dim: int | None = None) -> tuple[SliceGPTConfig, dict[str, Any]]:
    """The sliced model's config for a real decoder-parameter ``ratio`` (or an explicit width)."""
    arch = get_arch(model.config)
    if arch.parallel_block or arch.norm_type != "rms" or not arch.mlp_gated:
        raise IntraSliceError(
            f"the slicegpt baseline handles sequential RMSNorm blocks with a gated MLP; {arch.name} has "
            "parallel blocks / LayerNorm (SliceGPT would first fold LayerNorm's centring into the linears)"
        )
    dims = arch.dims(model.config)
    biases = {
        "qkv": arch.qkv_bias(model.config),
        "o": arch.o_bias(model.config),
        "mlp": arch.mlp_bias(model.config),
    }
    d, n_layers = dims["d"], dims["n_layers"]
    dense = sliced_decoder_params(dims, [d] * (2 * n_layers + 1), biases) - n_layers * 2 * d**2
    if dim is None:
        widths = widths_for_ratio(dims, dense, ratio, biases)
    elif 1 <= dim <= d:
        widths = residual_dims(d, n_layers, dim)
    else:
        raise IntraSliceError(f"SliceGPT width must be in [1, {d}], got {dim}")
    config = SliceGPTConfig(residual_dims=widths, **arch.pruned_config_kwargs(model.config))
    inner = widths[1:-1]
    info = {
        "slice_dim": min(inner),
        "slice_dim_max": max(inner),
        "slicing": 1.0 - sum(inner) / (len(inner) * d),
        "predicted_decoder_params": sliced_decoder_params(dims, widths, biases),
    }
    return config, info
