"""The one pruning engine: :class:`RunConfig` in, an output directory out (see ``engine.run``)."""

from .config import RUN_CONFIG_FILE, RunConfig
from .run import STAGES, Run, RunResult, Stage, register_stage, run

__all__ = ["RUN_CONFIG_FILE", "STAGES", "Run", "RunConfig", "RunResult", "Stage", "register_stage", "run"]
