"""The one config object of the IntraSlice algorithm."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .algo.attention import ROPE_SCORES, ROPE_SELECTIONS
from .errors import IntraSliceError
from .methods.registry import _INTRASLICE_REPEAT, get_method, method_names
from .pipeline.devices import DevicePolicy

#: Step D's pair score unless told otherwise: measured better than the spec's mean |q k| on both
#: built-in models (docs/method.md section 8, BENCHMARKS.md "What perplexity hides").
DEFAULT_ROPE_SCORE = "attention"

#: Calibration windows the mask gradients use by default (the first ones; the layer steps
#: use all). Measured (BENCHMARKS.md "How many windows the estimator needs"): on SmolLM2
#: (windows of 2048) and Qwen2.5-Coder-0.5B (windows of 512) the models pruned with an
#: 8-window allocation are as good as with 32 windows, within the spread between
#: allocations of the same size, while the estimator costs a quarter. 0 or None: every window.
DEFAULT_GRAD_SAMPLES = 8
#: Attention units per head in the global estimator (f): the spec's 1 (a unit is a head).
#: f = h prunes to lower perplexity but copies worse (BENCHMARKS.md, issue #12 item 6).
DEFAULT_UNITS_PER_HEAD = 1
#: How the estimator splits the ratio between attention and MLP when neither --mlp-bias nor
#: --attention-share is given: a share of the ratio for attention, or "auto" (docs/method.md
#: section 4; the decision and its measurements are in BENCHMARKS.md, issue #14). 0: the MLP
#: takes the whole ratio while it can under the per-layer cap (``feasible_share`` raises it
#: when it cannot), because attention pruning is what costs in-context copying.
DEFAULT_ATTENTION_SHARE: float | str = 0.0
#: IntraSlice's layer steps calibrate on each window followed by a repeat of an earlier span
#: of it, this share of the window long (``--calib-repeat``, ``--calib-repeat-mode append``):
#: the heads that copy work on the calibration text, and every text token is kept
#: (docs/method.md section 8). The baselines keep their plain windows, as published.
DEFAULT_CALIB_REPEAT = _INTRASLICE_REPEAT
DEFAULT_CALIB_REPEAT_MODE = "append"
#: Where a repeated span goes: over the window's tail, or after the window (``data.with_repeated_spans``).
REPEAT_MODES = ("replace", "append")

MAX_RATIO = 0.95


def opt(
    default: Any = None,
    flag: str | None = None,
    help: str = "",
    *,
    type: Any = None,
    choices: Any = None,
    action: str | None = None,
    hidden: bool = False,
) -> Any:
    """A config field and its command-line option, declared once.

    The CLI is generated from these (``intraslice.engine.config.add_arguments``), so a field
    and its flag cannot drift apart. ``action="store_false"`` is a ``--no-X`` flag for a field
    that defaults to True. ``hidden``: an ablation the benchmarks rejected, left out of
    ``--help`` (``--help-all`` lists it) but still set from the CLI or a config file.
    ``choices`` may be a callable (the registered methods, read when the parser is built).
    """
    meta = {"flag": flag, "help": help, "type": type, "choices": choices, "action": action, "hidden": hidden}
    return field(default=default, metadata=meta)


def share_arg(text: str | float) -> float | str:
    """``--attention-share``: a number, or ``auto`` (the split the estimator's ranking chooses)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number or auto, got {text!r}") from None


DEPLOY_TARGETS = ("llamacpp", "stock", "vllm")
#: Why ``--deploy vllm`` keeps the attention whole, and what prunes it instead.
VLLM_ATTENTION = (
    "vLLM's DeciLM has one query-head count for the model (use --attention-share 0, or add --uniform-layers "
    "to prune the attention alike in every layer)"
)


#: Per-layer allocations: every layer alike, or from mask gradients (plain or PCA-rotated; method.md 3).
ALLOCATIONS = ("uniform", "global", "global_pca")
#: The allocation of IntraSlice, the one default of the Python API and the CLI.
DEFAULT_ALLOCATION = "global_pca"


def default_allocation(method: str) -> str:
    """The allocation a method runs unless told otherwise.

    IntraSlice: :data:`DEFAULT_ALLOCATION`. The baselines: uniform, as published (SliceGPT
    slices every layer alike; the channel baseline is FLAP/Wanda-sp's per-layer pruning).
    Each method's registration says (:class:`intraslice.methods.registry.MethodSpec`).
    """
    return get_method(method).default_allocation


@dataclass
class PruneConfig:
    """Knobs of IntraSlice pruning (method.md sections 2-3; defaults from the spec).

    ``ratio`` is the fraction of decoder linear-layer parameters to remove. ``layer_ratios``
    gives one ``(attention_ratio, mlp_ratio)`` pair per layer. Unset, ``allocation`` says
    how :func:`intraslice.prune` finds them: ``global_pca`` (the default for IntraSlice,
    :data:`DEFAULT_ALLOCATION`, as in the CLI) or ``global`` run the mask-gradient
    estimator on the calibration windows first; ``uniform`` gives every layer ``ratio``.
    The streamed :func:`intraslice.stages.prune` takes its ``layer_ratios`` from
    :func:`intraslice.stages.allocate` and treats unset ones as uniform.
    """

    #: "intraslice" (the method), or a baseline: "slicegpt", "channel". Whatever the method,
    #: ``ratio`` is the fraction of *real* decoder linear parameters removed.
    method: str = opt("intraslice", "--method", "the method, or a baseline to compare with", choices=method_names)
    ratio: float = 0.3
    layer_ratios: list[tuple[float, float]] | None = None
    #: What one K/V cache value per token weighs against one parameter in each layer's budget
    #: (:class:`~intraslice.methods.layerwise.Budget`): 0 counts parameters only; a
    #: ``--target-memory`` sets it to context x batch, so the budget is weights plus KV cache.
    kv_weight: float = 0.0
    #: "uniform", "global" or "global_pca"; None: the method's default (:func:`default_allocation`).
    allocation: str | None = opt(
        None,
        "--allocation",
        "per-layer ratios: the same everywhere, or from mask gradients (plain or PCA-rotated); "
        "default global_pca for intraslice, uniform for the baselines",
        choices=ALLOCATIONS,
    )
    damp: float = opt(0.01, "--damp", "ridge λ as a fraction of mean(diag H)", type=float)
    min_head_width: float = opt(0.75, "--min-head-width", "minimum kept head width as a fraction of h", type=float)
    #: MLP widths are multiples of this. None: 8, or 32 with ``deploy="llamacpp"``: a width that
    #: is not a whole number of 32-value blocks cannot be stored as Q8_0/Q4_0/Q5_0 (llama.cpp's
    #: converter falls back to f16 for such a ``down_proj``). 256 lets the K-quants apply too.
    mlp_multiple: int | None = opt(
        None,
        "--mlp-multiple",
        "MLP widths are multiples of this (default 8; 32 with --deploy llamacpp, so every tensor stores as "
        "Q8_0/Q4_0; 256 for the K-quants)",
        type=int,
    )
    batch_size: int = opt(4, "--batch-size", "calibration windows per layer pass", type=int)
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
    #: The estimator's split of ``ratio`` between attention and MLP (global allocations): attention
    #: loses ``attention_share`` x ratio (a number or "auto"), or the MLP ``mlp_bias`` x ratio; neither:
    #: :data:`DEFAULT_ATTENTION_SHARE`. See :func:`intraslice.importance.estimate_allocation`.
    attention_share: float | str | None = opt(
        None,
        "--attention-share",
        "attention loses this share of the ratio, the MLP the rest; auto: one ranking of every unit and neuron "
        "chooses. Default: 0 for --ratio, --target-params and --target-speedup (attention keeps every head while "
        "the MLP can take the ratio); with --target-memory, auto by importance per byte of weights + KV where the "
        "cache is 10%% or more of the dense total at --context x --batch and the target keeps 85%% or more of it "
        "(or the MLP alone cannot meet it), else 0",
        type=share_arg,
    )
    mlp_bias: float | None = opt(
        None,
        "--mlp-bias",
        "β: every MLP loses β x the ratio, attention the rest (instead of --attention-share)",
        type=float,
        hidden=True,
    )
    #: Positions at the end of each calibration window that the MLP statistics leave out: the
    #: repeated span of ``--calib-repeat`` when only the attention step should see it
    #: (``--calib-repeat-in attention``; see :func:`intraslice.methods.intraslice.mlp_input_stats`).
    mlp_skip_positions: int = 0
    #: Channel baseline: fold the mean of removed channels into o_proj/down_proj biases (FLAP).
    bias_compensation: bool = opt(
        True, "--no-bias-compensation", "channel: no FLAP bias compensation (Wanda-sp scores)", action="store_false"
    )
    #: SliceGPT baseline: an explicit residual width instead of the one found for ``ratio``.
    slice_dim: int | None = opt(None, "--slice-dim", "slicegpt: explicit residual width (overrides ratio)", type=int)
    # -- export-compatible constraints (issue #11; IntraSlice only) ---------------------------
    #: Which heads share a RoPE pair set: "per-kv-group" (the method), "per-layer", or
    #: "global" (one set for the model, scored on the dense model before pruning).
    rope_selection: str = opt(
        "per-kv-group",
        "--rope-selection",
        "which heads share a RoPE pair set: per KV group (the method), per layer, or one for the model",
        choices=ROPE_SELECTIONS,
    )
    #: What a RoPE pair is worth in step D: "attention" (its effect on the attention rows;
    #: the default, docs/method.md section 8), "qk" (mean |q k|, method.md 2.D as specified)
    #: or "low-frequency" (slowest first; an ablation). None: the default for IntraSlice,
    #: nothing for the baselines (``validate`` resolves it, so reports record what ran).
    rope_score: str | None = opt(
        None,
        "--rope-score",
        "what a RoPE pair is worth: its effect on the attention rows (attention, the default), mean |q k| "
        "(qk: the method as specified), or slowest first (an ablation)",
        choices=ROPE_SCORES,
        hidden=True,
    )
    #: A model-wide common head width (rounded to a multiple of 8); None: per layer, unless
    #: ``common_width`` asks the dense-model statistics to choose one.
    head_width: int | None = opt(None, "--head-width", "one head width for the model (a multiple of 8)", type=int)
    common_width: bool = False
    #: Every kept KV head keeps the same number of query heads.
    equal_kv_groups: bool = opt(
        False, "--equal-kv-groups", "every kept KV head keeps equally many query heads", action="store_true"
    )
    #: Every layer the same shape (heads, KV heads, width, MLP width): the stock HF format.
    uniform_layers: bool = opt(
        False, "--uniform-layers", "every layer the same shape (stock Llama/Qwen2)", action="store_true"
    )
    #: "llamacpp", "stock" or "vllm": sets the constraints that target needs (see ``apply_deploy``).
    deploy: str | None = opt(
        None,
        "--deploy",
        "the constraints of a target: llamacpp (GGUF deci: global RoPE set, one head width, equal groups), "
        "stock (also every layer alike: LlamaForCausalLM/Qwen2ForCausalLM) or vllm (vLLM's DeciLM: "
        "also every layer's attention kept whole, MLP widths per layer)",
        choices=DEPLOY_TARGETS,
    )

    def validate(self, n_layers: int) -> None:
        """Check everything, the per-layer ratios against the model's ``n_layers`` too."""
        self.check_options()
        if self.layer_ratios is not None:
            if len(self.layer_ratios) != n_layers:
                raise IntraSliceError(
                    f"layer_ratios has {len(self.layer_ratios)} entries but the model has {n_layers} layers"
                )
            for i, (a, m) in enumerate(self.layer_ratios):
                check_ratio(a, f"attention ratio of layer {i}")
                check_ratio(m, f"MLP ratio of layer {i}")
            pruned = [i for i, (a, _) in enumerate(self.layer_ratios) if float(a) != 0]
            if self.deploy == "vllm" and not self.uniform_layers and pruned:
                raise IntraSliceError(
                    f"--deploy vllm keeps every layer's attention whole, but the per-layer ratios prune the "
                    f"attention of layer {pruned[0]}: {VLLM_ATTENTION}"
                )

    def check_options(self) -> None:
        """Check and resolve what needs no model: the method, the ratio, the deploy constraints."""
        spec = get_method(self.method)  # an unknown method is refused here
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise IntraSliceError(f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if not spec.per_layer_ratios and (self.layer_ratios is not None or self.allocation_mode() != "uniform"):
            raise IntraSliceError(f"--method {spec.name} slices every layer alike: use --allocation uniform")
        if not spec.per_layer_ratios and (self.attention_share is not None or self.mlp_bias is not None):
            raise IntraSliceError(
                "--attention-share / --mlp-bias split a layer's budget: "
                f"--method {spec.name} slices the residual stream"
            )
        check_ratio(self.ratio, "ratio")
        if not 0 < self.min_head_width <= 1:
            raise IntraSliceError(f"min_head_width must be in (0, 1], got {self.min_head_width}")
        if self.damp < 0:
            raise IntraSliceError(f"damp must be >= 0, got {self.damp}")
        if self.batch_size < 1:
            raise IntraSliceError(f"batch_size must be >= 1, got {self.batch_size}")
        self.apply_deploy()

    def apply_deploy(self) -> None:
        """Resolve ``deploy`` into the constraints of its target and check they fit together.

        llama.cpp (``deci``): per-layer head counts and MLP widths, but one head width, one RoPE
        frequency set and equal query groups. Stock Llama/Qwen2: the same, with every layer alike.
        vLLM (``DeciLMForCausalLM``): llama.cpp's, and one query-head count for the model, which
        the layer steps cannot choose per layer; **decision**: every layer keeps its whole
        attention (attention share 0: the MLP widths carry the per-layer allocation), or every
        layer is alike with ``--uniform-layers``. An explicit share of 0 is refused in one line
        when the MLP cannot take the ratio, instead of moving it as the default share would.
        """
        self.resolve_mlp_multiple()
        if self.deploy is not None:
            if self.deploy not in DEPLOY_TARGETS:
                raise IntraSliceError(f"unknown --deploy {self.deploy!r}: choose one of {', '.join(DEPLOY_TARGETS)}")
            if self.rope_selection not in ("per-kv-group", "global"):
                raise IntraSliceError(f"--deploy {self.deploy} needs --rope-selection global")
            self.rope_selection = "global"
            self.equal_kv_groups = True
            self.common_width = True
            if self.deploy == "stock":
                self.uniform_layers = True
            if self.deploy == "vllm" and not self.uniform_layers:
                if self.mlp_bias is not None or self.attention_share not in (None, 0, 0.0):
                    raise IntraSliceError(f"--deploy vllm keeps every layer's attention whole: {VLLM_ATTENTION}")
                self.attention_share = 0.0
        exportable = get_method(self.method).export_constraints
        if self.rope_score is None and exportable:
            self.rope_score = DEFAULT_ROPE_SCORE
        if self.rope_score is not None and self.rope_score not in ROPE_SCORES:
            raise IntraSliceError(f"unknown --rope-score {self.rope_score!r}: choose one of {', '.join(ROPE_SCORES)}")
        if self.rope_selection not in ROPE_SELECTIONS:
            raise IntraSliceError(
                f"unknown --rope-selection {self.rope_selection!r}: choose one of {', '.join(ROPE_SELECTIONS)}"
            )
        if self.rope_selection == "global" or self.uniform_layers:
            self.common_width = True  # one pair set (or one shape) has one size
        if self.head_width is not None:
            if int(self.head_width) < 8:
                raise IntraSliceError(f"--head-width must be at least 8, got {self.head_width}")
            self.head_width = max(8, round(int(self.head_width) / 8) * 8)
        constrained = (
            self.rope_selection != "per-kv-group"
            or self.head_width is not None
            or self.common_width
            or self.equal_kv_groups
            or self.uniform_layers
        )
        if self.rope_score is not None and not exportable:
            raise IntraSliceError("--rope-score chooses IntraSlice's RoPE pairs: it needs --method intraslice")
        if constrained and not exportable:
            raise IntraSliceError("the export constraints (--deploy, --rope-selection, ...) need --method intraslice")
        if self.uniform_layers and self.layer_ratios is not None and len({tuple(r) for r in self.layer_ratios}) > 1:
            raise IntraSliceError("--uniform-layers gives every layer the same shape: use --allocation uniform")
        if self.uniform_layers and getattr(self, "allocation", None) is None and hasattr(self, "allocation"):
            self.allocation = "uniform"  # every layer alike: nothing for the estimator to allocate
        if self.uniform_layers and getattr(self, "allocation", None) not in (None, "uniform"):
            raise IntraSliceError("--uniform-layers gives every layer the same shape: use --allocation uniform")

    def resolve_mlp_multiple(self) -> int:
        """Resolve and check ``mlp_multiple``: unset is 8, or 32 for llama.cpp. Q8_0, Q4_0 and Q5_0
        store rows in blocks of 32 values, and llama.cpp's converter stores a ``down_proj`` whose
        rows do not split into whole blocks as f16, so a "Q8_0" file would be part f16. The CLI
        calls this before any work (the speed search needs it before :meth:`validate`)."""
        if self.mlp_multiple is None:
            self.mlp_multiple = 32 if self.deploy == "llamacpp" else 8
        if isinstance(self.mlp_multiple, bool) or not isinstance(self.mlp_multiple, int) or self.mlp_multiple < 1:
            raise IntraSliceError(f"--mlp-multiple must be a positive integer, got {self.mlp_multiple!r}")
        return self.mlp_multiple

    @property
    def needs_dense_pass(self) -> bool:
        """Whether pruning first reads the dense model once (global pairs, a chosen common width)."""
        chosen_width = self.common_width and (self.head_width is None or self.uniform_layers)
        return self.rope_selection == "global" or chosen_width

    def allocation_mode(self) -> str:
        """The allocation this config runs (``allocation``, or the method's default)."""
        return self.allocation if self.allocation is not None else default_allocation(self.method)

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
