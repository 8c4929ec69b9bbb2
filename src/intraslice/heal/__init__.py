"""Recovery after pruning: distil the dense source into the pruned model (``intraslice heal``).

:func:`heal` takes a pruned directory and writes a healed one of exactly the same shapes
and files; :class:`HealConfig` holds its knobs. See ``heal.run`` for the order of a heal,
``heal.teacher`` for the streamed teacher cache, ``heal.loss`` for the loss, ``heal.train``
for the resumable loop.
"""

from .config import HealConfig
from .run import heal

__all__ = ["HealConfig", "heal"]
