"""The evaluation stage: win-rates against a base model under a judge and the run over the eval
sets (run, its torch-free config in config), refusal and harmful compliance (refusal),
capability benchmarks (capability), harmfulness by conversation depth (depth), length-controlled
win-rates (length) and the judge's agreement with human labels (judge_check). The names below
are loaded on first use, so that importing cai_fast.evaluate.config stays torch-free:
`from cai_fast.evaluate import evaluate_model, EvalConfig` as before."""

from .._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "run": ("SETS", "OUTPUTS_FILE", "EvalSets", "ModelOutputs", "baseline_metrics", "compare_with_base",
            "depth_of", "evaluate_model", "fixed_label", "judge_check_wanted", "judged_win_rate",
            "load_eval_sets", "looking_dangerous", "make_judges", "model_outputs", "outputs_of", "summary_lines",
            "win_rate"),
    "config": ("EvalConfig",),
})
