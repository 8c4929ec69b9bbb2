"""In-context ability: what average perplexity hides (issue #14).

Perplexity weighs every token alike, and most tokens of WikiText can be predicted from
local context and world knowledge. Copying a name, a number or an identifier from earlier
in the context (induction / retrieval) is a small share of those tokens, so a pruned model
can lose most of that ability while its perplexity moves little. Three cheap, seeded
measurements, identical for every model:

* **Copy loss** (:func:`copy_loss`): ``sequences`` random token sequences of ``span`` ids
  (drawn from ``[1000, 20000)`` clipped to the vocabulary, from a fixed seed, so every
  model with a vocabulary of at least 20000 sees the same ids), each repeated twice. The
  mean next-token loss on the second copy measures copying; the loss on the first copy
  (random tokens, nothing to copy from) is the no-context reference, about ``ln(19000)``.
  The first token of the second copy is not scored: nothing in the context says that the
  sequence restarts there, so it is as unpredictable as a first-copy token (its loss is
  reported apart, ``boundary_loss``).
* **Loss by position** (:func:`position_loss`): the per-token loss on the same WikiText-2
  test windows ``eval/ppl.py`` scores, averaged in buckets of ``bucket`` positions, to see
  whether late positions (long-range use of the context) degrade more than early ones.
* **Pass-key retrieval** (:func:`passkey_retrieval`): a five-digit key stated once at a
  depth of 10 / 50 / 90 % of a ``context``-token filler (the bundled WikiText-2 validation
  text), then asked for at the end. Scored under teacher forcing: a prompt is correct if
  the argmax at every answer position is the answer token (no generation loop, one forward
  pass per prompt); the mean answer-token loss is reported too. A unique number in prose
  is easy to find: small models score the same dense and pruned (SmolLM2: 91.7% both).
* **Key-value lookup** (:func:`lookup_retrieval`): a list of ``context`` tokens of random
  ``key: value`` lines (keys: distinct words of the bundled WikiText-2 validation text;
  values: five-digit numbers), then one key again, ``key:``, and the model must produce that
  key's value. Every line looks alike, so the answer cannot be found by what it says, only
  by matching the key and copying what followed it: associative recall, the mechanism
  copying names and identifiers from a document needs. The queried line sits at a depth of
  10 / 50 / 90 % of the list; scored as the pass key. **Decision**: word keys, not number
  keys: with five-digit keys even the dense SmolLM2 finds no value in a list of 50 lines
  (0/12 in an ad-hoc probe; with word keys 9/12), and a test every model fails tells nothing. Under teacher
  forcing, once the value's first digit is given the rest is copied almost always, so the
  first value token is the retrieval step: its accuracy is reported apart (``first_token``).

How the model runs: given a :class:`~intraslice.checkpoint.SourceCheckpoint` the model is
streamed one decoder layer at a time onto ``policy.device`` (as ``stages.evaluate`` and
pruning do, so a model larger than the device is evaluated); given a loaded ``nn.Module``
it runs where it is (``stream=True`` streams it from host memory instead). Either way the
logits are scored in chunks of tokens and never in half precision.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import IntraSliceError

#: Default copy-loss spans; a copy sequence is twice as long.
SPANS = (50, 200, 1000)
#: Random ids are drawn from [ID_LOW, ID_HIGH) clipped to the vocabulary: the middle of a
#: BPE vocabulary, ordinary word pieces rather than bytes or special tokens.
ID_LOW, ID_HIGH = 1000, 20000
PARTS = ("copy", "position", "retrieval", "lookup")
#: Tokens whose logits exist at once (all sequences of a batch together).
HEAD_CHUNK = 512
#: Tokens per forward batch: on a CPU, one 100-token sequence at a time spends most of its
#: time in per-layer overheads (3x slower than 8 at once); the budget bounds memory.
BATCH_TOKENS = 4096

PASSKEY_INTRO = "A pass key is hidden in the text below. Find it and remember it.\n\n"
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"

LOOKUP_INTRO = "Each line below gives a key and its value.\n\n"
LOOKUP_LINE = "{key}: {value}\n"
LOOKUP_QUERY = "\nLook up a key.\n{key}:"
LOOKUP_ANSWER = " {value}"


@dataclass
class TokenScores:
    """Per predicted token of an (n, T) batch: next-token NLL (float64) and argmax == target."""

    nll: torch.Tensor  # (n, T-1)
    hit: torch.Tensor  # (n, T-1) bool


Scorer = Callable[[torch.Tensor], TokenScores]


# -- running the model ---------------------------------------------------------------------
def _score_logits(
    logits_fn: Callable[[int, int], torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL and hits of ``targets`` (b, T-1) from logits computed ``HEAD_CHUNK`` tokens at a time.

    The chunk counts the tokens of all ``b`` rows: the logits (and cross-entropy's copy of
    them) are the largest tensors here, 100 MB per 512 tokens of a 49k vocabulary.
    """
    nll = torch.empty(targets.shape, dtype=torch.float64)
    hit = torch.empty(targets.shape, dtype=torch.bool)
    step = max(1, HEAD_CHUNK // targets.shape[0])
    for a in range(0, targets.shape[1], step):
        b = min(a + step, targets.shape[1])
        logits = logits_fn(a, b)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        tgt = targets[:, a:b].to(logits.device)
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        nll[:, a:b] = ce.view(tgt.shape).to("cpu", torch.float64)
        hit[:, a:b] = (logits.argmax(-1) == tgt).cpu()
    return nll, hit


def _batch_size(tokens: torch.Tensor, batch_size: int | None) -> int:
    return batch_size or max(1, min(tokens.shape[0], BATCH_TOKENS // tokens.shape[1]))


def streamed_scorer(access: Any, policy: Any, batch_size: int | None = None, progress: bool = False) -> Scorer:
    """Scores token batches one decoder layer at a time (``access``: ``StreamedLayers``/``ModelLayers``).

    The hidden states of the whole batch travel layer by layer (``stream_forward``), then the
    final norm and the LM head are onloaded once and applied ``HEAD_CHUNK`` tokens at a time.
    ``batch_size`` None: as many sequences as fit ``BATCH_TOKENS`` tokens.
    """

    @torch.no_grad()
    def score(tokens: torch.Tensor) -> TokenScores:
        from ..pipeline.sequential import stream_forward

        arch = access.arch
        bs = _batch_size(tokens, batch_size)
        hidden = stream_forward(access, tokens, policy, bs, progress, desc=f"in-context@{tokens.shape[1]}")
        norm = access.onload_module(arch.final_norm)
        head = access.onload_module(arch.lm_head)
        nlls, hits = [], []
        try:
            for start, h in zip(range(0, tokens.shape[0], bs), hidden.store, strict=True):
                target = tokens[start : start + h.shape[0], 1:]
                nll, hit = _score_logits(lambda a, b, h=h: head(norm(h[:, a:b])), target)
                nlls.append(nll)
                hits.append(hit)
        finally:
            hidden.store.clear()
            access.release_module(arch.final_norm)
            access.release_module(arch.lm_head)
        return TokenScores(torch.cat(nlls), torch.cat(hits))

    return score


def model_scorer(model: nn.Module, batch_size: int | None = None) -> Scorer:
    """Scores token batches with a loaded model's own forward, on the model's device."""

    @torch.no_grad()
    def score(tokens: torch.Tensor) -> TokenScores:
        device = next(model.parameters()).device
        nlls, hits = [], []
        bs = _batch_size(tokens, batch_size)
        for start in range(0, tokens.shape[0], bs):
            batch = tokens[start : start + bs]
            logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1]
            nll, hit = _score_logits(lambda a, b, lg=logits: lg[:, a:b], batch[:, 1:])
            nlls.append(nll)
            hits.append(hit)
        return TokenScores(torch.cat(nlls), torch.cat(hits))

    return score


def _check_finite(scores: TokenScores, what: str) -> None:
    if not bool(torch.isfinite(scores.nll).all()):
        raise IntraSliceError(f"non-finite loss on the {what}: the model produces NaN/Inf")


def _check_length(length: int, max_positions: int | None, what: str) -> None:
    if max_positions is not None and length > max_positions:
        raise IntraSliceError(f"{what} needs {length} positions, more than the model's {max_positions}")


def max_positions(config: Any) -> int | None:
    """The longest sequence the model is configured for (None: the config does not say)."""
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


# -- copy loss -------------------------------------------------------------------------------
def copy_id_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of the random ids: [1000, 20000) clipped to the vocabulary."""
    high = min(ID_HIGH, int(vocab_size))
    low = min(ID_LOW, high // 2)
    if high - low < 2:
        raise IntraSliceError(f"vocabulary of {vocab_size} tokens is too small for the copy test")
    return low, high


def copy_sequences(span: int, vocab_size: int, sequences: int = 8, seed: int = 0) -> torch.Tensor:
    """(sequences, 2*span) ids: seeded random spans, each followed by itself.

    The generator is seeded with ``seed`` alone, so the ids depend only on (span,
    sequences, seed, the clipped id range): every model whose vocabulary reaches 20000
    sees the same sequences.
    """
    if span < 2:
        raise IntraSliceError(f"copy span must be >= 2, got {span}")
    if sequences < 1:
        raise IntraSliceError(f"need at least one copy sequence, got {sequences}")
    low, high = copy_id_range(vocab_size)
    gen = torch.Generator().manual_seed(int(seed))
    first = torch.randint(low, high, (sequences, span), generator=gen)
    return torch.cat([first, first], dim=1)


def copy_metrics(scores: TokenScores, span: int) -> dict[str, float]:
    """Copy and no-context losses of (n, 2*span) copy sequences from their token scores.

    Score column ``j`` predicts token ``j+1``: the first copy's targets are tokens
    1..span-1, the second copy's tokens span+1..2*span-1; token ``span`` (the restart) is
    reported apart as ``boundary_loss``.
    """
    nll, hit = scores.nll, scores.hit
    second = slice(span, 2 * span - 1)  # targets span+1 .. 2*span-1
    return {
        "copy_loss": float(nll[:, second].mean()),
        "first_copy_loss": float(nll[:, : span - 1].mean()),
        "boundary_loss": float(nll[:, span - 1].mean()),
        "copy_top1": float(hit[:, second].float().mean()),
    }


def copy_loss(
    score: Scorer,
    vocab_size: int,
    spans: Sequence[int] = SPANS,
    sequences: int = 8,
    seed: int = 0,
    max_positions: int | None = None,
) -> dict[str, Any]:
    """Copy loss per span (see the module docstring); one model pass per span."""
    spans = [int(s) for s in spans]
    if not spans:
        raise IntraSliceError("give at least one copy span")
    for s in spans:
        if s < 2:
            raise IntraSliceError(f"copy span must be >= 2, got {s}")
        _check_length(2 * s, max_positions, f"copy span {s} (two copies)")
    low, high = copy_id_range(vocab_size)
    out: dict[str, Any] = {"sequences": sequences, "seed": seed, "id_range": [low, high], "spans": {}}
    for s in spans:
        t0 = time.perf_counter()
        scores = score(copy_sequences(s, vocab_size, sequences, seed))
        _check_finite(scores, f"copy sequences of span {s}")
        out["spans"][str(s)] = {**copy_metrics(scores, s), "seconds": time.perf_counter() - t0}
    return out


# -- loss by position ------------------------------------------------------------------------
def position_metrics(nll: torch.Tensor, bucket: int) -> list[dict[str, Any]]:
    """Mean loss per bucket of target positions [k*bucket, (k+1)*bucket) of (n, T-1) scores."""
    per_pos = nll.mean(0)  # index j predicts position j+1
    out = []
    for a in range(0, per_pos.numel() + 1, bucket):
        lo, hi = max(a, 1), min(a + bucket, per_pos.numel() + 1)
        if hi <= lo:
            continue
        out.append({"start": a, "end": hi, "loss": float(per_pos[lo - 1 : hi - 1].mean())})
    return out


def position_loss(
    score: Scorer,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    windows: int = 4,
    bucket: int = 256,
    source: str = "custom",
    max_positions: int | None = None,
) -> dict[str, Any]:
    """Per-position loss on the first ``windows`` non-overlapping ``seqlen`` windows, bucketed."""
    if seqlen < 2 or bucket < 1 or windows < 1:
        raise IntraSliceError(f"need seqlen >= 2, bucket >= 1, windows >= 1; got {seqlen}, {bucket}, {windows}")
    _check_length(seqlen, max_positions, f"a {seqlen}-token position window")
    total = token_ids.numel() // seqlen
    if total < 1:
        raise IntraSliceError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    n = min(int(windows), total)
    t0 = time.perf_counter()
    scores = score(token_ids[: n * seqlen].view(n, seqlen))
    _check_finite(scores, "position windows")
    buckets = position_metrics(scores.nll, bucket)
    return {
        "source": source,
        "seqlen": seqlen,
        "windows": n,
        "windows_total": total,
        "bucket": bucket,
        "mean_loss": float(scores.nll.mean()),
        "buckets": buckets,
        "late_minus_early": buckets[-1]["loss"] - buckets[0]["loss"],
        "seconds": time.perf_counter() - t0,
    }


# -- pass-key retrieval ---------------------------------------------------------------------
def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _check_passkey_options(depths: Sequence[float], per_depth: int) -> None:
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise IntraSliceError(f"pass-key depths must be in [0, 1], got {list(depths)}")
    if per_depth < 1:
        raise IntraSliceError(f"need at least one pass-key prompt per depth, got {per_depth}")


def passkey_prompts(
    tokenizer: Any,
    filler: torch.Tensor,
    context: int = 1024,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    per_depth: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, list[int], list[float], list[str]]:
    """(prompts (n, context) ids, answer token counts, depths, keys), every prompt ``context`` long.

    A prompt is intro + filler[:k] + needle + filler[k:] + question + answer; the filler
    (contiguous tokens of ``filler`` from a seeded offset) is sized so that every prompt has
    exactly ``context`` tokens and the needle starts ``depth`` of the way into it. The keys
    and offsets come from ``random.Random(seed)``: the same text for every model.
    """
    _check_passkey_options(depths, per_depth)
    rng = random.Random(seed)
    prompts, answer_lens, prompt_depths, keys = [], [], [], []
    intro = _ids(tokenizer, PASSKEY_INTRO, special=True)
    question = _ids(tokenizer, PASSKEY_QUESTION)
    for depth in depths:
        for _ in range(per_depth):
            key = str(rng.randrange(10000, 100000))
            needle = _ids(tokenizer, PASSKEY_NEEDLE.format(key=key))
            answer = _ids(tokenizer, PASSKEY_ANSWER.format(key=key))
            room = context - len(intro) - len(needle) - len(question) - len(answer)
            if room < 16:
                raise IntraSliceError(
                    f"pass-key context of {context} tokens leaves {room} for the filler: use a longer context"
                )
            if filler.numel() < room + 1:
                raise IntraSliceError(f"filler text has {filler.numel()} tokens, fewer than the {room} needed")
            start = rng.randrange(0, filler.numel() - room)
            fill = filler[start : start + room].tolist()
            k = round(depth * room)
            ids = intro + fill[:k] + needle + fill[k:] + question + answer
            prompts.append(ids)
            answer_lens.append(len(answer))
            prompt_depths.append(float(depth))
            keys.append(key)
    return torch.tensor(prompts, dtype=torch.long), answer_lens, prompt_depths, keys


def passkey_retrieval(
    score: Scorer,
    tokenizer: Any,
    filler: torch.Tensor,
    context: int = 1024,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    per_depth: int = 8,
    seed: int = 0,
    max_positions: int | None = None,
) -> dict[str, Any]:
    """Pass-key accuracy (teacher-forced argmax on every answer token) by depth."""
    _check_length(context, max_positions, f"a {context}-token pass-key prompt")
    t0 = time.perf_counter()
    prompts, answer_lens, prompt_depths, _keys = passkey_prompts(tokenizer, filler, context, depths, per_depth, seed)
    out = _answer_scores(score, prompts, answer_lens, prompt_depths, "pass-key prompts")
    return {
        **out,
        "seed": seed,
        "filler": "bundled:wikitext-2/validation",
        "seconds": time.perf_counter() - t0,
    }


# -- key-value lookup ------------------------------------------------------------------------
def lookup_keys() -> list[str]:
    """The key vocabulary: distinct lowercase words of 4-9 letters of the bundled WikiText-2
    validation text, sorted (the same list for every model and machine)."""
    from ..data import calibration_text

    text = calibration_text("wikitext2-valid").text
    return sorted({w for w in text.split() if w.isalpha() and w.islower() and 4 <= len(w) <= 9})


def lookup_prompts(
    tokenizer: Any,
    filler: torch.Tensor,
    context: int = 1024,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    per_depth: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, list[int], list[float], list[str], list[int], list[int]]:
    """(prompts (n, context) ids, answer token counts, depths, values, lines per prompt,
    offset of the first informative answer token: the first that is not only whitespace).

    Every prompt is ``context`` tokens long.

    A prompt is [filler] + intro + lines + query + answer. As many ``key: value`` lines as
    fit are drawn (``random.Random(seed)``: the same lists for every model); the line asked
    for is the one ``depth`` of the way down the list; the few tokens left over are taken
    from the start of a seeded stretch of ``filler`` (WikiText) placed before the intro, so
    every prompt has exactly ``context`` tokens without cutting a line.
    """
    _check_passkey_options(depths, per_depth)
    rng = random.Random(seed)
    words = lookup_keys()
    intro = _ids(tokenizer, LOOKUP_INTRO, special=True)
    prompts, answer_lens, prompt_depths, values, n_lines, first = [], [], [], [], [], []
    for depth in depths:
        for _ in range(per_depth):
            keys = rng.sample(words, min(len(words), 4096))
            vals = [rng.randrange(10000, 100000) for _ in keys]
            lines: list[list[int]] = []
            used = len(intro)
            for k, v in zip(keys, vals, strict=True):
                line = _ids(tokenizer, LOOKUP_LINE.format(key=k, value=v))
                if used + len(line) > context:
                    break
                lines.append(line)
                used += len(line)
            while True:  # drop lines from the end until the query and the answer fit
                if len(lines) < 4:
                    raise IntraSliceError(
                        f"lookup context of {context} tokens holds {len(lines)} lines: use a longer one"
                    )
                q = round(depth * (len(lines) - 1))
                query = _ids(tokenizer, LOOKUP_QUERY.format(key=keys[q]))
                answer = _ids(tokenizer, LOOKUP_ANSWER.format(value=vals[q]))
                room = context - used - len(query) - len(answer)
                if room >= 0:
                    break
                used -= len(lines.pop())
            if filler.numel() < room + 1:
                raise IntraSliceError(f"filler text has {filler.numel()} tokens, fewer than the {room} needed")
            start = rng.randrange(0, filler.numel() - room)
            ids = filler[start : start + room].tolist() + intro + [t for ln in lines for t in ln] + query + answer
            prompts.append(ids)
            answer_lens.append(len(answer))
            prompt_depths.append(float(depth))
            values.append(str(vals[q]))
            n_lines.append(len(lines))
            first.append(next(j for j, t in enumerate(answer) if tokenizer.decode([t]).strip()))
    return torch.tensor(prompts, dtype=torch.long), answer_lens, prompt_depths, values, n_lines, first


def _answer_scores(
    score: Scorer,
    prompts: torch.Tensor,
    answer_lens: list[int],
    prompt_depths: list[float],
    what: str,
    first: list[int] | None = None,
) -> dict[str, Any]:
    """Accuracy (every answer token the argmax) and answer loss, overall and by depth.

    ``first``: per prompt, the offset in the answer of its first informative token (after
    a bare space token); its accuracy is reported as ``first_token``.
    """
    context = prompts.shape[1]
    scores = score(prompts)
    _check_finite(scores, what)
    cells: dict[str, dict[str, list[float]]] = {}
    for i, (n_ans, depth) in enumerate(zip(answer_lens, prompt_depths, strict=True)):
        start = context - 1 - n_ans  # score j predicts token j+1
        cols = slice(start, context - 1)
        cell = cells.setdefault(str(depth), {"accuracy": [], "answer_loss": [], "first_token": []})
        cell["accuracy"].append(float(scores.hit[i, cols].all()))
        cell["answer_loss"].append(float(scores.nll[i, cols].mean()))
        if first is not None:
            cell["first_token"].append(float(scores.hit[i, start + first[i]]))
    keys = ("accuracy", "answer_loss", "first_token") if first is not None else ("accuracy", "answer_loss")
    n = len(answer_lens)
    return {
        "context": context,
        "prompts": n,
        **{k: sum(sum(c[k]) for c in cells.values()) / n for k in keys},
        "by_depth": {d: {k: sum(c[k]) / len(c[k]) for k in keys} for d, c in cells.items()},
    }


def lookup_retrieval(
    score: Scorer,
    tokenizer: Any,
    filler: torch.Tensor,
    context: int = 1024,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    per_depth: int = 8,
    seed: int = 0,
    max_positions: int | None = None,
) -> dict[str, Any]:
    """Key-value lookup accuracy (teacher-forced argmax on every value token) by depth."""
    _check_length(context, max_positions, f"a {context}-token lookup prompt")
    t0 = time.perf_counter()
    prompts, answer_lens, prompt_depths, _values, n_lines, first = lookup_prompts(
        tokenizer, filler, context, depths, per_depth, seed
    )
    out = _answer_scores(score, prompts, answer_lens, prompt_depths, "lookup prompts", first)
    return {
        **out,
        "seed": seed,
        "lines": [min(n_lines), max(n_lines)],  # key-value lines per prompt
        "seconds": time.perf_counter() - t0,
    }


# -- everything ------------------------------------------------------------------------------
def parse_parts(parts: str | Sequence[str]) -> list[str]:
    names = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else list(parts)
    names = [p for p in names if p]
    bad = [p for p in names if p not in PARTS]
    if bad or not names:
        raise IntraSliceError(f"unknown in-context part(s) {bad or names}: use a subset of {','.join(PARTS)}")
    return names


def evaluate_incontext(
    model: Any,
    tokenizer: Any = None,
    policy: Any = None,
    parts: str | Sequence[str] = PARTS,
    spans: Sequence[int] = SPANS,
    sequences: int = 8,
    seed: int = 0,
    seqlen: int = 2048,
    windows: int = 4,
    bucket: int = 256,
    context: int = 1024,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    per_depth: int = 8,
    stream: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The in-context suite on a checkpoint (streamed) or a loaded model.

    ``model``: a :class:`~intraslice.checkpoint.SourceCheckpoint` (streamed one layer at a
    time with ``policy``, default CPU) or an ``nn.Module`` (run where it is; ``stream=True``
    streams it from host memory with ``policy``). ``tokenizer`` is needed for ``position``
    and ``retrieval`` (a checkpoint's own is used when not given).
    """
    from ..pipeline import DevicePolicy

    names = parse_parts(parts)
    is_module = isinstance(model, nn.Module)
    config = model.config
    limit = max_positions(config)
    # Check every size before the first (slow) model pass.
    for s in spans if "copy" in names else ():
        if int(s) < 2:
            raise IntraSliceError(f"copy span must be >= 2, got {s}")
        _check_length(2 * int(s), limit, f"copy span {s} (two copies)")
    if "position" in names:
        _check_length(seqlen, limit, f"a {seqlen}-token position window")
    if "retrieval" in names or "lookup" in names:
        _check_length(context, limit, f"a {context}-token retrieval prompt")
        _check_passkey_options(depths, per_depth)
    if "copy" in names and sequences < 1:
        raise IntraSliceError(f"need at least one copy sequence, got {sequences}")
    if tokenizer is None and ({"position", "retrieval", "lookup"} & set(names)):
        if is_module:
            raise IntraSliceError("the position, retrieval and lookup tests need the model's tokenizer")
        tokenizer = model.tokenizer()
    if is_module and not stream:
        model.eval()
        score = model_scorer(model)
    else:
        from ..pipeline import ModelLayers
        from ..pipeline.streaming import StreamedLayers

        policy = policy or DevicePolicy("cpu")
        access = ModelLayers(model, policy) if is_module else StreamedLayers(model, policy)
        score = streamed_scorer(access, policy, progress=progress)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"streamed": not (is_module and not stream)}
    if "copy" in names:
        out["copy"] = copy_loss(score, config.vocab_size, spans, sequences, seed, limit)
    if "position" in names:
        from ..data import tokenize, wikitext2_test_text

        text = wikitext2_test_text()
        out["position"] = position_loss(
            score, tokenize(tokenizer, text.text), seqlen, windows, bucket, text.name, limit
        )
    if "retrieval" in names or "lookup" in names:
        from ..data import calibration_text, tokenize

        filler = tokenize(tokenizer, calibration_text("wikitext2-valid").text)  # once for both tests
        if "retrieval" in names:
            out["retrieval"] = passkey_retrieval(score, tokenizer, filler, context, depths, per_depth, seed, limit)
        if "lookup" in names:
            out["lookup"] = lookup_retrieval(score, tokenizer, filler, context, depths, per_depth, seed, limit)
    out["seconds"] = time.perf_counter() - t0
    return out


def prune_report_copy_loss(ckpt: Any, policy: Any, span: int = 200, sequences: int = 8) -> dict[str, Any]:
    """The copy loss ``intraslice prune`` reports next to perplexity (streamed, like it).

    The span is shortened to what the model's positions allow (tiny test models), and the
    span used is recorded.
    """
    limit = max_positions(ckpt.config)
    if limit is not None:
        span = max(2, min(span, limit // 2))
    res = evaluate_incontext(ckpt, policy=policy, parts=("copy",), spans=(span,), sequences=sequences)
    cell = res["copy"]["spans"][str(span)]
    return {"span": span, **{k: res["copy"][k] for k in ("sequences", "seed", "id_range")}, **cell}


def format_table(res: dict[str, Any]) -> str:
    """The results as a few small plain-text tables."""
    lines = []
    if "copy" in res:
        c = res["copy"]
        lo, hi = c["id_range"]
        lines.append(f"copy loss ({c['sequences']} random sequences, ids {lo}-{hi}, seed {c['seed']})")
        lines.append(f"{'span':>6}{'copy loss':>11}{'first copy':>12}{'copy top-1':>12}")
        for s, v in c["spans"].items():
            lines.append(f"{s:>6}{v['copy_loss']:>11.3f}{v['first_copy_loss']:>12.3f}{v['copy_top1']:>12.1%}")
    if "position" in res:
        p = res["position"]
        lines.append(
            f"loss by position ({p['windows']}/{p['windows_total']} windows of {p['seqlen']}, {p['source']}): "
            f"mean {p['mean_loss']:.3f}"
        )
        lines.append("  " + " ".join(f"{b['start']:>6}" for b in p["buckets"]))
        lines.append("  " + " ".join(f"{b['loss']:>6.3f}" for b in p["buckets"]))
    if "retrieval" in res:
        r = res["retrieval"]
        lines.append(
            f"pass-key retrieval ({r['prompts']} prompts of {r['context']} tokens): accuracy {r['accuracy']:.1%}"
        )
        for d, v in r["by_depth"].items():
            lines.append(
                f"  depth {float(d):>4.0%}: accuracy {v['accuracy']:>6.1%}, answer loss {v['answer_loss']:.3f}"
            )
    if "lookup" in res:
        r = res["lookup"]
        lines.append(
            f"key-value lookup ({r['prompts']} prompts of {r['context']} tokens, {r['lines'][0]}-{r['lines'][1]} "
            f"lines each): accuracy {r['accuracy']:.1%}, first value token {r['first_token']:.1%}, "
            f"answer loss {r['answer_loss']:.3f}"
        )
        for d, v in r["by_depth"].items():
            lines.append(
                f"  depth {float(d):>4.0%}: accuracy {v['accuracy']:>6.1%}, first value token "
                f"{v['first_token']:>6.1%}, answer loss {v['answer_loss']:.3f}"
            )
    return "\n".join(lines)
