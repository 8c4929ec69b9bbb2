"""Deployable outputs of a pruned model: one small module per format (issue #11).

* :mod:`.stock_hf`: a plain ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``
  directory (``--deploy stock`` models);
* :mod:`.gguf`: a llama.cpp GGUF of architecture ``deci`` (``--deploy llamacpp`` models);
* :mod:`.vllm`: a vLLM ``DeciLMForCausalLM`` (``nemotron-nas``) directory (``--deploy vllm`` models).

The pruning math knows nothing of these; an exporter reads a saved pruned directory.
"""

from __future__ import annotations

FORMATS = ("gguf", "stock-hf", "vllm")
