"""llama.cpp's own server, in process, through the prebuilt ``xllamacpp`` wheel (issue #34).

``xllamacpp`` ships llama.cpp with its native server (continuous batching, OpenAI-style
completions and chat, per-request ``timings``) as a CPU manylinux wheel, so a pruned model
runs in the engine users serve with, with no build step. A pruned directory is exported to a
GGUF (architecture ``deci``, :mod:`intraslice.export.gguf`) on the fly and cached.

Two uses beside serving:

* **Agreement.** :meth:`LlamaCppServer.token_logprobs` reads the log-probability llama.cpp
  gives each token of a text. The server has no prompt log-probabilities (no ``echo``), so
  each position is one request: the prefix as token ids (its KV cache reused from the
  previous request), the next token forced with a ``logit_bias``, and the forced token's
  ``logprob``, which the server computes from the raw logits before sampling
  (``post_sampling_probs`` off), so the bias does not enter it. Token-by-token greedy
  equality is the wrong check: a near-tie (20.362 against 20.353) flips it.
* **Speed.** The server's own ``timings`` (prompt and decode tokens/s) of
  :func:`intraslice.speed_llamacpp`.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import IntraSliceError

#: The wheel every check and number of this project was made with (``pip install 'intraslice[serve]'``).
PIN = "xllamacpp==2026.10.11549"
CACHE = Path(os.environ.get("INTRASLICE_CACHE", Path.home() / ".cache" / "intraslice")) / "serve"
#: Added to the forced token's logit: any logit gap a real model has is far below this.
FORCE_BIAS = 1000.0


def require_xllamacpp() -> ModuleType:
    """The ``xllamacpp`` module, or one line saying how to install it."""
    try:
        import xllamacpp
    except ImportError:
        raise IntraSliceError(
            f"llama.cpp's server needs xllamacpp: pip install 'intraslice[serve]' (pins {PIN}; a prebuilt CPU wheel)"
        ) from None
    return xllamacpp


def _fingerprint(directory: Path, converter: str = "") -> str:
    """Changes whenever the saved model, intraslice or the converter does (path, files' size and mtime)."""
    from .. import __version__

    h = hashlib.sha256(f"{directory.resolve()}|{__version__}|{converter}".encode())
    for f in sorted(directory.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def gguf_for(
    model: str | os.PathLike[str], out_type: str = "f32", llama_cpp: str | os.PathLike[str] | None = None
) -> Path:
    """The GGUF file to serve ``model``: the file itself, or a pruned directory's export (cached).

    The export is cached under ``~/.cache/intraslice/serve`` by the directory's contents, so
    a second ``serve`` or bench of the same model starts at once.
    """
    path = Path(model)
    if not path.exists():
        raise IntraSliceError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise IntraSliceError(f"{path} is not a .gguf file or a pruned model directory")
        return path
    if not (path / "config.json").is_file():
        raise IntraSliceError(f"{path}: not a .gguf file nor a model directory (no config.json)")
    from ..export.gguf import export_gguf, find_llama_cpp

    converter = find_llama_cpp(llama_cpp)
    out = CACHE / f"{path.resolve().name}-{_fingerprint(path, str(converter))}-{out_type}.gguf"
    if not out.is_file():
        export_gguf(path, out, out_type, llama_cpp=converter)
        _evict(out)
    return out


def _evict(keep: Path) -> None:
    """Drop older exports of the same directory and type: the cache holds one per model."""
    stem, _, out_type = keep.name.rpartition("-")
    prefix = stem.rsplit("-", 1)[0]
    for old in keep.parent.glob(f"{prefix}-*-{out_type}"):
        if old != keep and old.name.rsplit("-", 2)[0] == prefix:
            old.unlink(missing_ok=True)


def dense_gguf_for(
    pruned: str | os.PathLike[str], out_type: str = "f16", llama_cpp: str | os.PathLike[str] | None = None
) -> Path:
    """The GGUF of the dense model a pruned directory was made from (its ``run_config.toml``).

    Converted by llama.cpp's own converter class for the source architecture (what a user
    serves before pruning), in ``out_type``, and cached like :func:`gguf_for`.
    """
    from ..checkpoint import SourceCheckpoint
    from ..engine.config import RUN_CONFIG_FILE, RunConfig
    from ..export.gguf import export_source_gguf

    path = Path(pruned)
    if not (path / RUN_CONFIG_FILE).is_file():
        raise IntraSliceError(f"{path} records no source model (no {RUN_CONFIG_FILE}): give the dense GGUF instead")
    cfg = RunConfig.from_toml(path / RUN_CONFIG_FILE)
    from ..export.gguf import find_llama_cpp

    ckpt = SourceCheckpoint.open(cfg.model.model, cfg.model.gguf_file)
    converter = find_llama_cpp(llama_cpp)
    fp = _fingerprint(ckpt.directory, str(converter))
    out = CACHE / f"dense-{ckpt.directory.resolve().name}-{fp}-{out_type}.gguf"
    if not out.is_file():
        export_source_gguf(ckpt.directory, out, out_type, llama_cpp=converter)
        _evict(out)
    return out


class LlamaCppServer:
    """One model in llama.cpp's server (in process; also on HTTP when ``port`` is given).

    ``threads``: llama.cpp's CPU threads for prompt and decode (default: its own choice).
    ``parallel``: server slots (concurrent sequences; the context is split between them).
    ``exact``: an f32 KV cache and no flash attention (whose CPU kernel rounds queries to
    f16), so an f32 GGUF computes in f32 throughout: the agreement checks (log-probabilities
    within 1e-6 of a float64 reference on tiny models, against 3e-4 with the defaults). Off,
    llama.cpp's serving defaults: f16 KV cache, flash attention where it chooses.
    Close it (or use ``with``): the server thread and the model's memory go with it.
    """

    def __init__(
        self,
        gguf: str | os.PathLike[str],
        n_ctx: int = 4096,
        threads: int | None = None,
        parallel: int = 1,
        port: int = 0,
        host: str = "127.0.0.1",
        verbose: bool = False,
        n_batch: int = 2048,
        exact: bool = False,
    ) -> None:
        xl = require_xllamacpp()
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise IntraSliceError(f"{self.gguf}: no such GGUF file")
        p = xl.CommonParams()
        p.model.path = str(self.gguf)
        p.n_ctx = int(n_ctx)
        p.n_parallel = int(parallel)
        p.n_batch = int(n_batch)
        p.n_ubatch = min(512, int(n_batch))
        if exact:
            p.cache_type_k = xl.ggml_type.GGML_TYPE_F32
            p.cache_type_v = xl.ggml_type.GGML_TYPE_F32
            p.flash_attn_type = 0  # disabled
        if threads:
            p.cpuparams.n_threads = int(threads)
            p.cpuparams_batch.n_threads = int(threads)
        p.warmup = False
        p.port = int(port)
        p.hostnames = [host]
        if not verbose:
            p.verbosity = -1
        self.n_ctx = int(n_ctx)
        self.parallel = int(parallel)
        try:
            self._server = xl.Server(p)
        except Exception as exc:  # the wheel raises on a file llama.cpp cannot load
            raise IntraSliceError(
                f"llama.cpp could not load {self.gguf} ({exc}); its own log says why (verbose=True, or --verbose)"
            ) from None

    @property
    def address(self) -> str | None:
        """``http://host:port`` of the OpenAI-compatible HTTP server, when started with a port."""
        return self._server.listening_address

    def __enter__(self) -> LlamaCppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server = None

    @staticmethod
    def _checked(reply: Any) -> dict[str, Any]:
        if isinstance(reply, dict) and "error" in reply:
            err = reply["error"]
            raise IntraSliceError(f"llama.cpp server: {err.get('message', err) if isinstance(err, dict) else err}")
        return reply

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI-style completion (``prompt`` as text or token ids; llama.cpp's extra keys too)."""
        return self._checked(self._server.handle_completions(request))

    def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI-style chat completion, with the model's own chat template."""
        return self._checked(self._server.handle_chat_completions(request))

    def _forced(self, prefix: list[int], token: int, n_probs: int) -> dict[str, Any] | None:
        reply = self.complete(
            {
                "prompt": [int(t) for t in prefix],
                "n_predict": 1,
                "temperature": 0.0,
                "n_probs": n_probs,
                "logit_bias": [[int(token), FORCE_BIAS]],
                "cache_prompt": True,
            }
        )
        logprobs = reply["choices"][0].get("logprobs")
        if not logprobs or not logprobs.get("content"):
            return None  # the token is part of a UTF-8 character: the server holds it back
        entry = logprobs["content"][0]
        if int(entry["id"]) != int(token):
            raise IntraSliceError(f"llama.cpp did not take the forced token {token} (it sampled {entry['id']})")
        return entry

    def forced_logprob(self, prefix: list[int], token: int) -> float:
        """llama.cpp's log-probability of ``token`` after the token ids ``prefix``.

        A token holding part of a UTF-8 character (byte-level BPE) is held back by the server
        with no log-probabilities; for it, another token is forced (one the server emitted
        before) and the whole distribution (``n_probs`` = vocabulary) is read instead.
        """
        entry = self._forced(prefix, token, 1)
        if entry is not None:
            self._emitted = int(token)
            return float(entry["logprob"])
        for other in [getattr(self, "_emitted", None), *reversed(prefix[-8:])]:
            if other is None or other == token:
                continue
            entry = self._forced(prefix, other, 1 << 20)
            if entry is not None:
                for cand in entry["top_logprobs"]:
                    if int(cand["id"]) == int(token):
                        return float(cand["logprob"])
                raise IntraSliceError(f"llama.cpp's distribution lacks token {token}")
        raise IntraSliceError(f"llama.cpp gave no log-probabilities after {len(prefix)} tokens")

    def token_logprobs(self, tokens: list[int], start: int = 1, step: Any = None) -> list[float]:
        """Log-probability of ``tokens[i]`` given ``tokens[:i]``, for ``i`` from ``start`` on.

        ``step``: called after each token (a progress bar's ``update``).
        """
        if len(tokens) > self.n_ctx // self.parallel:
            raise IntraSliceError(f"{len(tokens)} tokens exceed a slot's context of {self.n_ctx // self.parallel}")
        out = []
        for i in range(max(1, start), len(tokens)):
            out.append(self.forced_logprob(tokens[:i], tokens[i]))
            if step is not None:
                step(1)
        return out

    def window_logprobs(self, windows: list[list[int]], progress: bool = False) -> list[list[float]]:
        """:meth:`token_logprobs` of every window, the windows in the server's slots at once.

        One client thread per slot: llama.cpp batches their one-token steps together, which is
        where its speed comes from.
        """
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(w) - 1 for w in windows), desc="ppl (llama.cpp)", unit="tok", disable=not progress)
        with ThreadPoolExecutor(max(1, self.parallel)) as pool:
            ids = [list(map(int, w)) for w in windows]
            scores = list(pool.map(lambda w: self.token_logprobs(w, step=bar.update), ids))
        bar.close()
        return scores

    def perplexity(self, windows: list[list[int]], progress: bool = False) -> dict[str, Any]:
        """exp(mean next-token NLL) over every predicted token of every window, as ``eval ppl`` counts it."""
        t0 = time.perf_counter()
        return perplexity_of(self.window_logprobs(windows, progress), time.perf_counter() - t0)


def perplexity_of(scores: list[list[float]], seconds: float = 0.0) -> dict[str, Any]:
    """Perplexity of per-window token log-probabilities (:meth:`LlamaCppServer.window_logprobs`)."""
    nll = -sum(sum(s) for s in scores)
    count = sum(len(s) for s in scores)
    return {"ppl": math.exp(nll / count), "tokens_scored": count, "windows": len(scores), "seconds": seconds}


def server_allocation(
    gguf: str | os.PathLike[str], n_ctx: int, parallel: int = 1, cache_type: str = "f16", timeout: float = 60.0
) -> dict[str, float]:
    """What llama.cpp's server allocates for ``gguf`` at ``n_ctx`` cells over ``parallel`` slots.

    Read from the server's own log (info level): ``model buffer size`` lines (MiB; every
    backend's buffer summed) and the ``llama_kv_cache: size`` line (K and V, MiB). Why the log:
    the server exposes no allocation API, and these are the numbers its user sees. The
    server's log goes to the process's stderr from a thread of its own, so file descriptor 2
    is pointed at a temporary file while it starts (not thread-safe: one caller at a time).
    Returns ``model_mib``, ``k_mib``, ``v_mib`` and ``total_mib``.
    """
    import re
    import tempfile

    xl = require_xllamacpp()
    p = xl.CommonParams()
    p.model.path = str(gguf)
    p.n_ctx, p.n_parallel = int(n_ctx), int(parallel)
    p.cache_type_k = p.cache_type_v = getattr(xl.ggml_type, f"GGML_TYPE_{cache_type.upper()}")
    p.warmup, p.port = False, 0  # no HTTP listener: nothing to bind, nothing to release
    p.verbosity = 10  # llama.cpp logs its buffers at info level
    cache_type = cache_type.lower()
    kv = re.compile(
        rf"llama_kv_cache: size = .*K \({cache_type}\):\s*([0-9.]+) MiB, V \({cache_type}\):\s*([0-9.]+) MiB"
    )
    weights = re.compile(r"model buffer size =\s*([0-9.]+) MiB")
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        fd = os.open(log.name, os.O_WRONLY | os.O_APPEND)
        saved = os.dup(2)
        os.dup2(fd, 2)
        try:
            server = xl.Server(p)
            deadline = time.monotonic() + timeout
            while not kv.search(Path(log.name).read_text(errors="replace")) and time.monotonic() < deadline:
                time.sleep(0.1)
            # one request before closing: a server closed before its loop waits for tasks never returns
            server.handle_completions({"prompt": [1, 2, 3], "n_predict": 1})
            del server
            time.sleep(0.2)  # its last lines land in the file too
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(fd)
        text = Path(log.name).read_text(errors="replace")
    found, sizes = kv.search(text), weights.findall(text)
    if not found or not sizes:
        raise IntraSliceError(f"llama.cpp's log has no buffer sizes for {gguf}")
    k, v, model = float(found.group(1)), float(found.group(2)), sum(float(x) for x in sizes)
    return {"model_mib": model, "k_mib": k, "v_mib": v, "total_mib": model + k + v}
