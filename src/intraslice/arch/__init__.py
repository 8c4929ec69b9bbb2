"""Per-architecture mappings, registered by ``config.model_type``."""

from . import intraslice, llama, mistral, phi, phi3, qwen2  # noqa: F401  (registration side effects)
from .base import ARCHITECTURES, ArchSpec, get_arch, register

__all__ = ["ARCHITECTURES", "ArchSpec", "get_arch", "register"]
