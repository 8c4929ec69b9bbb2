"""Configuration of a model compressed by the SliceGPT baseline (Ashkboos et al. 2024).

Self-contained apart from ``configuration_intraslice`` (copied along with it next to every
saved model, so ``trust_remote_code=True`` works without the ``intraslice`` package).

SliceGPT rotates the residual stream by a PCA basis at every block boundary and slices
it, so the residual stream has its own width at every point. ``residual_dims`` lists them:
``residual_dims[2 l]`` is the width entering layer ``l``, ``residual_dims[2 l + 1]`` the
width after its attention block, ``residual_dims[2 l + 2]`` after its MLP block. The
embeddings and the LM head stay in the source model's basis and width (``residual_dims[0]
== residual_dims[-1] == hidden_size``), which keeps tied embeddings tied. Attention heads
and MLP widths are the source model's (``layers`` as in an unpruned IntraSlice config).
"""

from __future__ import annotations

from typing import Any

from .configuration_intraslice import IntraSliceConfig


class SliceGPTConfig(IntraSliceConfig):
    """Config of a SliceGPT-sliced Llama-family model."""

    model_type = "slicegpt"

    def __init__(self, residual_dims: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if residual_dims is None:
            residual_dims = [self.hidden_size] * (2 * self.num_hidden_layers + 1)
        if len(residual_dims) != 2 * self.num_hidden_layers + 1:
            raise ValueError(
                f"residual_dims has {len(residual_dims)} entries, expected 2 * num_hidden_layers + 1 "
                f"= {2 * self.num_hidden_layers + 1}"
            )
        self.residual_dims = [int(x) for x in residual_dims]
