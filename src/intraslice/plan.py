"""The memory plan: peak device and host memory of a run, predicted from the config alone.

Before hours of work, ``intraslice prune`` builds the model on the meta device (no
weights), counts what the sequential pipeline will hold at its worst moment in each stage
(estimator, pruning, evaluation), prints it, and picks the device policy that fits: the
activation store on the device if it fits there, else in host memory, else on disk. When
nothing fits it refuses with one line that says what would (``--plan`` prints the plan
and exits).

What is counted (bytes; w = model-dtype bytes, T = seqlen, B = batch size, N = windows):

* prune, device: the layer in work twice (source + the smaller modules being built), the
  float64 statistics (3 d_o^2 for attention; m^2 for the MLP, plus the solve's working
  set ~ 3.5 m^2 when the math runs on the device), one batch's activations through the
  layer (B T (4d + qkv + 3m) w, plus the float64 copy of the widest statistic input
  B T m 8), and the activation store if it lives on the device.
* prune, host: the activation store (the inputs with the o_proj inputs or the mid
  residuals; the inputs are freed before the outputs are built: N T (d + max(d_o, d)) w),
  the embeddings while layer-0 inputs are captured, one source layer being read, one
  output shard being written, the float64 math when it runs on the host, and the process
  itself (torch + transformers).
* estimator: one sample's inputs of every layer on the host (L T d w), and on the device
  one layer, its forward/backward activations for one sample (T (8d + qkv + 6m) 4 bytes),
  and the logits with their softmax and gradient in float32 for one chunk of 256 tokens.
* evaluation (streamed): one window per batch, one layer, the LM head's logits for 512
  tokens at a time.
* convert (only when this run converted a GGUF source into the safetensors cache; a child
  process, counted as its own stage): the process, plus the larger of the GGUF metadata
  being parsed (about 4 KiB per vocabulary token) and 3x one unit of dequantization work in
  float32 (a 64 MiB slice of rows, or a whole Q projection, whose rows llama files permute).
  No shard buffer: each tensor goes straight to its file (``checkpoint.convert_gguf``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .arch import ArchSpec, get_arch
from .errors import IntraSliceError
from .models import config_dtype

GiB = 2**30
#: RSS of a Python process that has imported torch, transformers and intraslice (measured
#: on Linux x86-64, torch 2.13 CPU: 384 MB; CUDA builds add their own context on the GPU).
PROCESS_BASE = 420 * 2**20
#: Tokens whose logits exist at once: the estimator's LM-head gradient, the evaluation.
HEAD_CHUNK = 256
EVAL_CHUNK = 512
#: CUDA context and allocator slack on the device.
CUDA_CONTEXT = 600 * 2**20
#: Host bytes per vocabulary token while a GGUF's metadata is parsed (transformers builds the
#: config and the tokenizer from the vocabulary in the file): measured 3.5-3.7 KiB on SmolLM2
#: (49k tokens) and Qwen2.5 (152k).
GGUF_METADATA_PER_TOKEN = 4 * 2**10


@dataclass
class StagePeak:
    device: int
    host: int


@dataclass
class MemoryPlan:
    """Predicted peaks per stage, the policy chosen, and whether it fits."""

    model: dict[str, Any]
    calibration: dict[str, int]
    policy: dict[str, str]
    weights: str
    stages: dict[str, StagePeak] = field(default_factory=dict)
    device_capacity: int | None = None
    host_capacity: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_device(self) -> int:
        return max(s.device for s in self.stages.values())

    @property
    def peak_host(self) -> int:
        return max(s.host for s in self.stages.values())

    def fits(self) -> bool:
        ok_dev = self.device_capacity is None or self.peak_device <= self.device_capacity
        ok_host = self.host_capacity is None or self.peak_host <= self.host_capacity
        return ok_dev and ok_host

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_device"], d["peak_host"] = self.peak_device, self.peak_host
        return d

    def describe(self) -> str:
        """A few human lines: what the run will hold at most, where, and whether it fits."""
        m = self.model
        lines = [
            f"memory plan: {m['model_type']} {m['params'] / 1e9:.2f}B params ({m['dtype']}), "
            f"{m['n_layers']} layers of {_gb(m['layer_bytes'])}; calibration "
            f"{self.calibration['nsamples']} x {self.calibration['seqlen']}, batch {self.calibration['batch_size']}",
            f"  policy: device {self.policy['device']}, activations on {self.policy['store']}, "
            f"float64 math on {self.policy['math']}, weights {self.weights}",
        ]
        for name, s in self.stages.items():
            lines.append(f"  {name:<10} device {_gb(s.device):>9}   host {_gb(s.host):>9}")
        cap_d = "unknown" if self.device_capacity is None else _gb(self.device_capacity)
        cap_h = "unknown" if self.host_capacity is None else _gb(self.host_capacity)
        lines.append(f"  peak       device {_gb(self.peak_device):>9}   host {_gb(self.peak_host):>9}")
        lines.append(
            f"  available  device {cap_d:>9}   host {cap_h:>9}   -> {'fits' if self.fits() else 'DOES NOT FIT'}"
        )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_shape(config: Any, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Sizes the plan needs, from the config alone (the model is built on the meta device)."""
    from transformers import AutoModelForCausalLM

    from .params import layer_linear_params

    arch = get_arch(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch.prepare_model(model)
    dims = arch.dims(model.config)
    if dtype is None:
        dtype = config_dtype(config) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    w = _dtype_bytes(dtype)
    layer0 = arch.decoder_layers(model)[0]
    layer_params = sum(p.numel() for p in layer0.parameters())
    total = sum(p.numel() for p in model.parameters())
    embed = ArchSpec._get(model, arch.embed).weight.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = 0 if tied else ArchSpec._get(model, arch.lm_head).weight.numel()
    return {
        "model_type": str(config.model_type),
        "dtype": str(dtype).replace("torch.", ""),
        "dtype_bytes": w,
        "params": total,
        "layer_params": layer_params,
        "layer_bytes": layer_params * w,
        "layer_linear_params": sum(layer_linear_params(arch, layer0)),
        "embed_bytes": embed * w,
        "head_bytes": head * w,
        "vocab": int(config.vocab_size),
        **dims,
    }


def _stages(
    s: dict[str, Any],
    nsamples: int,
    seqlen: int,
    batch: int,
    store: str,
    math_on_device: bool,
    on_gpu: bool,
    weights: str,
    estimator: bool,
    evaluate: bool,
    shard_bytes: int,
    estimator_seqlen: int | None = None,
) -> dict[str, StagePeak]:
    w = s["dtype_bytes"]
    d, m, n_l, vocab = s["d"], s["m"], s["n_layers"], s["vocab"]
    d_o = s["n_heads"] * s["head_dim"]
    qkv = (s["n_heads"] + 2 * s["n_kv"]) * s["head_dim"]
    layer = s["layer_bytes"]
    globals_bytes = s["embed_bytes"] + s["head_bytes"]
    tokens = nsamples * seqlen

    # -- prune ----------------------------------------------------------------------
    # inputs + (o_proj inputs | mid residuals); the inputs are freed before the outputs are built
    store_bytes = tokens * (d + max(d_o, d)) * w
    stats = 3 * d_o * d_o * 8 + m * m * 8
    # compress_mlp's float64 working set: H_KK (factored in place), H_KD and R_D
    # (2 keep m - keep^2, at most m^2), and W_down with the error terms (3 d m)
    solve = m * m * 8 + 3 * d * m * 8
    batch_act = batch * seqlen * ((4 * d + qkv + 3 * m) * w + m * 8)
    # A layer's statistics passes (batch activations) and its solves never overlap in time.
    work = 2 * layer + stats
    # Streamed: one output shard being filled (closed at the first layer boundary past
    # 64 MiB; never more than the whole pruned model) besides the layer in work.
    shard = min(shard_bytes, 64 * 2**20 + layer, s["params"] * w)
    store_host = 0 if store == "device" else store_bytes if store == "cpu" else batch * seqlen * (d + max(d_o, d)) * w
    base = PROCESS_BASE + nsamples * seqlen * 8  # the token ids
    # The embedding is only resident while the layer-0 inputs are captured, the embedding and
    # the LM head while they are written at the end: never during a layer's work.
    capture = globals_bytes if weights == "stream" else 0
    if on_gpu:
        dev = work + (max(batch_act, solve) if math_on_device else batch_act) + CUDA_CONTEXT
        dev += store_bytes if store == "device" else 0
        host = base + store_host + (layer + shard if weights == "stream" else s["params"] * w)
        host += 0 if math_on_device else solve + stats  # the float64 math reads host copies of the statistics
        prune = StagePeak(max(dev, capture + CUDA_CONTEXT), host + capture)
    else:
        # One memory: the streamed source layer is the one in work (counted in ``work``).
        resident = shard if weights == "stream" else s["params"] * w
        stored = store_bytes if store != "disk" else store_host
        prune = StagePeak(0, base + stored + resident + max(work + max(batch_act, solve), capture))
    out = {"prune": prune}

    # -- estimator (mask gradients, one sample at a time) ---------------------------------
    if estimator:
        # the estimator's own windows: the plain ones when the layer steps' carry appended spans
        seqlen = estimator_seqlen or seqlen
        est_host = PROCESS_BASE + nsamples * seqlen * 8 + n_l * seqlen * d * w
        est_host += layer if weights == "stream" else s["params"] * w
        # one layer's graph for one sample, and the LM head's logits, their softmax and gradient
        # for one chunk of tokens (importance.HEAD_CHUNK)
        act = seqlen * (8 * d + qkv + 6 * m) * 4 + 3 * min(seqlen, HEAD_CHUNK) * vocab * 4
        head = globals_bytes
        est_dev = layer + act + head + 2 * n_l * (d_o + m) * 8  # + the gradient accumulators
        out["estimator"] = StagePeak(est_dev + CUDA_CONTEXT, est_host) if on_gpu else StagePeak(0, est_host + est_dev)

    # -- evaluation (streamed, one window at a time) ------------------------------------
    if evaluate:
        ev_dev = layer + seqlen * (4 * d + qkv + 3 * m) * w + 2 * min(seqlen, EVAL_CHUNK) * vocab * 4 + globals_bytes
        ev_host = PROCESS_BASE + (layer if weights == "stream" else s["params"] * w) + 2 * seqlen * d * w
        out["evaluate"] = StagePeak(ev_dev + CUDA_CONTEXT, ev_host) if on_gpu else StagePeak(0, ev_host + ev_dev)
    return out


def _gguf_conversion(s: dict[str, Any]) -> int:
    from .checkpoint import GGUF_CHUNK_BYTES

    q_proj = s["n_heads"] * s["head_dim"] * s["d"] * 4  # dequantized whole: its rows are permuted
    work = 3 * max(GGUF_CHUNK_BYTES, q_proj)  # raw bytes, dequantized values, a permuted copy
    return PROCESS_BASE + max(GGUF_METADATA_PER_TOKEN * s["vocab"], work)


def gguf_conversion_bytes(config: Any) -> int:
    """Peak host memory of converting a GGUF of this model (``checkpoint.convert_gguf``, run
    in a child process): the process (torch, transformers), plus the larger of the metadata
    parse (:data:`GGUF_METADATA_PER_TOKEN` per vocabulary token) and 3x the float32 size of
    one unit of work (a ``checkpoint.GGUF_CHUNK_BYTES`` slice of rows, or a whole Q
    projection). Independent of the number of layers and of the embedding's size: measured
    0.89 GiB (Qwen2.5-Coder-0.5B, 152k tokens; planned 0.99 GiB) where loading the model whole
    took 3.75 GiB."""
    return _gguf_conversion(model_shape(config, torch.float32))


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (cgroup limits are not read: a plan, not a guarantee)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_bytes(device: str) -> int | None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    try:
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    except Exception:  # an emulated or exotic device: capacity unknown
        return None


def make_plan(
    config: Any,
    nsamples: int,
    seqlen: int,
    batch_size: int = 4,
    device: str = "cpu",
    store: str = "auto",
    math: str = "auto",
    dtype: torch.dtype | None = None,
    weights: str = "stream",
    estimator: bool = True,
    evaluate: bool = True,
    device_capacity: int | None = None,
    host_capacity: int | None = None,
    shard_bytes: int = 2 * GiB,
    estimator_seqlen: int | None = None,
    gguf_conversion: bool = False,
) -> MemoryPlan:
    """Predict the peaks and choose the activation store and math device that fit.

    ``seqlen`` is the layer steps' window; ``estimator_seqlen`` the estimator's when it differs
    (the CLI's default appends a repeated span for the layer steps only; None: ``seqlen``).
    ``gguf_conversion``: the run converted a GGUF source (stage ``convert``, see
    :func:`gguf_conversion_bytes`; a cached conversion costs nothing).

    ``store``/``math`` ``auto`` try the fastest choice first (activations on the device,
    float64 math on the device) and fall back (host memory, then disk; math on the host)
    until the prediction fits ``device_capacity``/``host_capacity`` (detected when None).
    """
    s = model_shape(config, dtype)
    on_gpu = not device.startswith("cpu")
    if device_capacity is None:
        device_capacity = device_memory_bytes(device)
    if host_capacity is None:
        host_capacity = host_memory_bytes()
    stores = [store] if store != "auto" else (["device", "cpu", "disk"] if on_gpu else ["cpu", "disk"])
    maths = [math] if math != "auto" else (["device", "cpu"] if on_gpu else ["cpu"])
    calib = {"nsamples": nsamples, "seqlen": seqlen, "batch_size": batch_size}
    plan = None
    for st in stores:
        for mt in maths:
            stages = _stages(
                s, nsamples, seqlen, batch_size, st, mt == "device" and on_gpu, on_gpu, weights,
                estimator, evaluate, shard_bytes, estimator_seqlen,
            )  # fmt: skip
            if gguf_conversion:
                stages["convert"] = StagePeak(0, _gguf_conversion(s))
            plan = MemoryPlan(
                model={k: s[k] for k in ("model_type", "dtype", "params", "layer_bytes", "n_layers", "d", "m")},
                calibration=calib,
                policy={"device": device, "store": st, "math": "device" if (mt == "device" and on_gpu) else "cpu"},
                weights=weights,
                stages=stages,
                device_capacity=device_capacity,
                host_capacity=host_capacity,
            )
            if plan.fits():
                return _annotate(plan, s)
    assert plan is not None
    return _annotate(plan, s)


def _estimator_resident(plan: MemoryPlan, s: dict[str, Any]) -> bool:
    """Keep every layer on the device during the estimator when the whole model fits there.

    The estimator runs every layer twice per sample; streamed, that is 2 L N layer loads.
    Resident, each layer is loaded once. Only on a GPU with known capacity and a margin.
    """
    est = plan.stages.get("estimator")
    if est is None or plan.policy["device"].startswith("cpu") or plan.device_capacity is None:
        return False
    whole = s["params"] * s["dtype_bytes"]
    return est.device - s["layer_bytes"] + whole <= 0.85 * plan.device_capacity


def _annotate(plan: MemoryPlan, s: dict[str, Any]) -> MemoryPlan:
    resident = _estimator_resident(plan, s)
    plan.policy["estimator_weights"] = "resident" if resident else "streamed"
    if resident:
        est = plan.stages["estimator"]
        est.device += s["params"] * s["dtype_bytes"] - s["layer_bytes"]
    if plan.policy["store"] == "disk":
        plan.notes.append("calibration activations go to disk (--offload-dir): slower, bounded host memory")
    if not resident and "estimator" in plan.stages and plan.policy["device"] != "cpu":
        n = plan.calibration["nsamples"]
        plan.notes.append(
            f"the estimator reads every layer twice per sample unless the model fits the device: "
            f"{2 * n * s['n_layers'] * s['layer_bytes'] / GiB:.0f} GiB of host-to-device copies at most"
        )
    return plan


def refuse_unless_fits(plan: MemoryPlan) -> None:
    """One line that says what does not fit and what would help."""
    if plan.fits():
        return
    what = []
    if plan.device_capacity is not None and plan.peak_device > plan.device_capacity:
        what.append(f"device needs {_gb(plan.peak_device)} of {_gb(plan.device_capacity)}")
    if plan.host_capacity is not None and plan.peak_host > plan.host_capacity:
        what.append(f"host needs {_gb(plan.peak_host)} of {_gb(plan.host_capacity)}")
    hint = "lower --batch-size or --nsamples/--seqlen, or use --activations disk"
    if plan.policy["store"] == "disk":
        hint = "lower --batch-size or --seqlen (activations are already on disk)"
    raise IntraSliceError(f"the run does not fit: {'; '.join(what)} ({hint}; intraslice prune --plan shows the plan)")
