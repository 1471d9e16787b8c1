"""The pipeline stage: its rounds (rounds), its config file (config, torch-free) and its report
(report, with the measures' sections in measures). The rounds' names are re-exported here, loaded
on first use so that importing cai_fast.pipeline.config stays torch-free: `from cai_fast.pipeline
import run_pipeline` as before."""

from .._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {"rounds": (
    "Pipeline", "PipelineState", "LoopOutcome", "best_round", "check_inputs", "iterate_rounds", "quality_of",
    "round_measures", "run_config", "run_pipeline", "should_stop", "training_prompts",
)})
