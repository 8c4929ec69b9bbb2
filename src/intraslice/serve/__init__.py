"""Serving engines for pruned models: llama.cpp's own server through ``xllamacpp`` (issue #34)."""

from __future__ import annotations

from .llamacpp import PIN, LlamaCppServer, dense_gguf_for, gguf_for, require_xllamacpp

__all__ = ["PIN", "LlamaCppServer", "dense_gguf_for", "gguf_for", "require_xllamacpp"]
