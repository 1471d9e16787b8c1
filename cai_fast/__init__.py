"""cai_fast: Constitutional AI (SL-CAI, RLAIF) end to end, fast.

The Python entry points below are re-exported here, each loaded on first use (PEP 562), so that
`import cai_fast` stays cheap and imports no torch: e.g. `cai_fast.load_model()`,
`cai_fast.run_sl_cai(...)`. Their modules (the README's import paths) remain the reference.
"""

import importlib

__version__ = "0.1.0"

_ENTRY_POINTS = {
    "load_model": "engine", "make_generator": "engine", "open_generator": "engine", "SamplingParams": "engine",
    "load_constitution": "data.constitution", "load_prompts": "data", "prompts_from_texts": "data",
    "SLCAIConfig": "sl_cai_config", "run_sl_cai": "sl_cai",
    "JudgeConfig": "labelling.judge_config", "ConstitutionalJudge": "labelling.judge",
    "LabelConfig": "labelling.config", "run_labelling": "labelling.run",
    "EvalConfig": "evaluate.config", "evaluate_model": "evaluate.run",
    "PipelineConfig": "pipeline.config", "load_pipeline_config": "pipeline.config", "run_pipeline": "pipeline.rounds",
}

__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_ENTRY_POINTS[name]}", __name__), name)
