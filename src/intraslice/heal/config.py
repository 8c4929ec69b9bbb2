"""The knobs of a recovery run (``intraslice heal``), one field and one flag each.

Declared with :func:`intraslice.config.opt` like the prune options, so the ``heal``
subcommand is generated from this class (:func:`add_arguments`) and the engine's
``--heal-tokens`` stage builds the same object.

**Decision (defaults, 2026-12-07; BENCHMARKS.md "Heal")**: LoRA (rank 16, every linear
projection) at lr 2e-3, 2 windows of 512 tokens per step, top-64 teacher cache. Measured
on the quick-start SmolLM2 at 0.2 with 50k tokens of the bundled C4 sample: it closed as
much of the held-out C4 gap as full fine-tuning at 1e-4 (37%), a little less of the
WikiText-2 gap (19% against 22%), and far more of the copy loss (3.53 -> 3.07 against
3.25), for a tenth of the optimizer memory; LoRA at 3e-4 closed 17% and 31%.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from ..config import opt
from ..errors import IntraSliceError

METHODS = ("lora", "full")


@dataclass
class HealConfig:
    """A distillation of the dense source (teacher) into a pruned model (student)."""

    tokens: int = opt(100_000, "--tokens", "training tokens (windows x seqlen, rounded up to whole steps)", type=int)
    teacher: str | None = opt(
        None,
        "--teacher",
        "the dense model to distil from (default: the source recorded in the pruned model's run_config.toml)",
    )
    teacher_gguf_file: str | None = opt(None, "--teacher-gguf-file", "GGUF file name inside --teacher")
    data: str = opt(
        "c4",
        "--data",
        "training text: c4 (online C4 en; offline the bundled sample's calibration split), fineweb-edu, "
        "hf:NAME?column=COL, mix:SRC=W,..., or a .txt/.jsonl file; never an evaluation text",
    )
    seqlen: int = opt(512, "--seqlen", "tokens per training window", type=int)
    batch: int = opt(2, "--batch", "windows per optimizer step (gradients accumulated one window at a time)", type=int)
    method: str = opt("lora", "--method", "full fine-tuning, or LoRA merged back at the end", choices=METHODS)
    lr: float | None = opt(None, "--lr", "peak learning rate (default: 2e-3 for lora, 1e-4 for full)", type=float)
    warmup: float = opt(0.05, "--warmup", "share of the steps with a linear warm-up", type=float)
    min_lr: float = opt(0.1, "--min-lr", "the cosine decay ends at this fraction of --lr", type=float)
    weight_decay: float = opt(0.0, "--weight-decay", "AdamW weight decay", type=float)
    grad_clip: float = opt(1.0, "--grad-clip", "gradient norm clip (0: none)", type=float)
    lora_rank: int = opt(16, "--lora-rank", "LoRA rank r (alpha = 2r)", type=int)
    topk: int = opt(
        64,
        "--topk",
        "teacher log-probabilities kept per position, plus one bucket for the rest (0: the whole vocabulary)",
        type=int,
    )
    ce_weight: float = opt(0.0, "--ce-weight", "mix of next-token cross-entropy into the loss (0-1)", type=float)
    seed: int = opt(0, "--seed", "seed of the window selection and order", type=int)
    save_every: int = opt(10, "--save-every", "optimizer steps between resumable checkpoints", type=int)
    eval_windows: int = opt(4, "--eval-windows", "windows of each held-out text checked before and after", type=int)
    eval_seqlen: int = opt(2048, "--eval-seqlen", "length of the held-out windows", type=int)
    eval_texts: str = opt("wikitext2,c4-heldout", "--eval-texts", "held-out texts of the check")
    val_windows: int = opt(
        4,
        "--val-windows",
        "last windows of the heal text held out of training: the keep-worse judge (at most a quarter of the text)",
        type=int,
    )
    keep_worse: bool = opt(
        False,
        "--keep-worse",
        "keep the healed weights even when the validation perplexity (held-out windows of the heal text, never "
        "the evaluation texts) got worse",
        action="store_true",
    )
    device: str | None = opt(None, "--device", "cpu or cuda (default: cuda if available)")

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-3 if self.method == "lora" else 1e-4

    def check(self) -> None:
        """Everything that needs neither model nor data (a typo costs nothing)."""
        if self.tokens < 1:
            raise IntraSliceError(f"--tokens must be >= 1, got {self.tokens}: there is nothing to train on")
        if self.seqlen < 2 or self.batch < 1:
            raise IntraSliceError(f"need --seqlen >= 2 and --batch >= 1, got {self.seqlen} and {self.batch}")
        if self.method not in METHODS:
            raise IntraSliceError(f"unknown heal method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.peak_lr > 0:
            raise IntraSliceError(f"--lr must be > 0, got {self.peak_lr}")
        if not 0.0 <= self.warmup < 1.0 or not 0.0 <= self.min_lr <= 1.0:
            raise IntraSliceError("--warmup must be in [0, 1) and --min-lr in [0, 1]")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise IntraSliceError(f"--ce-weight must be in [0, 1], got {self.ce_weight}")
        if self.topk < 0 or self.lora_rank < 1 or self.save_every < 1 or self.eval_windows < 0 or self.val_windows < 0:
            raise IntraSliceError(
                "--topk, --eval-windows, --val-windows must be >= 0 and --lora-rank, --save-every >= 1"
            )
        from ..data import EVAL_TEXTS

        for text in self.texts():
            if text not in EVAL_TEXTS:
                raise IntraSliceError(f"unknown held-out text {text!r}: choose from {', '.join(EVAL_TEXTS)}")
        if self.data in EVAL_TEXTS:
            raise IntraSliceError(f"refusing to train on {self.data!r}: it is an evaluation text")
        if self.method == "lora":  # before the teacher pass, not after it
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise IntraSliceError("--method lora needs peft: pip install 'intraslice[heal]' (or --method full)")

    def texts(self) -> list[str]:
        return [t.strip() for t in self.eval_texts.split(",") if t.strip()]

    def steps(self) -> int:
        return -(-self.tokens // (self.seqlen * self.batch))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``intraslice heal``'s flags, generated from :class:`HealConfig`."""
    for f in fields(HealConfig):
        meta = f.metadata
        shown = f.default is not None and not meta["action"] and f.name != "lr"
        help_text = meta["help"] + (" (default: %(default)s)" if shown else "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": help_text}
        if meta["action"]:
            kwargs["action"] = meta["action"]
        else:
            if meta["type"] is not None:
                kwargs["type"] = meta["type"]
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
        parser.add_argument(meta["flag"], **kwargs)


def from_args(args: argparse.Namespace) -> HealConfig:
    return HealConfig(**{f.name: getattr(args, f.name) for f in fields(HealConfig)})


@dataclass
class HealSection:
    """``[heal]`` of a prune run: heal the pruned model right after pruning (``--heal-tokens N``)."""

    tokens: int = opt(
        0, "--heal-tokens", "after pruning, distil the dense model into the pruned one on N tokens (0: off)", type=int
    )
    data: str = opt("c4", "--heal-data", "training text of the heal (see `intraslice heal --data`)")
    method: str = opt("lora", "--heal-method", "heal by LoRA (merged back) or full fine-tuning", choices=METHODS)
    lr: float | None = opt(None, "--heal-lr", "peak learning rate of the heal", type=float, hidden=True)
    keep_worse: bool = opt(
        False,
        "--heal-keep-worse",
        "keep the healed weights even when the validation perplexity (held-out windows of the heal text) got worse",
        action="store_true",
    )

    def heal_config(self, evaluation: Any, device: str) -> HealConfig:
        """The heal's config: its held-out check is the run's evaluation (texts, windows, length)."""
        return HealConfig(
            tokens=self.tokens,
            data=self.data,
            method=self.method,
            lr=self.lr,
            keep_worse=self.keep_worse,
            eval_windows=evaluation.windows if evaluation.enabled else 0,
            eval_seqlen=evaluation.seqlen,
            eval_texts=evaluation.texts,
            device=device,
        )
