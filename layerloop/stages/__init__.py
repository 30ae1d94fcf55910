"""Processing stages, one per file. See ``base.py`` for the contract and ``registry.py`` for names."""

from layerloop.stages.base import Resources, Stage, StageParams, run_stage, sample_rng
from layerloop.stages.registry import STAGES, build_stage, register_stage, stage_class

__all__ = ["Resources", "Stage", "StageParams", "run_stage", "sample_rng", "STAGES", "build_stage",
           "register_stage", "stage_class"]
