"""The labelling stage (RLAIF preference labels): the constitutional judge (judge, its config in
judge_config), the pairs it reads (pairs), the run over a prompt or pair file (run, its config in
config), the run's report (report) and trl's judge and reward interfaces (trl_compat). Both
config modules are torch-free; the names below are loaded on first use so that they stay so:
`from cai_fast.labelling import run_labelling, LabelConfig` as before."""

from .._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "run": ("LabelResult", "margin_of", "preference_row", "run_labelling"),
    "config": ("LabelConfig",),
    "judge": ("ConstitutionalJudge", "JudgeStats", "resolve_principles"),
    "judge_config": ("JudgeConfig",),
    "pairs": ("Pair", "PairLoadError", "load_pairs", "pairs_from_samples"),
})
