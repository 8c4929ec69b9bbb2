"""Test support that ships with the package: an emulated CUDA device for CPU-only machines.

Lives in the package (not under ``tests/``) so that downstream users and the CLI's own
smoke checks can prove device correctness without a GPU too.
"""

from .fakedevice import EmulatedCudaTensor, emulated_cuda, is_emulated_cuda, memory_stats

__all__ = ["EmulatedCudaTensor", "emulated_cuda", "is_emulated_cuda", "memory_stats"]
