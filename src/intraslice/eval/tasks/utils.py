"""Dataset loader for the offline lm-eval tasks in this directory (``custom_dataset``).

lm-eval calls ``load(**metadata, **dataset_kwargs)``: ``task`` comes from the YAML's
``dataset_kwargs`` and ``data_dir`` from the TaskManager metadata (``intraslice eval
zeroshot --data-dir``); without it ``$INTRASLICE_ZEROSHOT_DATA``, then the copies bundled
with the package, are used. Kept thin: the formatting lives in ``intraslice.eval.zeroshot``
so that the CLI, the Python API and ``lm_eval --include_path`` share one definition.
"""

from __future__ import annotations

from typing import Any


def load(task: str, data_dir: str | None = None, **_metadata: Any) -> Any:
    from intraslice.eval.zeroshot import load_task_dataset

    return load_task_dataset(task, data_dir)
