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
from .methods.registry import get_method
from .params import param_report
from .pipeline import DevicePolicy, run_layers
from .pipeline import distributed as dist
from .pipeline.streaming import PrunedWriter, StreamedLayers, check_finite_weights
from .plan import MemoryPlan, make_plan
from .resume import RunCheckpoint, hook, restore_method


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
    estimator_seqlen: int | None = None,
) -> MemoryPlan:
    """The memory plan of this run; ``cfg.activations``/``cfg.math_device`` ``auto`` are resolved by it.

    ``seqlen``: the layer steps' windows; ``estimator_seqlen``: the estimator's (None: the same)."""
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
        estimator_seqlen=estimator_seqlen,
        gguf_conversion=getattr(ckpt, "gguf_converted", False),
    )


def check_vocabulary(ckpt: SourceCheckpoint, tokens: torch.Tensor | None = None, tokenizer: Any = None) -> None:
    """Refuse a tokenizer that does not belong to the model (ids past the embedding).

    An id past ``vocab_size`` would otherwise fail deep inside the embedding lookup (or,
    on a GPU, as an asynchronous device assert).
    """
    vocab = getattr(ckpt.config, "vocab_size", None)
    if vocab is None:
        return
    if tokenizer is not None and len(tokenizer) > int(vocab):
        raise IntraSliceError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: "
            "tokenizer and model do not match"
        )
    if tokens is not None and tokens.numel() and (int(tokens.max()) >= int(vocab) or int(tokens.min()) < 0):
        raise IntraSliceError(
            f"token id {int(tokens.max())} is outside the model's vocabulary of {vocab}: "
            "tokenizer and model do not match"
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
    being read twice per sample. ``options``: ``units_per_head``, ``mlp_bias``, ``attention_share``, ``cap``,
    ``group_size`` of :func:`intraslice.importance.estimate_allocation`.
    """
    from .importance import estimate_allocation

    access = StreamedLayers(ckpt, policy)
    paths = _module_paths(access.model)

    loaded: set[str] = set()

    reads = [0]

    def onload(module: nn.Module) -> nn.Module:
        reads[0] += 1
        hook("estimator", reads[0])  # where a test kills a run inside the estimator
        path = paths[id(module)]
        if resident and path in loaded:
            return module
        module = ckpt.load_module(access.model, path, device=policy.compute)
        if path not in loaded:
            check_finite_weights(module, path)
        loaded.add(path)
        return module

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
    checkpoint: RunCheckpoint | None = None,
) -> StreamedPruneResult:
    """Prune layer by layer from the source shards into ``directory`` (weights and config).

    With a ``checkpoint`` (``directory`` is its partial output), every finished layer is
    checkpointed and a resumed checkpoint continues from its last finished layer (see
    ``intraslice.resume``); an exception then leaves the shards written so far in place.
    """
    from dataclasses import asdict

    from .api import make_method
    from .methods.deploy import prepare_constraints
    from .pipeline.sequential import LayerReport

    arch = get_arch(ckpt.config)
    n_layers = arch.dims(ckpt.config)["n_layers"]
    cfg.validate(n_layers)
    if calibration.dim() != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise IntraSliceError(f"calibration must be (nsamples, seqlen) token ids, got shape {tuple(calibration.shape)}")
    check_vocabulary(ckpt, calibration)
    policy = cfg.policy()
    t0 = time.perf_counter()
    skeleton = ckpt.skeleton()
    before = source_param_report(skeleton)
    method, pruned_config, model_cls, info = make_method(skeleton, cfg)
    directory = Path(directory)
    if checkpoint is not None and checkpoint.stage("prune") is not None:
        return _restored_result(checkpoint.stage("prune"), directory, model_cls)
    main = dist.is_main()  # under torchrun, rank 0 alone writes
    if checkpoint is not None and dist.world_size() > 1:
        raise IntraSliceError("checkpointed runs are single-process (torchrun runs are not resumable)")
    saved = checkpoint.layers if checkpoint is not None else None
    start = int(saved["done"]) if saved else 0
    reports = [LayerReport(**r) for r in saved["reports"]] if saved else []
    timings: dict[str, float] = dict(saved["timings"]) if saved else {}
    writer = None
    if main and saved and saved["writer"] is not None:
        assert checkpoint is not None
        writer = PrunedWriter.resume(
            directory, saved["writer"], checkpoint.directory, arch.state_renames, max_shard_bytes=max_shard_bytes
        )
    elif main:
        writer = PrunedWriter(directory, arch.state_renames, max_shard_bytes=max_shard_bytes)
    if saved:
        assert checkpoint is not None
        restore_method(method, pruned_config, saved["method"], checkpoint.load_method_tensors(), cfg, arch)
    access = StreamedLayers(ckpt, policy, writer, model=skeleton)
    desc = get_method(cfg.method).progress_label

    def after_layer(index: int, inputs: Any, outcome: Any) -> None:
        assert checkpoint is not None
        hook("emit", index)
        merged = {k: timings.get(k, 0.0) + outcome.timings.get(k, 0.0) for k in {*timings, *outcome.timings}}
        merged["total"] = timings.get("total", 0.0) + time.perf_counter() - t0  # work kept so far
        seconds = checkpoint.save_layer(
            index, inputs, writer, method, pruned_config, reports + outcome.layers, merged, index == n_layers - 1
        )
        outcome.timings["checkpoint"] = outcome.timings.get("checkpoint", 0.0) + seconds
        hook("layer", index)

    try:
        if start < n_layers:
            # Export constraints (issue #11): a global RoPE set / common width read the dense model first.
            constraints = prepare_constraints(method, access, dist.shard(calibration), cfg, policy, progress)
            if constraints:
                info["constraints"] = constraints
            inputs = checkpoint.load_inputs(policy) if checkpoint is not None and start > 0 else None
            outcome = run_layers(
                access,
                dist.shard(calibration),
                method,
                policy,
                cfg.batch_size,
                progress,
                desc,
                start=start,
                start_inputs=inputs,
                after_layer=after_layer if checkpoint is not None else None,
            )
            reports += outcome.layers
            for k, v in outcome.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        if writer is not None:
            access.write_globals(tied=bool(pruned_config.tie_word_embeddings))
            hook("globals")
            writer.writer.on_rename = lambda path: hook("rename")
            writer.close()
    except BaseException:
        if writer is not None and checkpoint is None:
            writer.abort()
        raise
    with torch.device("meta"):
        after = param_report(model_cls(pruned_config))
    if main:
        write_model_files(directory, pruned_config, model_cls)
    timings["total"] = timings.get("total", 0.0) + time.perf_counter() - t0
    result = StreamedPruneResult(
        params_before=before,
        params_after=after,
        layers=[asdict(r) for r in reports],
        timings=timings,
        method={"method": cfg.method, **info, "devices": policy.describe()},
        directory=directory,
        pruned_config=pruned_config,
    )
    if checkpoint is not None:
        summary = {k: v for k, v in asdict(result).items() if k not in ("directory", "pruned_config")}
        checkpoint.save_stage("prune", summary)
        hook("model")
    return result


def _restored_result(summary: dict[str, Any], directory: Path, model_cls: type) -> StreamedPruneResult:
    """The result of a prune stage an interrupted run finished (the model is in ``directory``)."""
    config = model_cls.config_class.from_pretrained(directory)
    return StreamedPruneResult(**summary, directory=directory, pruned_config=config)


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
    text: str = "wikitext2",
) -> dict[str, Any]:
    """Perplexity of a checkpoint on an evaluation text (``data.EVAL_TEXTS``: WikiText-2 test,
    or the held-out C4 documents), streamed one layer at a time."""
    from .data import evaluation_text, tokenize
    from .eval.ppl import streamed_window_nlls

    name, text = text, evaluation_text(text)
    ids = tokenize(tokenizer, text.text)
    total = ids.numel() // seqlen
    if total < 1:
        raise IntraSliceError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    check_vocabulary(ckpt, ids, tokenizer)
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
        "text": name,
        "streamed": True,
        "seconds": time.perf_counter() - t0,
    }
