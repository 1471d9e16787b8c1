"""Every stage's config module imports without torch (the CLI builds its options from them)."""

import subprocess
import sys

CONFIG_MODULES = (
    "cai_fast.config", "cai_fast.sl_cai_config", "cai_fast.labelling.config", "cai_fast.labelling.judge_config",
    "cai_fast.evaluate.config", "cai_fast.pipeline.config", "cai_fast.train.config", "cai_fast.train",
)


def test_importing_every_config_module_leaves_torch_out():
    code = "import sys\n" + "".join(f"import {m}\n" for m in CONFIG_MODULES) + (
        "heavy = [m for m in ('torch', 'transformers', 'cai_fast.engine') if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr



def test_the_package_re_exports_its_entry_points_lazily():
    code = ("import sys, cai_fast\n"
            "assert 'torch' not in sys.modules\n"
            "for name in cai_fast.__all__:\n"
            "    assert getattr(cai_fast, name) is not None, name\n"
            "from cai_fast.engine import load_model\n"
            "assert cai_fast.load_model is load_model\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_python_loaders_take_the_command_lines_defaults():
    import inspect

    from cai_fast.engine import load_model, open_generator

    for fn in (load_model, open_generator):
        params = inspect.signature(fn).parameters
        assert (params["device"].default, params["dtype"].default) == ("auto", "auto"), fn.__name__


def test_the_old_flat_import_paths_are_the_stage_packages_modules():
    """One release of shims: `cai_fast.judge` is `cai_fast.labelling.judge`, and so on."""
    import importlib

    moved = {"judge": "labelling.judge", "judge_config": "labelling.judge_config", "label_config": "labelling.config",
             "pairs": "labelling.pairs", "label_report": "labelling.report", "trl_compat": "labelling.trl_compat",
             "eval_config": "evaluate.config", "refusal": "evaluate.refusal", "benchmarks": "evaluate.capability",
             "depth": "evaluate.depth", "length": "evaluate.length", "judge_check": "evaluate.judge_check",
             "constitution": "data.constitution", "prompts": "data.prompts", "pipeline_config": "pipeline.config",
             "report": "pipeline.report", "report_measures": "pipeline.measures"}
    for old, new in moved.items():
        assert importlib.import_module(f"cai_fast.{old}") is importlib.import_module(f"cai_fast.{new}"), old
    from cai_fast.evaluate import EvalConfig, evaluate_model
    from cai_fast.labelling import LabelConfig, run_labelling

    assert (EvalConfig.__module__, evaluate_model.__module__) == ("cai_fast.evaluate.config", "cai_fast.evaluate.run")
    assert (LabelConfig.__module__, run_labelling.__module__) == ("cai_fast.labelling.config", "cai_fast.labelling.run")
