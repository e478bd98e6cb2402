"""`mil run PIPELINE.yaml`: the whole pipeline from one file (cells -> [detect] -> [classify] -> extract -> compare
-> [predict] -> attention), each stage cached and resumable; `mil init` writes a commented template."""

from mil.pipeline.config import STAGES, PipelineConfig, load_pipeline
from mil.pipeline.run import run_pipeline

__all__ = ["STAGES", "PipelineConfig", "load_pipeline", "run_pipeline"]
