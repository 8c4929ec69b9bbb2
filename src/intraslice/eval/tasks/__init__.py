"""lm-eval task definitions (YAML) reading local JSONL; pass this directory as lm-eval's ``--include_path``."""
