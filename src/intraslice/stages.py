"""The named stages of a pruning run: plan, load, allocate, prune, evaluate, save.

``intraslice prune`` is a thin caller of these; the Python API exposes them too. Every
stage streams: the source is opened without materialising it (:func:`load`), the
estimator and the pruning read one decoder layer at a time onto the compute device, the
compressed layers go straight to the output shards (:func:`prune`), and the evaluation
streams the dense and the pruned model the same way (:func:`evaluate`). Neither model is
ever whole in host memory or on the device.

How one calibration window travels: ``data.calibration_windows`` -> :func:`prune` ->
``pipeline.run_layers`` (capture: embedding on the device, layer-0 inputs into the
activation store) -> for each layer ``StreamedLayers.onload`` -> the method's ``collect``
(hooks accumulate float64 statistics) and ``compress`` (``algo`` on the math device, new
smaller modules) -> the layer's outputs become the next layer's inputs ->
``StreamedLayers.emit`` writes the compressed layer into the output shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import PruneSummary
from .arch import get_arch
from .checkpoint import SourceCheckpoint
from .config import PruneConfig
from .errors import IntraSliceError
from .params import param_report
from .pipeline import DevicePolicy, run_layers
from .pipeline import distributed as dist
from .pipeline.streaming import PrunedWriter, StreamedLayers
from .plan import MemoryPlan, make_plan


def load(
    model: str | None = None, gguf_file: str | None = None, dtype: str | torch.dtype | None = None
) -> SourceCheckpoint:
    """Open the source without reading its weights (a GGUF is converted to a safetensors cache once)."""
    from .models import parse_dtype

    torch_dtype = dtype if isinstance(dtype, torch.dtype) or dtype is None else parse_dtype(dtype)
    ckpt = SourceCheckpoint.open(model, gguf_file, dtype=torch_dtype)
    if ckpt.model_type == "intraslice" or ckpt.model_type == "slicegpt":
        raise IntraSliceError("this model is already pruned by intraslice; prune the source model instead")
    get_arch(ckpt.config)  # unsupported architectures are refused before any work
    return ckpt


def plan(
    ckpt: SourceCheckpoint,
    cfg: PruneConfig,
    nsamples: int,
    seqlen: int,
    estimator: bool,
    evaluate: bool,
    device_capacity: int | None = None,
    host_capacity: int | None = None,
) -> MemoryPlan:
    """The memory plan of this run; ``cfg.activations``/``cfg.math_device`` ``auto`` are resolved by it."""
    return make_plan(
        ckpt.config,
        nsamples,
        seqlen,
        cfg.batch_size,
        device=cfg.device,
        store=cfg.activations,
        math=cfg.math_device,
        dtype=ckpt.dtype,
        estimator=estimator,
        evaluate=evaluate,
        device_capacity=device_capacity,
        host_capacity=host_capacity,
    )


def _module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def allocate(
    ckpt: SourceCheckpoint,
    policy: DevicePolicy,
    tokens: torch.Tensor | None,
    ratio: float,
    mode: str,
    progress: bool = True,
    saved: dict[str, Any] | None = None,
    resident: bool = False,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """Per-layer ratios from the streamed mask-gradient estimator (or ``uniform``).

    ``resident`` (the memory plan's choice when the whole model fits the device): each
    module is read once and stays on the device until the estimator is done, instead of
    being read twice per sample. ``options``: ``units_per_head``, ``mlp_bias``, ``cap``,
    ``group_size`` of :func:`intraslice.importance.estimate_allocation`.
    """
    from .importance import estimate_allocation

    access = StreamedLayers(ckpt, policy)
    paths = _module_paths(access.model)

    loaded: set[str] = set()

    def onload(module: nn.Module) -> nn.Module:
        path = paths[id(module)]
        if resident and path in loaded:
            return module
        loaded.add(path)
        return ckpt.load_module(access.model, path, device=policy.compute)

    def offload(module: nn.Module) -> None:
        if not resident:
            ckpt.release_module(access.model, paths[id(module)])

    try:
        return estimate_allocation(
            access.model,
            ratio,
            mode,
            tokens=tokens,
            device=str(policy.compute),
            progress=progress,
            saved=saved,
            onload=onload,
            offload=offload,
            **options,
        )
    finally:
        for path in loaded:
            ckpt.release_module(access.model, path)


@dataclass
class StreamedPruneResult(PruneSummary):
    """What :func:`prune` wrote and what it cost (the model itself is on disk only)."""

    directory: Path | None = None
    pruned_config: Any = None


def prune(
    ckpt: SourceCheckpoint,
    calibration: torch.Tensor,
    cfg: PruneConfig,
    directory: str | Path,
    progress: bool = True,
    max_shard_bytes: int = 2 * 2**30,
) -> StreamedPruneResult:
    """Prune layer by layer from the source shards into ``directory`` (weights and config)."""
    from dataclasses import asdict

    from .api import make_method

    arch = get_arch(ckpt.config)
    cfg.validate(arch.dims(ckpt.config)["n_layers"])
    if calibration.dim() != 2 or calibration.shape[0] < 1:
        raise IntraSliceError(f"calibration must be (nsamples, seqlen) token ids, got shape {tuple(calibration.shape)}")
    policy = cfg.policy()
    t0 = time.perf_counter()
    skeleton = ckpt.skeleton()
    before = source_param_report(skeleton)
    method, pruned_config, model_cls, info = make_method(skeleton, cfg)
    directory = Path(directory)
    main = dist.is_main()  # under torchrun, rank 0 alone writes
    writer = PrunedWriter(directory, arch.state_renames, max_shard_bytes=max_shard_bytes) if main else None
    access = StreamedLayers(ckpt, policy, writer, model=skeleton)
    desc = "slicing layers (SliceGPT)" if cfg.method == "slicegpt" else "pruning layers"
    try:
        outcome = run_layers(access, dist.shard(calibration), method, policy, cfg.batch_size, progress, desc)
        if writer is not None:
            access.write_globals(tied=bool(pruned_config.tie_word_embeddings))
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    with torch.device("meta"):
        after = param_report(model_cls(pruned_config))
    if main:
        write_model_files(directory, pruned_config, model_cls)
    timings = dict(outcome.timings)
    timings["total"] = time.perf_counter() - t0
    return StreamedPruneResult(
        params_before=before,
        params_after=after,
        layers=[asdict(r) for r in outcome.layers],
        timings=timings,
        method={"method": cfg.method, **info, "devices": policy.describe()},
        directory=directory,
        pruned_config=pruned_config,
    )


def source_param_report(skeleton: nn.Module) -> dict[str, int]:
    """Parameter counts of a source skeleton (meta tensors have sizes, no data).

    Decoder-linear parameters are those of the ``nn.Linear`` modules inside the decoder
    layers: the same count whether a fused layout (Phi-3's qkv_proj) is split yet or not.
    """
    arch = get_arch(skeleton.config)
    linear = sum(
        p.numel()
        for layer in arch.decoder_layers(skeleton)
        for mod in layer.modules()
        if isinstance(mod, nn.Linear)
        for p in mod.parameters(recurse=False)
    )
    return {"decoder_linear": linear, "whole_model": sum(p.numel() for p in skeleton.parameters())}


def write_model_files(directory: Path, pruned_config: Any, model_cls: type) -> None:
    """config.json (with auto_map), the modeling code and generation_config.json, no weights.

    The same files ``save_pretrained`` writes, so the directory loads with
    ``from_pretrained`` after ``import intraslice`` or with ``trust_remote_code=True``.
    """
    from transformers import GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    from . import register_auto_classes

    register_auto_classes()
    pruned_config.save_pretrained(directory)
    with torch.device("meta"):
        model = model_cls(pruned_config)
    custom_object_save(model, directory, config=pruned_config)
    pruned_config.save_pretrained(directory)  # custom_object_save may have added auto_map entries
    gen = GenerationConfig.from_model_config(pruned_config)
    if gen.to_diff_dict():
        gen.save_pretrained(directory)


def evaluate(
    ckpt: SourceCheckpoint,
    tokenizer: Any,
    policy: DevicePolicy,
    seqlen: int = 2048,
    windows: int | None = None,
    progress: bool = True,
    chunk: int = 16,
) -> dict[str, Any]:
    """WikiText-2 test perplexity of a checkpoint, streamed one layer at a time."""
    from .data import tokenize, wikitext2_test_text
    from .eval.ppl import streamed_window_nlls

    text = wikitext2_test_text()
    ids = tokenize(tokenizer, text.text)
    total = ids.numel() // seqlen
    if total < 1:
        raise IntraSliceError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = total if windows is None else min(int(windows), total)
    t0 = time.perf_counter()
    access = StreamedLayers(ckpt, policy)
    windows_ids = ids[: n * seqlen].view(n, seqlen)
    sums: list[float] = []
    # Windows travel through the layers in chunks: host memory holds one chunk's hidden states.
    for start in range(0, n, chunk):
        sums += streamed_window_nlls(access, windows_ids[start : start + chunk], policy, progress=progress)
    import math

    if not all(math.isfinite(s) for s in sums):
        raise IntraSliceError("non-finite loss on an evaluation window: the model produces NaN/Inf")
    count = n * (seqlen - 1)
    return {
        "ppl": math.exp(sum(sums) / count),
        "seqlen": seqlen,
        "windows": n,
        "windows_total": total,
        "tokens_scored": count,
        "source": text.name,
        "streamed": True,
        "seconds": time.perf_counter() - t0,
    }
