"""Zero-shot multiple-choice accuracy with lm-evaluation-harness (``lm-eval``).

Users judge a pruned model by zero-shot accuracy as much as by perplexity, and papers
report it with lm-eval, so the numbers here come from lm-eval itself: its request
construction, its metrics (``acc``, ``acc_norm`` = log-likelihood divided by the choice's
length in characters), its stderr. What this module adds:

* **Offline data.** lm-eval downloads its data sets from the Hugging Face hub. The task
  definitions in ``eval/tasks/*_local.yaml`` read the same data sets from local JSONL
  files (``{"query", "choices", "gold"}``, MosaicML ICL format): from ``data_dir``, else
  ``$INTRASLICE_ZEROSHOT_DATA``, else the copies bundled with the package (permissive
  licences, attribution in ``resources/ATTRIBUTION.md``). :func:`load_task_dataset`
  rewrites each row into lm-eval's own prompt for that task (see ``PROMPTS``), so the
  requests are those of lm-eval's ``piqa``, ``arc_easy``... tasks. ``source="hub"`` runs
  lm-eval's own tasks instead (online).
* **Seeded subsets.** ``limit`` evaluates a fixed, seeded random subset of each task
  (lm-eval's own ``--limit`` takes the first N rows, which are not representative).
* **Fewer forward passes.** Every choice of a question shares the question's context:
  :class:`PrefixSharingLM` runs the context once, keeps its KV cache and scores all the
  continuations against it in one batch, computing the LM head only where a continuation
  token is predicted. Results equal lm-eval's plain path (tested); ``fast=False`` uses it.
"""

from __future__ import annotations

import json
import logging
import lzma
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import IntraSliceError

ENV_DATA_DIR = "INTRASLICE_ZEROSHOT_DATA"
TASKS_DIR = Path(__file__).with_name("tasks")
LM_EVAL_REQUIREMENT = "lm-eval>=0.4.8,<0.5"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # ours and lm-eval's task name
    files: tuple[str, ...]  # accepted file names in a data directory (first = bundled name)
    metric: str  # the headline metric, as commonly reported
    split: str  # which split the local file holds (the one lm-eval evaluates)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("piqa", ("piqa.jsonl",), "acc_norm", "validation"),
        TaskSpec("arc_easy", ("arc_easy.jsonl",), "acc_norm", "test"),
        TaskSpec("arc_challenge", ("arc_challenge.jsonl",), "acc_norm", "test"),
        TaskSpec("winogrande", ("winogrande.jsonl",), "acc", "validation (xl dev)"),
        TaskSpec("boolq", ("boolq.jsonl",), "acc", "validation"),
        TaskSpec("openbookqa", ("openbook_qa.jsonl", "openbookqa.jsonl"), "acc_norm", "test"),
        TaskSpec("hellaswag", ("hellaswag.jsonl",), "acc_norm", "validation"),
        TaskSpec("copa", ("copa.jsonl",), "acc", "validation"),
    )
}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa", "hellaswag")
# The 5-task average of SliceGPT and most structured-pruning papers, and the 7-task one.
AVERAGES: dict[str, tuple[str, ...]] = {
    "avg5": ("piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag"),
    "avg7": DEFAULT_TASKS,
}

# How a local row becomes lm-eval's prompt (documented in the README as well).
PROMPTS = {
    "piqa": 'lm-eval: "Question: {goal}\\nAnswer:"; local query is "Question: {goal}\\n" -> + "Answer:"',
    "arc_easy": 'lm-eval: "Question: {question}\\nAnswer:"; local query is "Question: {question}" -> + "\\nAnswer:"',
    "arc_challenge": "as arc_easy",
    "boolq": 'lm-eval: "{passage}\\nQuestion: {question}?\\nAnswer:", choices no/yes; local query is '
    '"Passage: {passage}\\nQuestion: {question}?" -> "Passage: " dropped, + "\\nAnswer:"',
    "openbookqa": "lm-eval: the question stem; local query is the stem, unchanged",
    "hellaswag": "lm-eval: preprocess(label + ': ' + ctx_a + ' ' + ctx_b.capitalize()); the local query "
    "is preprocessed but ctx_b is not capitalised: its first letter (the lowercase words after the last "
    "sentence end, ActivityNet rows) is upper-cased back",
    "winogrande": "lm-eval partial evaluation: choices are the sentence up to the blank with each option, the "
    "shared continuation is scored; local context_options/continuation are exactly those",
    "copa": 'lm-eval: premise without its final "." + " because|therefore", choices " " + first letter '
    'lowercased; local query ends ", therefore" -> the comma is dropped',
}


# --------------------------------------------------------------------------- data


def _bundled_dir() -> Any:
    return resources.files("intraslice.resources").joinpath("zeroshot")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    """(directory or None for the bundled copies, description). A named directory must exist."""
    for value, what in ((data_dir, "--data-dir"), (os.environ.get(ENV_DATA_DIR) or None, f"${ENV_DATA_DIR}")):
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.is_dir():
            raise IntraSliceError(f"zero-shot data directory {str(path)!r} ({what}) does not exist")
        return path, f"dir:{path}"
    return None, "bundled"


def task_data_file(task: str, data_dir: Path | None) -> Path | Any | None:
    """The file holding ``task`` (plain or ``.xz`` JSONL), or None if the directory lacks it."""
    spec = TASKS[task]
    if data_dir is None:
        f = _bundled_dir().joinpath(spec.files[0] + ".xz")
        return f if f.is_file() else None
    for name in spec.files:
        for cand in (data_dir / name, data_dir / (name + ".xz")):
            if cand.is_file():
                return cand
    return None


def read_rows(task: str, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The raw JSONL rows of one task."""
    directory, where = resolve_data_dir(data_dir)
    f = task_data_file(task, directory)
    if f is None:
        raise IntraSliceError(f"no data for task {task!r} in {where} (expected {' or '.join(TASKS[task].files)})")
    raw = f.read_bytes()
    if str(f).endswith(".xz"):
        raw = lzma.decompress(raw)
    rows = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise IntraSliceError(f"{f}: line {i + 1} is not JSON ({exc.msg})") from None
    if not rows:
        raise IntraSliceError(f"{f} holds no rows")
    return rows


def _hellaswag_query(query: str) -> str:
    """lm-eval capitalises ``ctx_b`` (ActivityNet rows: the lowercase start of the last
    sentence); the local query lost that split, but ``ctx_b`` is exactly the lowercase
    fragment after the last sentence end, so its first letter is upper-cased back."""
    label, sep, ctx = query.partition(": ")
    if not sep or query.endswith((".", "!", "?")):
        return query
    cut = max(ctx.rfind(". "), ctx.rfind("! "), ctx.rfind("? "))
    head, frag = (ctx[: cut + 2], ctx[cut + 2 :]) if cut >= 0 else ("", ctx)
    if frag[:1].islower():
        frag = frag[0].upper() + frag[1:]
    return f"{label}{sep}{head}{frag}"


def format_row(task: str, row: dict[str, Any]) -> dict[str, Any]:
    """One local row as an lm-eval document: ``text`` (the prompt), ``choices``, ``gold``."""
    try:
        gold = int(row["gold"])
        if task == "winogrande":
            return {"gold": gold, "choices": list(row["context_options"]), "continuation": row["continuation"]}
        q, choices = row["query"], list(row["choices"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IntraSliceError(f"{task}: malformed row (needs query, choices, gold): {exc}") from None
    if task == "piqa":
        text = q.rstrip("\n") + "\nAnswer:"
    elif task in ("arc_easy", "arc_challenge"):
        text = q.rstrip("\n") + "\nAnswer:"
    elif task == "boolq":
        text = q.removeprefix("Passage: ").rstrip("\n") + "\nAnswer:"
    elif task == "hellaswag":
        text = _hellaswag_query(q)
    elif task == "copa":
        head, _, connector = q.rpartition(" ")
        text = f"{head.rstrip(',.')} {connector}"
        choices = [" " + c[:1].lower() + c[1:] for c in choices]
    else:  # openbookqa
        text = q
    if not 0 <= gold < len(choices):
        raise IntraSliceError(f"{task}: gold index {gold} out of range for {len(choices)} choices")
    return {"text": text, "choices": choices, "gold": gold}


def load_task_dataset(task: str, data_dir: str | os.PathLike[str] | None = None) -> Any:
    """The task's documents as a ``datasets.DatasetDict`` with one ``test`` split (lm-eval's
    ``custom_dataset`` hook)."""
    import datasets

    if task not in TASKS:
        raise IntraSliceError(f"unknown zero-shot task {task!r}: known tasks are {', '.join(TASKS)}")
    docs = [format_row(task, r) for r in read_rows(task, data_dir)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    if tasks is None:
        return list(DEFAULT_TASKS)
    names = [t.strip().lower() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise IntraSliceError("no zero-shot task given")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise IntraSliceError(f"unknown zero-shot task {unknown[0]!r}: known tasks are {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def sample_indices(task: str, n_total: int, limit: int | None, seed: int) -> list[int] | None:
    """A fixed, seeded subset of ``limit`` document indices (sorted), or None for all.

    Seeded by ``seed`` and the task name (string seeds are hashed with SHA-512, so the
    subset is the same on every machine and Python version), independent of the model."""
    if limit is None or limit >= n_total:
        return None
    return sorted(random.Random(f"{seed}:{task}").sample(range(n_total), limit))


# --------------------------------------------------------------------------- model wrapper


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise IntraSliceError(
            f"zero-shot evaluation needs lm-eval: pip install 'intraslice[eval]' (or '{LM_EVAL_REQUIREMENT}')"
        ) from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import version

    _lm_eval()
    return version("lm_eval")


def _forward_accepts(model: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _make_lm(model: Any, tokenizer: Any, batch_size: int, fast: bool, progress: bool) -> Any:
    from lm_eval.models.huggingface import HFLM

    class PrefixSharingLM(HFLM):
        """HFLM whose log-likelihoods share each context's forward pass among its choices.

        lm-eval's own path runs ``context + choice`` once per choice, batched and sorted by
        length, and computes logits (and a float32 log-softmax over the whole vocabulary)
        at every position. Here the context runs once per distinct context, with its KV
        cache copied to every continuation, and the LM head runs only on the positions
        that predict a continuation token. Single-token continuations (BoolQ's no/yes)
        need no second pass at all. Requests longer than the model's window fall back to
        lm-eval's path (which truncates from the left).
        """

        def _loglikelihood_tokens(
            self, requests: list[Any], disable_tqdm: bool = False, override_bs: int | None = None
        ) -> list[tuple[float, bool]]:
            if not fast:
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            return prefix_sharing_loglikelihoods(
                self.model, requests, self.max_length, progress and not disable_tqdm, self._fallback
            )

        def _fallback(self, requests: list[Any]) -> list[tuple[float, bool]]:
            return HFLM._loglikelihood_tokens(self, requests, disable_tqdm=True)

    return PrefixSharingLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")


@torch.no_grad()
def prefix_sharing_loglikelihoods(
    model: Any,
    requests: list[tuple[Any, list[int], list[int]]],
    max_length: int,
    progress: bool = False,
    fallback: Any = None,
) -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), is_greedy) for each (key, context, continuation)
    token request, running each distinct context once (see :class:`PrefixSharingLM`)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    keep = _forward_accepts(model, "logits_to_keep")
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    groups: dict[tuple[int, ...], list[int]] = {}
    too_long = []
    for i, (_key, ctx, cont) in enumerate(requests):
        if len(ctx) + len(cont) > max_length:
            too_long.append(i)
        else:
            groups.setdefault(tuple(ctx), []).append(i)
    if too_long:
        if fallback is None:
            raise IntraSliceError(f"{len(too_long)} requests exceed the model window of {max_length} tokens")
        for i, r in zip(too_long, fallback([requests[i] for i in too_long]), strict=True):
            out[i] = r
    # Longest first: memory problems show at once, and the progress bar overestimates.
    order = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + max(len(requests[i][2]) for i in kv[1])))
    bar = tqdm(total=len(requests) - len(too_long), desc="log-likelihoods", unit="req", disable=not progress)
    cache_kw = "cache" if _forward_accepts(model, "cache") else "past_key_values"
    for ctx, members in order:
        conts = [requests[i][2] for i in members]
        if len(members) == 1:  # nothing to share (WinoGrande): one pass over context + continuation
            cont = conts[0]
            inp = torch.tensor([list(ctx) + cont[:-1]], device=device)
            kwargs: dict[str, Any] = {"use_cache": False}
            if keep:
                kwargs["logits_to_keep"] = len(cont)
            logits = model(input_ids=inp, **kwargs).logits[0, -len(cont) :]
            first = logits[0]
            rest = logits[None, 1:]
        else:
            ctx_t = torch.tensor([list(ctx)], device=device)
            kwargs = {"use_cache": True}
            if keep:
                kwargs["logits_to_keep"] = 1
            res = model(input_ids=ctx_t, **kwargs)
            first = res.logits[0, -1]
            width = max(len(c) for c in conts) - 1
            rest = None
            if width > 0:
                cache = getattr(res, "cache", None) or res.past_key_values
                cache.batch_repeat_interleave(len(conts))
                inp = torch.tensor([c[:-1] + [c[0]] * (width - len(c) + 1) for c in conts], device=device)
                rest = model(input_ids=inp, use_cache=True, **{cache_kw: cache}).logits
        first = torch.log_softmax(first.to(torch.promote_types(first.dtype, torch.float32)), dim=-1)
        if rest is not None:
            rest = torch.log_softmax(rest.to(torch.promote_types(rest.dtype, torch.float32)), dim=-1)
        for row, (i, cont) in enumerate(zip(members, conts, strict=True)):
            lp = [first]
            if len(cont) > 1:
                lp.append(rest[row, : len(cont) - 1])
            logp = torch.cat([x.reshape(-1, x.shape[-1]) for x in lp])
            target = torch.tensor(cont, device=device)
            ll = logp.gather(1, target[:, None]).sum()
            greedy = bool((logp.argmax(-1) == target).all())
            out[i] = (float(ll), greedy)
        bar.update(len(members))
    bar.close()
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- evaluation


def _quiet_lm_eval() -> None:
    """lm-eval logs many INFO/WARNING lines per task; keep only its errors."""
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _metric(res: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    v, s = res.get(f"{metric},none"), res.get(f"{metric}_stderr,none")
    v = float(v) if isinstance(v, (int, float)) else None
    s = float(s) if isinstance(s, (int, float)) and math.isfinite(float(s)) else None
    return v, s


def averages(task_results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """5- and 7-task averages of the headline metrics, or the tasks each one lacks."""
    out = {}
    for name, members in AVERAGES.items():
        missing = [t for t in members if t not in task_results]
        value = None if missing else sum(task_results[t]["value"] for t in members) / len(members)
        out[name] = {"value": value, "tasks": list(members), "missing": missing}
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 1234,
    batch_size: int = 16,
    data_dir: str | os.PathLike[str] | None = None,
    source: str = "local",
    fast: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy of a loaded causal LM (any ``from_pretrained`` model, a pruned
    one included) on lm-eval multiple-choice tasks.

    ``source="local"`` reads ``data_dir`` / ``$INTRASLICE_ZEROSHOT_DATA`` / the bundled
    copies; tasks whose file a directory lacks are skipped with a warning and listed in
    ``missing``. ``source="hub"`` runs lm-eval's own tasks (downloads). ``limit`` keeps a
    seeded random subset of that many documents per task. ``batch_size`` is the batch of
    lm-eval's plain path (``fast=False``); the prefix-sharing path batches the choices of
    one question.
    """
    import warnings

    lm_eval = _lm_eval()
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise IntraSliceError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise IntraSliceError(f"--batch-size must be >= 1, got {batch_size}")
    if source not in ("local", "hub"):
        raise IntraSliceError(f"unknown zero-shot data source {source!r}: use local or hub")
    _quiet_lm_eval()
    missing: list[str] = []
    if source == "local":
        directory, where = resolve_data_dir(data_dir)
        missing = [t for t in names if task_data_file(t, directory) is None]
        if len(missing) == len(names):
            raise IntraSliceError(
                f"no data for any of {', '.join(names)} in {where} (expected files like {TASKS[names[0]].files[0]})"
            )
        if missing:
            warnings.warn(f"no data in {where} for {', '.join(missing)}: skipped", stacklevel=2)
        names = [t for t in names if t not in missing]
        manager = TaskManager(
            include_path=str(TASKS_DIR),
            include_defaults=False,
            metadata={"data_dir": None if directory is None else str(directory)},
        )
        lm_names = {t: f"{t}_local" for t in names}
    else:
        where = "hub (lm-eval's own tasks)"
        manager = TaskManager()
        lm_names = {t: t for t in names}
    try:
        task_dict = get_task_dict([lm_names[t] for t in names], manager)
    except IntraSliceError:
        raise
    except Exception as exc:  # datasets and hub errors have many types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (offline? use the bundled data: --source local)" if source == "hub" else ""
        raise IntraSliceError(f"could not load the zero-shot tasks from {where}: {msg}{hint}") from exc

    samples: dict[str, list[int]] = {}
    n_total: dict[str, int] = {}
    for t in names:
        task_obj = task_dict[lm_names[t]]
        n_total[t] = len(task_obj.eval_docs)
        idx = sample_indices(t, n_total[t], limit, seed)
        samples[lm_names[t]] = idx if idx is not None else list(range(n_total[t]))

    lm = _make_lm(model, tokenizer, batch_size, fast, progress)
    counter = _RequestCounter(lm)
    was_training = getattr(model, "training", False)
    model.eval()
    t0 = time.perf_counter()
    try:
        raw = lm_evaluate(lm=lm, task_dict=task_dict, samples=samples, bootstrap_iters=1000, log_samples=False)
    finally:
        counter.restore()
        model.train(was_training)
    seconds = time.perf_counter() - t0

    task_results: dict[str, dict[str, Any]] = {}
    for t in names:
        res = raw["results"][lm_names[t]]
        entry: dict[str, Any] = {"metric": TASKS[t].metric}
        for m in ("acc", "acc_norm"):
            v, s = _metric(res, m)
            if v is not None:
                entry[m], entry[f"{m}_stderr"] = v, s
        entry["value"], entry["stderr"] = entry[TASKS[t].metric], entry.get(f"{TASKS[t].metric}_stderr")
        entry.update(
            {
                "n": len(samples[lm_names[t]]),
                "n_total": n_total[t],
                "lm_eval_task": lm_names[t],
                "split": TASKS[t].split,
            }
        )
        task_results[t] = entry
    return {
        "lm_eval_version": lm_eval_version(),
        "lm_eval_module": getattr(lm_eval, "__file__", None),
        "source": where if source == "local" else "hub",
        "limit": limit,
        "seed": seed,
        "subset": "seeded random subset of `limit` documents per task (random.Random(f'{seed}:{task}'))"
        if limit is not None
        else "all documents",
        "num_fewshot": 0,
        "tasks": task_results,
        "averages": averages(task_results),
        "missing": missing,
        "requests": counter.requests,
        "forward_path": "prefix-sharing" if fast else "lm-eval",
        "batch_size": batch_size,
        "seconds": seconds,
        "requests_per_s": counter.requests / seconds if seconds > 0 else None,
        "prompts": {t: PROMPTS[t] for t in names} if source == "local" else None,
    }


class _RequestCounter:
    """Counts the log-likelihood requests lm-eval sends (for requests/s)."""

    def __init__(self, lm: Any) -> None:
        self.requests = 0
        self.lm = lm
        orig = lm.loglikelihood

        def counted(requests: Iterable[Any], *a: Any, **k: Any) -> Any:
            requests = list(requests)
            self.requests += len(requests)
            return orig(requests, *a, **k)

        lm.loglikelihood = counted

    def restore(self) -> None:
        self.lm.__dict__.pop("loglikelihood", None)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text summary: one line per task, then the averages."""
    lines = [f"{'task':15}{'metric':>9}{'value':>8}{'± stderr':>10}{'n':>7}"]
    for t, r in result["tasks"].items():
        se = f"{r['stderr']:.4f}" if r.get("stderr") is not None else "-"
        lines.append(f"{t:15}{r['metric']:>9}{r['value']:>8.4f}{se:>10}{r['n']:>7}")
    for name, a in result["averages"].items():
        if a["value"] is not None:
            lines.append(f"{name:15}{'':>9}{a['value']:>8.4f}")
        else:
            lines.append(f"{name:15}  missing: {', '.join(a['missing'])}")
    return "\n".join(lines)
