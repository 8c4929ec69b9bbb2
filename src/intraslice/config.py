"""The one config object of the IntraSlice algorithm."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import IntraSliceError
from .pipeline.devices import DevicePolicy

MAX_RATIO = 0.95
METHODS = ("intraslice", "slicegpt", "channel")


@dataclass
class PruneConfig:
    """Knobs of IntraSlice pruning (method.md sections 2-3; defaults from the spec).

    ``ratio`` is the fraction of decoder linear-layer parameters to remove. With
    ``layer_ratios`` unset every layer's attention and MLP get ``ratio`` (the `uniform`
    allocation); the global estimator fills ``layer_ratios`` with one
    ``(attention_ratio, mlp_ratio)`` pair per layer.
    """

    #: "intraslice" (the method), or a baseline: "slicegpt", "channel". Whatever the method,
    #: ``ratio`` is the fraction of *real* decoder linear parameters removed.
    method: str = "intraslice"
    ratio: float = 0.3
    layer_ratios: list[tuple[float, float]] | None = None
    damp: float = 0.01
    min_head_width: float = 0.75
    mlp_multiple: int = 8
    batch_size: int = 4
    #: Compute device ("cpu", "cuda", "cuda:1"): where the layer in work runs.
    device: str = "cpu"
    #: Where calibration activations wait between passes: auto, device, cpu (pinned on
    #: CUDA) or disk (``offload_dir``); see :class:`intraslice.pipeline.DevicePolicy`.
    activations: str = "auto"
    #: Where the float64 eigendecompositions and solves run: auto (the compute device on a
    #: GPU, else the CPU), cpu, or device.
    math_device: str = "auto"
    offload_dir: str | None = None
    diagnostics: bool = True
    #: Hit the target *real* decoder-parameter reduction: each layer's MLP width absorbs the
    #: difference between its planned and its actual attention size (head widths round to
    #: even numbers, KV heads survive) plus the rounding carried over from earlier layers.
    exact_budget: bool = True
    #: Channel baseline: fold the mean of removed channels into o_proj/down_proj biases (FLAP).
    bias_compensation: bool = True
    #: SliceGPT baseline: an explicit residual width instead of the one found for ``ratio``.
    slice_dim: int | None = None

    def validate(self, n_layers: int) -> None:
        if self.method not in METHODS:
            raise IntraSliceError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method == "slicegpt" and self.layer_ratios is not None:
            raise IntraSliceError("the slicegpt baseline slices every layer alike: use the uniform allocation")
        check_ratio(self.ratio, "ratio")
        if self.layer_ratios is not None:
            if len(self.layer_ratios) != n_layers:
                raise IntraSliceError(
                    f"layer_ratios has {len(self.layer_ratios)} entries but the model has {n_layers} layers"
                )
            for i, (a, m) in enumerate(self.layer_ratios):
                check_ratio(a, f"attention ratio of layer {i}")
                check_ratio(m, f"MLP ratio of layer {i}")
        if not 0 < self.min_head_width <= 1:
            raise IntraSliceError(f"min_head_width must be in (0, 1], got {self.min_head_width}")
        if self.damp < 0:
            raise IntraSliceError(f"damp must be >= 0, got {self.damp}")
        if self.batch_size < 1:
            raise IntraSliceError(f"batch_size must be >= 1, got {self.batch_size}")

    def policy(self) -> DevicePolicy:
        """The device policy of this run (every device move goes through it)."""
        return DevicePolicy(self.device, self.activations, self.math_device, self.offload_dir)

    def ratios_for(self, n_layers: int) -> list[tuple[float, float]]:
        if self.layer_ratios is not None:
            return [(float(a), float(m)) for a, m in self.layer_ratios]
        return [(float(self.ratio), float(self.ratio))] * n_layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_ratio(value: float, what: str = "ratio") -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise IntraSliceError(f"{what} must be a number in [0, {MAX_RATIO}], got {value!r}") from None
    if not 0.0 <= v <= MAX_RATIO or v != v:
        raise IntraSliceError(f"{what} must be in [0, {MAX_RATIO}], got {value}")
